"""Look at policies: a per-layer table, the KV cache they save, a PNG heat map, and diffs.

Nothing here imports matplotlib until a PNG is asked for (it is slow to import).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from headpolicy.errors import PolicyMismatchError
from headpolicy.io import atomic_write
from headpolicy.policies.precision import BITS, NATIVE_BITS
from headpolicy.policies.schema import HeadPolicy
from headpolicy.policies.stats import spearman

CONTEXTS = (1024, 4096, 32768, 131072)


def _ctx_label(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def score_table(policy: HeadPolicy) -> np.ndarray:
    """Scores [layers, kv_heads] float64, NaN where the policy has none."""
    return np.array(
        [[np.nan if h.score is None else h.score for h in row] for row in policy.layers], dtype=np.float64
    ).reshape(policy.model.num_layers, policy.model.num_kv_heads)


def format_inspect(policy: HeadPolicy) -> str:
    """The text `headpolicy inspect` prints: summary, KV fractions, per-layer table."""
    m = policy.model
    scores = score_table(policy)
    has_scores = bool(np.isfinite(scores).any())
    lines = [
        f"model       {m.name} ({m.architecture}), {m.shape_str()}, {m.num_attention_heads} query heads",
        f"fingerprint {m.fingerprint}",
        f"method      {policy.provenance.method}" + (f" ({policy.provenance.tool} {policy.provenance.version})"),
        f"retrieval   {policy.num_retrieval}/{policy.num_heads} KV heads ({100 * policy.retrieval_fraction:.1f}%); "
        f"streaming heads keep sink {policy.sink} + window {policy.window}"
        + (" (some heads override)" if _has_overrides(policy) else ""),
        *_compensation_line(policy),
        *_kv_lines(policy),
        "",
    ]
    overrides = _has_overrides(policy)
    header = f"{'layer':>5}  {'retr':>5}  {'retrieval heads':<20}"
    if overrides:  # per-head windows, bits or compensation: what each head keeps
        header += "  per head: R = retrieval, else sink+window"
        header += " (+c: compensated)" if policy.num_compensated else ""
        header += (", @b = KV bits if not 16" if policy.num_quantized else "") + (" (score)" if has_scores else "")
    elif has_scores:
        header += "  scores (* = retrieval)"
    lines.append(header.rstrip())
    for li, row in enumerate(policy.layers):
        ids = [hi for hi, h in enumerate(row) if h.is_retrieval]
        text = f"{li:>5}  {len(ids):>2}/{len(row):<2}  {_ids(ids):<20}"
        cells = []
        for hi, h in enumerate(row):
            score = "" if h.score is None else f"{h.score:.3f}"
            if overrides:
                rule = "R" if h.is_retrieval else "{}+{}".format(*policy.head_window(li, hi))
                rule += "+c" if policy.head_compensates(li, hi) else ""
                bits = policy.head_bits(li, hi)
                rule += f"@{bits}" if bits != NATIVE_BITS else ""
                cells.append(f"{rule}{f' ({score})' if has_scores else ''}".rjust(18 if has_scores else 10))
            elif has_scores:
                cells.append(f"{score or '-'}{'*' if h.is_retrieval else ' '}".rjust(7))
        text += "  " + "".join(cells)
        lines.append(text.rstrip())
    return "\n".join(lines)


def _compensation_line(policy: HeadPolicy) -> list[str]:
    n = policy.num_compensated
    if not n:
        return []
    return [f"compensate  {n} streaming heads keep a compensation token (one slot: the mean key/value they dropped)"]


def _has_overrides(policy: HeadPolicy) -> bool:
    own_rule = any(
        h.sink is not None or h.window is not None or h.compensate is not None for row in policy.layers for h in row
    )
    return own_rule or policy.num_quantized > 0


def _compensation_line(policy: HeadPolicy) -> list[str]:
    n = policy.num_compensated
    if not n:
        return []
    return [f"compensate  {n} streaming heads keep a compensation token (one slot: the mean key/value they dropped)"]


def _kv_lines(policy: HeadPolicy) -> list[str]:
    """KV cache size lines: the fraction of the full cache (dtype-free without quantised heads);
    with quantised heads, the bits per head and, per model dtype, the fraction and MiB per sequence."""
    if not policy.num_quantized:
        fractions = (f"{_ctx_label(c)} {100 * policy.kv_fraction(c):.1f}%" for c in CONTEXTS)
        return ["KV cache vs full: " + "   ".join(fractions)]
    table = policy.bits_table()
    counts = [f"{b} bits: {n} head{'s' * (n != 1)}" for b in BITS if (n := sum(row.count(b) for row in table))]
    lines = [
        f"KV bits     {', '.join(counts)} (16 = the model's dtype; a float16 scale and zero per "
        f"{policy.kv_group} values; retrieval heads keep their last {policy.kv_residual}+ tokens at full precision)"
    ]
    for name, size in (("float32", 4), ("bfloat16", 2)):
        cells = [
            f"{_ctx_label(c)} {100 * policy.kv_fraction(c, dtype_bytes=size):.1f}% "
            f"{policy.kv_bytes(c, dtype_bytes=size) / 2**20:.2f} MiB"
            for c in CONTEXTS
        ]
        lines.append(f"KV cache vs full {name + ':':<10} " + "   ".join(cells))
    return lines


def _ids(ids: list[int]) -> str:
    if not ids:
        return "-"
    text = ",".join(map(str, ids))
    return text if len(text) <= 20 else text[:17] + "..."


def save_heatmap(policy: HeadPolicy, out: str | os.PathLike, *, title: str | None = None) -> Path:
    """Draw layers x KV heads: colour = score, retrieval heads outlined. Writes a PNG atomically."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    m = policy.model
    L, H = m.num_layers, m.num_kv_heads
    scores = score_table(policy)
    retrieval = np.array(policy.retrieval_table(), dtype=bool).reshape(L, H)
    has_scores = bool(np.isfinite(scores).any())
    # Without scores the colour shows the decision itself.
    shown = scores if has_scores else retrieval.astype(np.float64)

    cell = 0.42 if H <= 16 else 0.22
    width = min(24.0, max(5.0, 2.6 + cell * H))
    height = min(30.0, max(3.6, 1.6 + 0.28 * L))
    fig, ax = plt.subplots(figsize=(width, height), dpi=110)
    try:
        if has_scores:
            cmap = matplotlib.colormaps["viridis"].copy()
        else:
            cmap = matplotlib.colors.ListedColormap(["#ececec", "#3b528b"])
        cmap = cmap.with_extremes(bad="#d9d9d9")  # heads without a score
        finite = shown[np.isfinite(shown)]
        vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if vmin == vmax:
            vmin, vmax = vmin - 0.5, vmax + 0.5
        im = ax.imshow(
            np.ma.masked_invalid(shown), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest"
        )
        # Inset outlines, drawn above the grid, so neighbours and the axes frame do not hide them.
        lw = 2.4 if L <= 40 else 1.4
        for li, hi in np.argwhere(retrieval):
            ax.add_patch(
                Rectangle((hi - 0.43, li - 0.43), 0.86, 0.86, fill=False, edgecolor="#ff1f4b", linewidth=lw, zorder=3)
            )
        if L * H <= 160 and has_scores:
            for (li, hi), s in np.ndenumerate(scores):
                if math.isfinite(s):
                    dark = (s - vmin) / (vmax - vmin) < 0.55
                    ax.text(
                        hi, li, f"{s:.2f}", ha="center", va="center", fontsize=7, color="white" if dark else "black"
                    )
        ax.set_xlabel("KV head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(0, H, max(1, H // 16)))
        ax.set_yticks(range(0, L, max(1, L // 32)))
        ax.set_xticks(np.arange(-0.5, H, 1), minor=True)
        ax.set_yticks(np.arange(-0.5, L, 1), minor=True)
        ax.grid(which="minor", color="white", linewidth=0.6, zorder=2)
        ax.tick_params(which="minor", length=0)
        if has_scores:
            fig.colorbar(im, ax=ax, fraction=0.08, pad=0.04).set_label("score")
        head = title or f"{m.name}: {policy.num_retrieval}/{policy.num_heads} retrieval KV heads (red outline)"
        if not has_scores:
            head += ", no scores"
        ax.set_title(
            f"{head}\nKV cache at 32K: {100 * policy.kv_fraction(32768):.1f}% of full "
            f"(sink {policy.sink}, window {policy.window})",
            fontsize=9,
        )
        fig.tight_layout()
        return atomic_write(out, writer=lambda f: fig.savefig(f, format="png"))
    finally:
        plt.close(fig)


# ---- diff -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HeadChange:
    layer: int
    head: int
    before: str  # "retrieval" or "streaming(sink,window[,compensated])", with "@bits" when not 16
    after: str


@dataclass(frozen=True)
class PolicyDiff:
    changed_kind: tuple[HeadChange, ...]
    changed_window: tuple[HeadChange, ...]  # same kind, other sink/window, KV bits or compensation
    spearman: float | None  # None: a policy has no scores
    scored_heads: int
    same_fingerprint: bool


def _describe(policy: HeadPolicy, li: int, hi: int) -> str:
    bits = policy.head_bits(li, hi)
    at = f"@{bits}" if bits != NATIVE_BITS else ""
    if policy.layers[li][hi].is_retrieval:
        return f"retrieval{at}"
    s, w = policy.head_window(li, hi)
    return f"streaming({s},{w}{',compensated' if policy.head_compensates(li, hi) else ''}){at}"


def diff_policies(a: HeadPolicy, b: HeadPolicy) -> PolicyDiff:
    """Heads whose kind (or sink/window/bits/compensation) differ, and the Spearman correlation of their scores."""
    ma, mb = a.model, b.model
    if (ma.num_layers, ma.num_kv_heads) != (mb.num_layers, mb.num_kv_heads):
        raise PolicyMismatchError(
            f"cannot diff policies of different shapes: {ma.shape_str()} ({ma.name}) vs {mb.shape_str()} ({mb.name})"
        )
    kind, window = [], []
    for li in range(ma.num_layers):
        for hi in range(ma.num_kv_heads):
            da, db = _describe(a, li, hi), _describe(b, li, hi)
            if a.layers[li][hi].kind != b.layers[li][hi].kind:
                kind.append(HeadChange(li, hi, da, db))
            elif da != db:
                window.append(HeadChange(li, hi, da, db))
    sa, sb = score_table(a).reshape(-1), score_table(b).reshape(-1)
    both = np.isfinite(sa) & np.isfinite(sb)
    rho = spearman(sa[both], sb[both]) if both.any() else None
    return PolicyDiff(tuple(kind), tuple(window), rho, int(both.sum()), ma.fingerprint == mb.fingerprint)


def format_diff(d: PolicyDiff, a: HeadPolicy, b: HeadPolicy, names: tuple[str, str] = ("A", "B")) -> str:
    na, nb = names
    lines = [
        f"{na}: {a.num_retrieval}/{a.num_heads} retrieval ({a.provenance.method}); "
        f"{nb}: {b.num_retrieval}/{b.num_heads} retrieval ({b.provenance.method})",
    ]
    if not d.same_fingerprint:
        lines.append(f"note: fingerprints differ ({a.model.fingerprint} vs {b.model.fingerprint})")
    if d.spearman is None:
        lines.append("score rank correlation: n/a (a policy has no scores)")
    else:
        lines.append(f"score rank correlation (Spearman, {d.scored_heads} heads): {d.spearman:.3f}")
    lines.append(f"heads that changed kind: {len(d.changed_kind)}")
    for c in d.changed_kind:
        lines.append(f"  layer {c.layer:>3} head {c.head:>3}: {c.before} -> {c.after}")
    if d.changed_window:
        lines.append(f"heads with another sink/window, KV bits or compensation: {len(d.changed_window)}")
        for c in d.changed_window:
            lines.append(f"  layer {c.layer:>3} head {c.head:>3}: {c.before} -> {c.after}")
    return "\n".join(lines)
