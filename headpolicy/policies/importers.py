"""Import head patterns published by other tools as HeadPolicy objects.

Formats (registered by name with @importer):

duo-attention
    DuoAttention's `full_attention_heads.tsv`: one line per layer, one tab-separated gate
    value per KV head, no header. A `config.json` beside it gives `sink_size` and
    `recent_size`, which become the policy's sink and window. Gates, clipped to [0, 1]
    as DuoAttention does, are the scores; the default threshold 0.5 is DuoAttention's.
retrieval-head
    Retrieval Head (Wu et al. 2024) JSON: {"layer-head": [score per trial, ...]} over
    *query* heads. A KV head's score is the max, over the query heads of its group, of
    the mean over trials: a KV head must stay full as soon as any query head reading it
    retrieves, and the mean keeps one lucky trial from counting as retrieval.
razor-attention
    RazorAttention-style JSON: {"layer": [kv head ids, ...]} listing the heads that keep a
    full cache (echo + induction heads). Layers not listed keep none. No scores.

Scored formats become a table by `budget` (the top round(budget * num_heads) KV heads by
score, ties to the lower (layer, head)) or `threshold` (score >= threshold); without
either the format's default threshold is used. Provenance records the format, the files
and their sha256.

Importing is two steps, so that a CLI can refuse a bad file before it spends time loading a
model: `read_source(fmt, src)` checks the format name, the file and its syntax (no model
needed); `policy_from_source(source, model, ...)` checks the pattern against the model's
shape and selects. `import_policy(fmt, src, model, ...)` does both.

Malformed files raise ImportFormatError naming the file and the line or key.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from headpolicy.errors import BudgetError, PolicyError
from headpolicy.policies.schema import MAX_TOKENS, HeadPolicy, ModelInfo, Provenance, finite_number, need_tokens
from headpolicy.policies.select import budget_heads, select_budget
from headpolicy.version import __version__


class ImportFormatError(PolicyError):
    """A file given to `headpolicy import` does not follow its format (names the line or key)."""


@dataclass(frozen=True)
class ImportedPattern:
    """What a format's `build` returns, before selection."""

    scores: np.ndarray | None  # [layers, kv_heads] float64, or None when the file lists heads
    table: np.ndarray | None  # [layers, kv_heads] bool when the file lists heads
    files: tuple[Path, ...]  # every file read (for provenance)
    sink: int | None = None
    window: int | None = None
    notes: dict[str, Any] | None = None


Parser = Callable[[Path], Any]  # the file's syntax, checked without a model -> what `build` needs
Builder = Callable[[Any, Path, ModelInfo], ImportedPattern]  # (parsed, path, model) -> the pattern


@dataclass(frozen=True)
class Format:
    name: str
    parse: Parser
    build: Builder
    default_threshold: float | None  # None: the file already decides (no scores)
    aliases: tuple[str, ...] = ()


FORMATS: dict[str, Format] = {}


def importer(name: str, *, parse: Parser, default_threshold: float | None, aliases: tuple[str, ...] = ()):
    """Register `build(parsed, path, model_info) -> ImportedPattern` as import format `name`;
    `parse(path)` reads and syntax-checks the file without a model."""

    def deco(build: Builder) -> Builder:
        fmt = Format(name, parse, build, default_threshold, aliases)
        for n in (name, *aliases):
            FORMATS[n] = fmt
        return build

    return deco


def format_names() -> list[str]:
    return sorted({f.name for f in FORMATS.values()})


# ---- public entry points ------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """A peer's file, read and syntax-checked: everything `import` can check before it has a model."""

    format: Format
    path: Path
    parsed: Any


def read_source(fmt: str, src: str | os.PathLike) -> Source:
    """Check the format name, find the file (DuoAttention: also in a folder) and check its syntax."""
    f = FORMATS.get(fmt)
    if f is None:
        raise ImportFormatError(f"unknown import format {fmt!r}; known formats: {', '.join(format_names())}")
    path = Path(src)
    if path.is_dir() and f.name == "duo-attention":
        path = path / "full_attention_heads.tsv"
    if not path.is_file():
        raise ImportFormatError(f"{f.name}: no such file: {path}")
    return Source(f, path, f.parse(path))


