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

Malformed files raise ImportFormatError naming the file and the line or key.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from headpolicy.errors import BudgetError, PolicyError
from headpolicy.policies.schema import HeadPolicy, ModelInfo, Provenance
from headpolicy.policies.select import select_budget
from headpolicy.version import __version__


class ImportFormatError(PolicyError):
    """A file given to `headpolicy import` does not follow its format (names the line or key)."""


@dataclass(frozen=True)
class ImportedPattern:
    """What a format reader returns, before selection."""

    scores: np.ndarray | None  # [layers, kv_heads] float64, or None when the file lists heads
    table: np.ndarray | None  # [layers, kv_heads] bool when the file lists heads
    files: tuple[Path, ...]  # every file read (for provenance)
    sink: int | None = None
    window: int | None = None
    notes: dict[str, Any] | None = None


Reader = Callable[[Path, ModelInfo], ImportedPattern]


@dataclass(frozen=True)
class Format:
    name: str
    read: Reader
    default_threshold: float | None  # None: the file already decides (no scores)
    aliases: tuple[str, ...] = ()


FORMATS: dict[str, Format] = {}


def importer(name: str, *, default_threshold: float | None, aliases: tuple[str, ...] = ()):
    """Register `read(path, model_info) -> ImportedPattern` as import format `name`."""

    def deco(read: Reader) -> Reader:
        fmt = Format(name, read, default_threshold, aliases)
        for n in (name, *aliases):
            FORMATS[n] = fmt
        return read

    return deco


def format_names() -> list[str]:
    return sorted({f.name for f in FORMATS.values()})