def check_options(
    source: Source,
    *,
    budget: float | None = None,
    threshold: float | None = None,
    sink: int | None = None,
    window: int | None = None,
) -> None:
    """Refuse options no model can make right: both budget and threshold, a budget outside [0, 1],
    a threshold that is not a number, a selection for a file without scores, a sink/window
    outside [0 | 1, MAX_TOKENS]."""
    if budget is not None and threshold is not None:
        raise BudgetError("give either a budget or a threshold, not both")
    if source.format.default_threshold is None and (budget is not None or threshold is not None):
        raise BudgetError(
            f"{source.format.name} files list the retrieval heads and carry no scores; "
            "--budget/--threshold do not apply"
        )
    if budget is not None:
        budget_heads(budget, 1)  # the range check
    if threshold is not None and finite_number(threshold) is None:
        raise BudgetError(f"threshold must be a finite number, got {threshold!r}")
    if sink is not None:
        need_tokens(sink, "sink", minimum=0)
    if window is not None:
        need_tokens(window, "window", minimum=1)


def policy_from_source(
    source: Source,
    model: ModelInfo,
    *,
    budget: float | None = None,
    threshold: float | None = None,
    sink: int | None = None,
    window: int | None = None,
) -> HeadPolicy:
    """The policy for `model` from a file read by `read_source`; arguments as in import_policy."""
    check_options(source, budget=budget, threshold=threshold, sink=sink, window=window)
    f = source.format
    pattern = f.build(source.parsed, source.path, model)
    selection: dict[str, Any]
    if pattern.scores is None:
        table = pattern.table
        selection = {"listed": True}
    elif budget is not None:
        table = select_budget(pattern.scores, budget)
        selection = {"budget": float(budget)}
    else:
        t = f.default_threshold if threshold is None else threshold
        table = pattern.scores >= t
        selection = {"threshold": float(t)}

    settings: dict[str, Any] = {
        "source_format": f.name,
        "source_files": [{"name": p.name, "sha256": sha256_file(p)} for p in pattern.files],
        "selection": selection,
    }
    if pattern.notes:
        settings.update(pattern.notes)
    provenance = Provenance(tool="headpolicy", version=__version__, method=f"import:{f.name}", settings=settings)
    scores = None if pattern.scores is None else pattern.scores.tolist()
    return HeadPolicy.from_kinds(
        model,
        table.tolist(),
        sink=_pick(sink, pattern.sink, 64),
        window=_pick(window, pattern.window, 256),
        scores=scores,
        provenance=provenance,
    )


def import_policy(
    fmt: str,
    src: str | os.PathLike,
    model: ModelInfo,
    *,
    budget: float | None = None,
    threshold: float | None = None,
    sink: int | None = None,
    window: int | None = None,
) -> HeadPolicy:
    """Read a peer's head pattern from `src` and build a policy for `model`.

    budget: fraction of KV heads kept retrieval, in [0, 1]; threshold: keep heads with
    score >= threshold. At most one of them. sink/window override what the file says
    (defaults 64/256 when it says nothing); both at most MAX_TOKENS.
    """
    source = read_source(fmt, src)
    return policy_from_source(source, model, budget=budget, threshold=threshold, sink=sink, window=window)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def _pick(*values):
    return next(v for v in values if v is not None)