# ---- public entry point -----------------------------------------------------------------------
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
    (defaults 64/256 when it says nothing).
    """
    f = FORMATS.get(fmt)
    if f is None:
        raise ImportFormatError(f"unknown import format {fmt!r}; known formats: {', '.join(format_names())}")
    if budget is not None and threshold is not None:
        raise BudgetError("give either a budget or a threshold, not both")
    path = Path(src)
    if path.is_dir() and f.name == "duo-attention":
        path = path / "full_attention_heads.tsv"
    if not path.is_file():
        raise ImportFormatError(f"{f.name}: no such file: {path}")
    pattern = f.read(path, model)

    selection: dict[str, Any]
    if pattern.scores is None:
        if budget is not None or threshold is not None:
            raise BudgetError(
                f"{f.name} files list the retrieval heads and carry no scores; --budget/--threshold do not apply"
            )
        table = pattern.table
        selection = {"listed": True}
    elif budget is not None:
        table = select_budget(pattern.scores, budget)
        selection = {"budget": float(budget)}
    else:
        t = f.default_threshold if threshold is None else threshold
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t):
            raise BudgetError(f"threshold must be a finite number, got {t!r}")
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


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def _pick(*values):
    return next(v for v in values if v is not None)


# ---- readers ------------------------------------------------------------------------------------
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


def _number(x: Any, where: str) -> float:
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
        raise ImportFormatError(f"{where}: expected a finite number, got {x!r}")
    return float(x)


def _int_key(text: str, where: str) -> int:
    if not text.strip().isdigit():
        raise ImportFormatError(f"{where}: expected a non-negative integer, got {text!r}")
    return int(text)


@importer("duo-attention", default_threshold=0.5, aliases=("duo", "duoattention"))
def read_duo_attention(path: Path, model: ModelInfo) -> ImportedPattern:
    """full_attention_heads.tsv (+ config.json with sink_size, recent_size beside it)."""
    fmt = "duo-attention"
    rows = []
    for lineno, line in enumerate(_read_text(path, fmt).splitlines(), start=1):
        if not line.strip():
            continue  # DuoAttention writes a trailing newline; tolerate blank lines
        where = f"{fmt}: {path.name} line {lineno}"
        cells = line.rstrip("\r\n").strip().split("\t")
        if len(cells) != model.num_kv_heads:
            raise ImportFormatError(
                f"{where}: expected {model.num_kv_heads} tab-separated gate values (one per KV head of "
                f"{model.name}), got {len(cells)}"
            )
        values = []
        for ci, cell in enumerate(cells):
            try:
                value = float(cell)
            except ValueError:
                raise ImportFormatError(f"{where}, column {ci + 1}: expected a number, got {cell!r}") from None
            values.append(_number(value, f"{where}, column {ci + 1}"))
        rows.append(values)
    if len(rows) != model.num_layers:
        raise ImportFormatError(
            f"{fmt}: {path.name}: expected {model.num_layers} lines (one per layer of {model.name}), got {len(rows)}"
        )

    files = [path]
    sink = window = None
    cfg_path = path.parent / "config.json"
    if cfg_path.is_file():
        cfg = _read_json(cfg_path, fmt)
        if not isinstance(cfg, dict):
            raise ImportFormatError(f"{fmt}: {cfg_path.name}: expected a JSON object, got {type(cfg).__name__}")
        for key in ("sink_size", "recent_size"):
            if key not in cfg:
                raise ImportFormatError(f"{fmt}: {cfg_path.name}: missing key '{key}'")
            v = cfg[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if key == "sink_size" else 1):
                raise ImportFormatError(f"{fmt}: {cfg_path.name}: key '{key}': expected a positive integer, got {v!r}")
        sink, window = cfg["sink_size"], cfg["recent_size"]
        files.append(cfg_path)
    # DuoAttention itself clips the trained gates to [0, 1] when it loads them.
    gates = np.clip(np.array(rows, dtype=np.float64), 0.0, 1.0)
    notes = {"reduction": "gates clipped to [0, 1] as DuoAttention's load_attn_pattern does"}
    return ImportedPattern(gates, None, tuple(files), sink, window, notes)


@importer("retrieval-head", default_threshold=0.1, aliases=("retrieval_head", "retrievalhead"))
def read_retrieval_head(path: Path, model: ModelInfo) -> ImportedPattern:
    """{"layer-head": [trial scores]} over query heads -> KV scores: max over group of the trial mean."""
    fmt = "retrieval-head"
    data = _read_json(path, fmt)
    if not isinstance(data, dict):
        raise ImportFormatError(f"{fmt}: {path.name}: expected a JSON object mapping 'layer-head' to score lists")
    L, Hq, G = model.num_layers, model.num_attention_heads, model.group_size
    per_query = np.full((L, Hq), np.nan)
    for key, trials in data.items():
        where = f"{fmt}: {path.name}: key {key!r}"
        parts = key.split("-")
        if len(parts) != 2:
            raise ImportFormatError(f"{where}: expected 'layer-head' (e.g. '3-17')")
        layer, head = _int_key(parts[0], where), _int_key(parts[1], where)
        if layer >= L or head >= Hq:
            raise ImportFormatError(f"{where}: out of range for {model.name} ({L} layers x {Hq} query heads)")
        if isinstance(trials, int | float) and not isinstance(trials, bool):
            trials = [trials]  # a pre-averaged score
        if not isinstance(trials, list) or not trials:
            raise ImportFormatError(f"{where}: expected a non-empty list of per-trial scores, got {trials!r}")
        per_query[layer, head] = np.mean([_number(t, f"{where}[{i}]") for i, t in enumerate(trials)])
    missing = np.argwhere(np.isnan(per_query))
    if len(missing):
        layer, head = missing[0]
        raise ImportFormatError(
            f"{fmt}: {path.name}: missing key '{layer}-{head}' ({len(missing)} of {L * Hq} query heads have no scores)"
        )
    kv = per_query.reshape(L, Hq // G, G).max(axis=2)
    notes = {"reduction": "kv score = max over the query heads of the group of the mean over trials"}
    return ImportedPattern(kv, None, (path,), notes=notes)


@importer("razor-attention", default_threshold=None, aliases=("razor", "razorattention"))
def read_razor_attention(path: Path, model: ModelInfo) -> ImportedPattern:
    """{"layer": [kv head ids]}: the listed heads keep the full cache."""
    fmt = "razor-attention"
    data = _read_json(path, fmt)
    if not isinstance(data, dict):
        raise ImportFormatError(f"{fmt}: {path.name}: expected a JSON object mapping layer to a list of KV head ids")
    L, H = model.num_layers, model.num_kv_heads
    table = np.zeros((L, H), dtype=bool)
    for key, heads in data.items():
        where = f"{fmt}: {path.name}: key {key!r}"
        layer = _int_key(key, where)
        if layer >= L:
            raise ImportFormatError(f"{where}: layer out of range ({model.name} has {L} layers)")
        if not isinstance(heads, list):
            raise ImportFormatError(f"{where}: expected a list of KV head ids, got {heads!r}")
        for i, h in enumerate(heads):
            if isinstance(h, bool) or not isinstance(h, int) or not 0 <= h < H:
                raise ImportFormatError(f"{where}[{i}]: expected a KV head id in [0, {H}), got {h!r}")
            table[layer, h] = True
    return ImportedPattern(None, table, (path,))