# ---- reading ------------------------------------------------------------------------------------
def _read_text(path: Path, fmt: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ImportFormatError(f"{fmt}: cannot read {path}: {' '.join(str(e).split())}") from None


def _read_json(path: Path, fmt: str) -> Any:
    text = _read_text(path, fmt)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ImportFormatError(f"{fmt}: {path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except ValueError as e:  # json parsed it but cannot build it: an integer of more than 4300 digits
        raise ImportFormatError(f"{fmt}: {path}: not valid JSON ({' '.join(str(e).split())[:200]})") from None
    except RecursionError:
        raise ImportFormatError(f"{fmt}: {path}: JSON nested too deeply") from None


def _number(x: Any, where: str) -> float:
    value = finite_number(x)
    if value is None:
        raise ImportFormatError(f"{where}: expected a finite number, got {x!r:.80}")
    return value


def _int_key(text: str, where: str) -> int:
    # ASCII digits only: str.isdigit() also accepts '²', which int() refuses; and no more digits
    # than int() converts (4300)
    digits = text.strip()
    if not (digits.isascii() and digits.isdigit() and len(digits) <= 18):
        raise ImportFormatError(f"{where}: expected a non-negative integer (a layer or head number), got {text!r:.80}")
    return int(digits)


# ---- DuoAttention -------------------------------------------------------------------------------
@dataclass(frozen=True)
class _DuoFile:
    rows: list[tuple[int, list[float]]]  # (line number, gate per KV head), blank lines skipped
    config: Path | None  # config.json beside the TSV, if any
    sink: int | None
    window: int | None


def parse_duo_attention(path: Path) -> _DuoFile:
    """full_attention_heads.tsv: numbers only; config.json beside it: sink_size, recent_size."""
    fmt = "duo-attention"
    rows = []
    for lineno, line in enumerate(_read_text(path, fmt).splitlines(), start=1):
        if not line.strip():
            continue  # DuoAttention writes a trailing newline; tolerate blank lines
        where = f"{fmt}: {path.name} line {lineno}"
        values = []
        for ci, cell in enumerate(line.rstrip("\r\n").strip().split("\t")):
            try:
                value = float(cell)
            except ValueError:
                hint = " (gate values are separated by tabs)" if len(cell.split()) > 1 else ""
                raise ImportFormatError(f"{where}, column {ci + 1}: expected a number, got {cell!r}{hint}") from None
            values.append(_number(value, f"{where}, column {ci + 1}"))
        rows.append((lineno, values))
    cfg_path = path.parent / "config.json"
    if not cfg_path.is_file():
        return _DuoFile(rows, None, None, None)
    cfg = _read_json(cfg_path, fmt)
    if not isinstance(cfg, dict):
        raise ImportFormatError(f"{fmt}: {cfg_path.name}: expected a JSON object, got {type(cfg).__name__}")
    sizes = []
    for key, minimum in (("sink_size", 0), ("recent_size", 1)):
        if key not in cfg:
            raise ImportFormatError(f"{fmt}: {cfg_path.name}: missing key '{key}'")
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, int) or not minimum <= v <= MAX_TOKENS:
            raise ImportFormatError(
                f"{fmt}: {cfg_path.name}: key '{key}': expected an integer from {minimum} to "
                f"MAX_TOKENS = {MAX_TOKENS}, got {v!r}"
            )
        sizes.append(v)
    return _DuoFile(rows, cfg_path, *sizes)


@importer("duo-attention", parse=parse_duo_attention, default_threshold=0.5, aliases=("duo", "duoattention"))
def build_duo_attention(duo: _DuoFile, path: Path, model: ModelInfo) -> ImportedPattern:
    """One line per layer, one gate per KV head; gates clipped to [0, 1] are the scores."""
    fmt = "duo-attention"
    for lineno, values in duo.rows:
        if len(values) != model.num_kv_heads:
            raise ImportFormatError(
                f"{fmt}: {path.name} line {lineno}: expected {model.num_kv_heads} tab-separated gate values "
                f"(one per KV head of {model.name}), got {len(values)}"
            )
    if len(duo.rows) != model.num_layers:
        raise ImportFormatError(
            f"{fmt}: {path.name}: expected {model.num_layers} lines (one per layer of {model.name}), "
            f"got {len(duo.rows)}"
        )
    files = (path,) if duo.config is None else (path, duo.config)
    # DuoAttention itself clips the trained gates to [0, 1] when it loads them.
    gates = np.clip(np.array([values for _, values in duo.rows], dtype=np.float64), 0.0, 1.0)
    notes = {"reduction": "gates clipped to [0, 1] as DuoAttention's load_attn_pattern does"}
    return ImportedPattern(gates, None, files, duo.sink, duo.window, notes)


# ---- Retrieval Head -----------------------------------------------------------------------------
def parse_retrieval_head(path: Path) -> dict[tuple[int, int], tuple[str, float]]:
    """{"layer-head": [trial scores] | score} -> {(layer, query head): (key, mean over trials)}."""
    fmt = "retrieval-head"
    data = _read_json(path, fmt)
    if not isinstance(data, dict):
        raise ImportFormatError(f"{fmt}: {path.name}: expected a JSON object mapping 'layer-head' to score lists")
    out = {}
    for key, trials in data.items():
        where = f"{fmt}: {path.name}: key {key!r}"
        parts = key.split("-")
        if len(parts) != 2:
            raise ImportFormatError(f"{where}: expected 'layer-head' (e.g. '3-17')")
        layer, head = _int_key(parts[0], where), _int_key(parts[1], where)
        if isinstance(trials, int | float) and not isinstance(trials, bool):
            trials = [trials]  # a pre-averaged score
        if not isinstance(trials, list) or not trials:
            raise ImportFormatError(f"{where}: expected a non-empty list of per-trial scores, got {trials!r}")
        out[layer, head] = (key, float(np.mean([_number(t, f"{where}[{i}]") for i, t in enumerate(trials)])))
    return out


@importer("retrieval-head", parse=parse_retrieval_head, default_threshold=0.1,
          aliases=("retrieval_head", "retrievalhead"))  # fmt: skip
def build_retrieval_head(
    means: dict[tuple[int, int], tuple[str, float]], path: Path, model: ModelInfo
) -> ImportedPattern:
    """Query-head means -> KV scores: max over the query heads of each group."""
    fmt = "retrieval-head"
    L, Hq, G = model.num_layers, model.num_attention_heads, model.group_size
    per_query = np.full((L, Hq), np.nan)
    for (layer, head), (key, mean) in means.items():
        if layer >= L or head >= Hq:
            raise ImportFormatError(
                f"{fmt}: {path.name}: key {key!r}: out of range for {model.name} ({L} layers x {Hq} query heads)"
            )
        per_query[layer, head] = mean
    missing = np.argwhere(np.isnan(per_query))
    if len(missing):
        layer, head = missing[0]
        raise ImportFormatError(
            f"{fmt}: {path.name}: missing key '{layer}-{head}' ({len(missing)} of {L * Hq} query heads have no scores)"
        )
    kv = per_query.reshape(L, Hq // G, G).max(axis=2)
    notes = {"reduction": "kv score = max over the query heads of the group of the mean over trials"}
    return ImportedPattern(kv, None, (path,), notes=notes)


# ---- RazorAttention -----------------------------------------------------------------------------
def parse_razor_attention(path: Path) -> dict[int, tuple[str, list[int]]]:
    """{"layer": [kv head ids]} -> {layer: (key, head ids)}; ids checked against the model later."""
    fmt = "razor-attention"
    data = _read_json(path, fmt)
    if not isinstance(data, dict):
        raise ImportFormatError(f"{fmt}: {path.name}: expected a JSON object mapping layer to a list of KV head ids")
    out = {}
    for key, heads in data.items():
        where = f"{fmt}: {path.name}: key {key!r}"
        layer = _int_key(key, where)
        if not isinstance(heads, list):
            raise ImportFormatError(f"{where}: expected a list of KV head ids, got {heads!r}")
        for i, h in enumerate(heads):
            if isinstance(h, bool) or not isinstance(h, int) or h < 0:
                raise ImportFormatError(f"{where}[{i}]: expected a KV head id (an integer >= 0), got {h!r}")
        out[layer] = (key, heads)
    return out


@importer("razor-attention", parse=parse_razor_attention, default_threshold=None,
          aliases=("razor", "razorattention"))  # fmt: skip
def build_razor_attention(listed: dict[int, tuple[str, list[int]]], path: Path, model: ModelInfo) -> ImportedPattern:
    """The listed heads keep the full cache; layers not listed keep none."""
    fmt = "razor-attention"
    L, H = model.num_layers, model.num_kv_heads
    table = np.zeros((L, H), dtype=bool)
    for layer, (key, heads) in listed.items():
        where = f"{fmt}: {path.name}: key {key!r}"
        if layer >= L:
            raise ImportFormatError(f"{where}: layer out of range ({model.name} has {L} layers)")
        for i, h in enumerate(heads):
            if h >= H:
                raise ImportFormatError(f"{where}[{i}]: expected a KV head id in [0, {H}), got {h!r}")
            table[layer, h] = True
    return ImportedPattern(None, table, (path,))
