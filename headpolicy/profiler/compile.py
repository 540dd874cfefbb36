"""`compile_policy`: choose, per KV head, retrieval or streaming with a window, to keep the full model's answers.

    model, tok = headpolicy.load_model("smollm2-135m")
    report = compile_policy(model, tok, CompileSettings(kv_budget=0.3))
    report.policy.save("smollm2-135m-instruct.yaml")

Named stages, each a small function with explicit inputs and outputs:

    make_calibration  needle tasks (pass key numbers, words, multi-token codes, several keys) at
                      the reference lengths, hidden in natural prose, plus long natural text; a
                      held-out set differs in seed, depth, wording and prose (profiler/tasks.py)
    reference         the full model's answers and text NLL, once (profiler/objective.py)
    score             per KV head and per option, the objective it is estimated to lose:
                      `causal` estimates it for every window of a ladder (per-head windows);
                      the other scorers rank heads for one fixed sink/window
    select            a byte budget (`--kv-budget`): the exact knapsack over the estimates
                      (policies/select.allocate); `--target-drop`: the smallest budget on a grid
                      whose *measured* objective is within tolerance; `--budget`: a head count.
                      `--precision auto` adds KV bits to every head's options (retrieval or
                      streaming, each at 16, 8 or 4 bits), costed in exact bytes (policies/
                      precision.py) and estimated like the windows (scorers/causal.py).
                      `compensate` gives every streaming head a compensation token, whose slot
                      the costs count (compensated streaming heads stay at 16 bits: the runtime
                      refuses a quantised compensated head)
    record            the policy with its scores, settings and everything measured

Scores order the search; measurement decides: every policy compile returns was run teacher-
forced on the calibration set against the full model, and its loss is recorded.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from headpolicy.errors import BudgetError
from headpolicy.io import settings_data
from headpolicy.models import describe_model
from headpolicy.policies.precision import DEFAULT_GROUP, DEFAULT_RESIDUAL, NATIVE_BITS, kv_head_bytes
from headpolicy.policies.schema import MAX_TOKENS, HeadPolicy, ModelInfo, Provenance, compensation_bytes
from headpolicy.policies.select import allocate, budget_heads, select_budget, smallest_passing
from headpolicy.profiler import objective as O
from headpolicy.profiler import tasks as T
from headpolicy.profiler.scorers import get_scorer, scorer_names
from headpolicy.profiler.scorers.causal import ESTIMATES, SELECTION, estimate, estimate_with_precision
from headpolicy.profiler.scorers.causal import losses as selection_losses
from headpolicy.runtime.generate import applied_copy
from headpolicy.version import __version__

log = logging.getLogger(__name__)

KV_GRID = (0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.75, 1.0)
WINDOWS = (64, 128, 256, 512, 1024, 2048)  # the per-head ladder (with the sink)
PRECISIONS = ("native", "auto")
QUANT_BITS = (8, 4)  # what --precision auto may choose besides the model's own dtype


@dataclass
class CompileSettings:
    method: str = "causal"  # a registered scorer; `causal` gives per-head windows (bench/selection.py)
    kv_budget: float | None = None  # KV cache at the reference context <= this fraction of the full cache
    budget: float | None = None  # fraction of KV heads kept retrieval, every other head at sink/window
    target_drop: float = 2.0  # default mode: perplexity and answer likelihood within this many percent
    max_kv_budget: float = 0.5  # target mode: the largest KV budget tried
    kv_grid: tuple[float, ...] = KV_GRID
    sink: int = 64
    window: int = 256  # fixed-window methods, and --budget
    windows: tuple[int, ...] = WINDOWS  # per-head ladder (methods that estimate every window)
    estimate: str = "abs_first_order"  # which of causal.ESTIMATES orders the per-head options
    estimate_blocks: int | None = 4  # causal: query blocks summed per layer and sequence (None: all)
    passes: int = 1  # causal: 2 = estimate again at the policy the first estimates choose (`rescore`)
    repair_seconds: float = 300.0  # measured swaps after the knapsack (byte-budget modes), at most
    time_budget: float = 570.0  # seconds for the whole compile: no repair swap or held-out check ends past it
    repair_patience: int = 3  # stop after this many swaps in a row that do not help
    lengths: tuple[int, ...] = (2048, 4096)  # calibration task lengths: where the policy is used
    kinds: tuple[str, ...] = T.NEEDLE_KINDS
    depths: tuple[float, ...] = (0.2, 0.5, 0.8)  # taken in turn by the (kind, length) pairs
    depth_grid: bool = False  # one task per (kind, length, depth) instead: len(depths) times the tasks
    text_length: int = 4096
    texts: int = 1
    text_from: int = 1024  # text NLL counts from here (streaming heads have lost the start by then)
    heldout: bool = True  # also measure the result on held-out calibration data (report only; within time_budget)
    repeat_length: int = 1024  # the repeated-random-tokens task (echo_induction)
    min_per_layer: int = 0  # --budget only
    reference_context: int = 4096
    seed: int = 0
    compensate: bool = False  # streaming heads keep a compensation token (one slot each, in the budget too)
    # "auto": KV bits per head too (--kv-budget / --target-drop with causal); None (the default):
    # "auto" where it applies, else "native" (the 25% auto policy keeps every eval answer: README)
    precision: str | None = None
    kv_group: int = DEFAULT_GROUP  # quantisation settings of --precision auto (policies/precision.py)
    kv_residual: int = DEFAULT_RESIDUAL
    # --precision auto: the quantisation estimates weighed by each of these against the windows'
    # in the knapsack, every resulting candidate measured and the best kept (`weighed`)
    quant_weights: tuple[float, ...] = (1.0,)

    @property
    def mode(self) -> str:
        return "budget" if self.budget is not None else "kv_budget" if self.kv_budget is not None else "target"

    def check(self) -> None:
        known = scorer_names()
        if self.method not in known:
            raise BudgetError(f"unknown method {self.method!r} (known: {', '.join(known)})")
        if self.budget is not None and self.kv_budget is not None:
            raise BudgetError("give --budget (a fraction of heads) or --kv-budget (a fraction of bytes), not both")
        if self.budget is not None:
            budget_heads(self.budget, 1)  # range check
        for name in ("kv_budget", "max_kv_budget"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int | float) and 0.0 < value <= 1.0):
                raise BudgetError(f"--{name.replace('_', '-')} must be a fraction of the full KV cache in (0, 1], "
                                  f"got {value!r}")  # fmt: skip
        if self.passes not in (1, 2):
            raise BudgetError(f"--passes must be 1 or 2, got {self.passes!r}")
        if self.estimate not in SELECTION:
            raise BudgetError(f"unknown estimate {self.estimate!r} (known: {', '.join(SELECTION)})")
        for name in ("repair_seconds", "time_budget"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise BudgetError(f"--{name.replace('_', '-')} must be >= 0 seconds, got {getattr(self, name)}")
        if not (math.isfinite(self.target_drop) and self.target_drop >= 0):
            raise BudgetError(f"--target-drop must be >= 0 percent, got {self.target_drop}")
        windows = (self.window, *self.windows)
        if not (0 <= self.sink <= MAX_TOKENS and all(1 <= w <= MAX_TOKENS for w in windows)):
            raise BudgetError(
                f"need 0 <= sink <= MAX_TOKENS and 1 <= window <= MAX_TOKENS (= {MAX_TOKENS}), "
                f"got sink {self.sink}, windows {windows}"
            )
        if not self.lengths or any(n < 64 for n in (*self.lengths, self.text_length)):
            raise BudgetError("task and text lengths must be >= 64 tokens")
        if not 0 <= self.text_from < self.text_length - 1:
            raise BudgetError(f"--text-from must lie inside the text ({self.text_length} tokens)")
        if not self.quant_weights or not all(math.isfinite(w) and w > 0 for w in self.quant_weights):
            raise BudgetError(f"--quant-weights must be positive numbers, got {self.quant_weights!r}")
        if not (1 <= self.kv_group <= MAX_TOKENS and 0 <= self.kv_residual <= MAX_TOKENS):
            raise BudgetError(f"need 1 <= --kv-group <= {MAX_TOKENS} and 0 <= --kv-residual <= {MAX_TOKENS}, "
                              f"got {self.kv_group} and {self.kv_residual}")  # fmt: skip
        if self.precision is not None and self.precision not in PRECISIONS:
            raise BudgetError(f"unknown --precision {self.precision!r} (known: {', '.join(PRECISIONS)})")
        if self.auto_precision and (self.method != "causal" or self.budget is not None
                                    or self.estimate == "dropped_mass"):  # fmt: skip
            raise BudgetError("--precision auto needs --method causal with --kv-budget or --target-drop: "
                              "quantisation is weighed against windows in objective units")  # fmt: skip
        bad = [k for k in self.kinds if k not in T.NEEDLE_KINDS]
        if bad or not self.kinds:
            raise BudgetError(f"unknown task kind {bad[0] if bad else ''!r} (known: {', '.join(T.NEEDLE_KINDS)})")

    @property
    def auto_precision(self) -> bool:
        return self.resolved_precision == "auto"

    @property
    def resolved_precision(self) -> str:
        """`precision`, or for None: "auto" with the causal estimates and a byte budget or the
        target search (what it needs), "native" otherwise (--budget, the other scorers)."""
        if self.precision is not None:
            return self.precision
        fits = self.method == "causal" and self.budget is None and self.estimate != "dropped_mass"
        return "auto" if fits else "native"

    def check_budget(self, heads: int, layers: int) -> None:
        """Fail before profiling, not after, when a head budget cannot give every layer its minimum."""
        if self.budget is None:
            return
        n = budget_heads(self.budget, heads)
        if n < self.min_per_layer * layers:
            raise BudgetError(
                f"a budget of {n} retrieval heads cannot give each of {layers} layers {self.min_per_layer} "
                f"(needs at least {self.min_per_layer * layers}); lower --min-per-layer or raise the budget"
            )

    def options(self, per_head: bool) -> tuple[tuple[int, int], ...]:
        """The streaming options selection chooses from: the window ladder, or the one sink/window."""
        return tuple((self.sink, w) for w in self.windows) if per_head else ((self.sink, self.window),)


@dataclass
class CompileReport:
    policy: HeadPolicy
    scores: dict[str, np.ndarray]  # [layers, kv_heads] maps: the method's (and its members')
    seconds: dict[str, float] = field(default_factory=dict)
    estimates: np.ndarray | None = None  # [layers, kv_heads, options] (per-head methods)


@dataclass(frozen=True)
class CalibrationData:
    calib: O.Calibration
    heldout: O.Calibration | None
    scoring: list[T.Task]  # what ranking scorers read: the calibration tasks + one repeated-tokens task


@dataclass(frozen=True)
class Scored:
    """Per KV head, the estimated objective increase of each streaming option (retrieval: 0)."""

    options: tuple[tuple[int, int], ...]  # (sink, window) of each option
    losses: np.ndarray  # [layers, kv_heads, options]; ranking scorers: their score, same for every option
    maps: dict[str, np.ndarray]  # what the scorer(s) produced, [layers, kv_heads]
    per_head: bool  # losses are estimates per option, in objective units
    # --precision auto: [layers, kv_heads, len(QUANT_BITS), 2] estimated loss of quantising the head
    # to each bits value, in a retrieval head's layout [..., 0] and a streaming head's [..., 1]
    quant: np.ndarray | None = None


@dataclass(frozen=True)
class Candidate:
    rules: list[list[tuple[int, int] | None]]  # [layers][kv_heads]: None = retrieval
    budget: float  # what was asked (kv fraction, or head fraction for --budget)
    kv_fraction: float  # over the chosen heads, at the reference context
    loss: O.Loss | None = None
    choice: np.ndarray | None = None  # byte-budget modes: column per chosen head (_knapsack), 0 = retrieval
    bits: list[list[int]] | None = None  # [layers][kv_heads] KV bits; None: every head native
    tried: tuple[dict, ...] = ()  # --quant-weights: each weight's knapsack as measured (`weighed`)


# ---- stage 1: calibration data -------------------------------------------------------------------------
def make_calibration(codec, s: CompileSettings) -> CalibrationData:
    """Calibration tasks at the reference lengths in Austen's prose (wording "A"), long text from
    the same book; held-out: other seeds and depths, wording "B", the Jargon File."""
    def build(wording: str, prose: str, seed: int, depths: Sequence[float]) -> O.Calibration:
        pool = T.prose_pool(codec, prose)
        # one task per (kind, length), the needle depths taking turns: every kind at every length
        # and every depth somewhere, at one forward per task; --depth-grid: every kind at every
        # length and depth (a kind whose turn at the longest length is a shallow needle otherwise
        # never asks for a head that reaches back past the longest window)
        cells = [(kind, length) for kind in s.kinds for length in s.lengths]
        if s.depth_grid:
            cells = [(kind, length, depth) for kind, length in cells for depth in depths]
        else:
            cells = [(kind, length, depths[i % len(depths)]) for i, (kind, length) in enumerate(cells)]
        tasks = [T.make_task(kind, codec, length, depth, seed * 1000 + i, pool=pool, wording=wording)
                 for i, (kind, length, depth) in enumerate(cells)]  # fmt: skip
        rng = np.random.default_rng(seed)
        texts = []
        for _ in range(s.texts):
            start = int(rng.integers(0, len(pool) - s.text_length))
            texts.append(tuple(pool[start : start + s.text_length]))
        return O.Calibration(tuple(tasks), tuple(texts), s.text_from)

    calib = build("A", T.CALIBRATION_PROSE[0], s.seed, s.depths)
    heldout = None
    if s.heldout:
        shifted = tuple(round(min(0.95, d + 0.15), 3) for d in s.depths)
        heldout = build("B", T.CALIBRATION_PROSE[1], s.seed + 7919, shifted)
    repeat = T.repeated_tokens(codec.vocab_size, s.repeat_length, s.seed, low=min(100, codec.vocab_size // 2))
    return CalibrationData(calib, heldout, [*calib.tasks, repeat])


# ---- stage 2: score ----------------------------------------------------------------------------------------
def score(model, data: CalibrationData, ref: O.Reference, s: CompileSettings, *, progress=False) -> Scored:
    """The method's per-head, per-option loss estimates."""
    if s.method == "causal" and s.budget is None:
        options = s.options(per_head=True)
        est, quant = _causal_losses(model, data, ref, s, options, None, progress)
        column = options.index((s.sink, s.window)) if (s.sink, s.window) in options else len(options) // 2
        return Scored(options, est, {"causal": est[:, :, column]}, per_head=True, quant=quant)
    maps = get_scorer(s.method).score_maps(
        model, data.scoring, sink=s.sink, window=s.window, bar=lambda n, desc: _bar(n, desc, progress)
    )
    return Scored(s.options(per_head=False), maps[s.method][:, :, None], maps, per_head=False)


def _causal_losses(model, data: CalibrationData, ref: O.Reference, s: CompileSettings, options, rules, progress):
    """The causal estimates as selection losses [layers, kv_heads, options] and, with --precision
    auto, the quantisation losses (Scored.quant); linearised at `rules` (None: the full model)."""
    n = sum(ref.answered) + len(data.calib.texts)
    # quantisation costs come in the first four estimates; the composite ones use abs_first_order's
    qwhich = ESTIMATES.index(s.estimate if s.estimate in ESTIMATES[:4] else "abs_first_order")
    quant = None
    desc = "score causal" if rules is None else "rescore at the policy"
    with _bar(n, desc, progress) as bar:
        run = dict(ref=ref, chunks=s.estimate_blocks, samples=2 if s.estimate == "fisher" else 0, rules=rules,
                   progress=bar)  # fmt: skip
        if s.auto_precision:
            table, qest = estimate_with_precision(model, data.calib, options, QUANT_BITS, kv_group=s.kv_group,
                                                  kv_residual=s.kv_residual, **run)  # fmt: skip
            quant = qest[qwhich]
        else:
            table = estimate(model, data.calib, options, **run)
    return selection_losses(table, s.estimate), quant


def rescore(model, data: CalibrationData, ref: O.Reference, s: CompileSettings, scored: Scored, info: ModelInfo,
            dtype_bytes: int = 4, progress: bool = False) -> Scored:  # fmt: skip
    """The second pass (--passes 2): the causal estimates again, linearised at the policy the
    first ones choose at the budget (--kv-budget, or --max-kv-budget in target mode), and each
    option's loss the larger of the two.

    At the full model, a head that carries an answer other heads carry too looks cheap: streaming
    it alone loses nothing. At a policy that streams the others, its gradient shows the whole
    cost, and only the heads that still carry the answer show it (scorers/causal.py). The
    linearisation point keeps the first choice's windows only, not its KV bits: with --precision
    auto the forward runs every head at the model's precision."""
    fraction = s.kv_budget if s.kv_budget is not None else s.max_kv_budget
    point = at_kv_budget(scored, info, s, fraction, dtype_bytes)
    est, quant = _causal_losses(model, data, ref, s, scored.options, point.rules, progress)
    quant = None if quant is None else np.maximum(scored.quant, quant)
    return replace(scored, losses=np.maximum(scored.losses, est), quant=quant)


# ---- stage 3: select -------------------------------------------------------------------------------------------
def option_costs(options: Sequence[tuple[int, int]], context: int, compensate: bool = False) -> np.ndarray:
    """Cached tokens of [retrieval, *options] at `context` tokens (+ 1: a compensation token's slot,
    as HeadPolicy.kv_tokens counts it)."""
    extra = int(bool(compensate))
    return np.array([context] + [min(context, sink + window) + extra for sink, window in options], dtype=np.int64)


Column = tuple[tuple[int, int] | None, int]  # (rule: None = retrieval, else (sink, window); KV bits)


def _knapsack(
    scored: Scored, info: ModelInfo, s: CompileSettings, dtype_bytes: int = 4
) -> tuple[list[Column], np.ndarray, np.ndarray]:
    """Every chosen head's options as columns with their [heads, columns] losses and costs, for
    `allocate`; column 0 is always retrieval at the model's own precision (the full cost).

    native: [retrieval, *streaming options], costs in cached tokens at the reference context
    (+ 1 for a compensation token's slot, as HeadPolicy.kv_tokens counts it).
    auto: each of those at 16, 8 and 4 bits (compensated streaming heads at 16 only), costs in
    exact bytes in the model's dtype as a cache reserved for the reference context allocates
    them (precision.kv_head_bytes(allocated=True): a quantised retrieval head's residual at its
    buffer's capacity, so the budget bounds what the runtime holds, not only what the policy's
    formula counts; + schema.compensation_bytes for a compensation token), losses the streaming
    estimate plus the quantisation estimate of the head's layout (retrieval or streaming):
    additive, each measured with the other part exact.
    """
    chosen, H, ctx = info.policy_layers, info.num_kv_heads, s.reference_context
    losses = scored.losses[chosen].reshape(len(chosen) * H, -1)
    if not scored.per_head:  # a ranking score: only its order matters; keep the best heads
        losses = losses - losses.min()
    stream = np.maximum(losses, 0.0)
    if scored.quant is None:
        columns: list[Column] = [(None, NATIVE_BITS)] + [(o, NATIVE_BITS) for o in scored.options]
        table = np.concatenate([np.zeros((losses.shape[0], 1)), stream], axis=1)
        costs = np.tile(option_costs(scored.options, ctx, s.compensate), (table.shape[0], 1))
        return columns, table, costs
    quant = np.maximum(scored.quant[chosen].reshape(len(chosen) * H, len(QUANT_BITS), 2), 0.0)
    columns = [(rule, b) for rule in (None, *scored.options) for b in (NATIVE_BITS, *QUANT_BITS)
               if rule is None or b == NATIVE_BITS or not s.compensate]  # fmt: skip
    table = np.zeros((losses.shape[0], len(columns)))
    cost = np.zeros(len(columns), dtype=np.int64)
    for c, (rule, b) in enumerate(columns):
        layout = 0 if rule is None else 1
        table[:, c] = (0.0 if rule is None else stream[:, scored.options.index(rule)]) + (
            0.0 if b == NATIVE_BITS else quant[:, QUANT_BITS.index(b), layout])
        sink, window = (None, None) if rule is None else rule
        cost[c] = kv_head_bytes(ctx, head_dim=info.head_dim, dtype_bytes=dtype_bytes, bits=b, sink=sink,
                                window=window, group=s.kv_group, residual=s.kv_residual, allocated=True)  # fmt: skip
        if rule is not None and s.compensate:
            cost[c] += compensation_bytes(info.head_dim, dtype_bytes)
    return columns, table, np.tile(cost, (table.shape[0], 1))


option_table = _knapsack  # the public name (bench, tests)


def _byte_budget(costs: np.ndarray, fraction: float) -> int:
    """`fraction` of the full cache of the chosen heads, in the costs' units (column 0: a full head)."""
    return int(math.floor(fraction * int(costs[:, 0].sum()) + 1e-6))


def _candidate(
    scored: Scored, info: ModelInfo, s: CompileSettings, choice: np.ndarray, fraction: float, dtype_bytes: int = 4
) -> Candidate:
    chosen, H = info.policy_layers, info.num_kv_heads
    columns, _, costs = _knapsack(scored, info, s, dtype_bytes)
    rules: list[list] = [[(s.sink, s.window)] * H for _ in range(info.num_layers)]
    bits: list[list[int]] = [[NATIVE_BITS] * H for _ in range(info.num_layers)]
    for i, li in enumerate(chosen):
        rules[li] = [columns[c][0] for c in choice[i * H : (i + 1) * H]]
        bits[li] = [columns[c][1] for c in choice[i * H : (i + 1) * H]]
    kv = float(costs[np.arange(len(choice)), choice].sum()) / float(costs[:, 0].sum())
    return Candidate(rules, fraction, kv, choice=choice, bits=bits if scored.quant is not None else None)


def at_kv_budget(scored: Scored, info: ModelInfo, s: CompileSettings, fraction: float, dtype_bytes: int = 4
                 ) -> Candidate:  # fmt: skip
    """The least estimated loss within `fraction` of the full KV cache of the chosen heads (in
    tokens natively; in bytes of the model's dtype, `dtype_bytes` an element, with --precision auto)."""
    _, table, costs = _knapsack(scored, info, s, dtype_bytes)
    choice = allocate(table, costs, _byte_budget(costs, fraction))
    return _candidate(scored, info, s, choice, fraction, dtype_bytes)


def repair(
    cand: Candidate,
    scored: Scored,
    info: ModelInfo,
    s: CompileSettings,
    measure: Measurer,
    deadline: float,
    dtype_bytes: int = 4,
) -> tuple[Candidate, list[dict]]:
    """Swaps under the same byte budget, each measured, kept when the measured objective falls.

    The estimates add up per-head effects; the model does not quite. So, riskiest first (largest
    estimated loss at its current option), one streaming head at a time is given more bytes
    (a larger window or the full cache) and the knapsack is solved again around it: the bytes come
    from the heads the estimates find cheapest to shrink. A swap is measured and kept if the
    objective falls. Stops after `repair_patience` swaps in a row that do not help, when no
    move is left, or when another measurement would end past `deadline` (time.perf_counter())."""
    columns, table, costs = _knapsack(scored, info, s, dtype_bytes)
    budget = _byte_budget(costs, cand.budget)
    best, trace, seen, misses = cand, [], {tuple(cand.choice)}, 0
    rows = np.arange(len(cand.choice))
    while misses < s.repair_patience and time.perf_counter() + measure.seconds < deadline:
        at = best.choice
        risk = np.where(at > 0, table[rows, at], -np.inf)
        move = None
        for u in np.argsort(-risk, kind="stable"):
            if at[u] == 0:
                break  # only retrieval heads are left
            allowed = np.ones(table.shape, dtype=bool)
            allowed[u] = costs[u] > costs[u, at[u]]  # u gets more bytes than it has
            try:
                choice = allocate(table, costs, budget, allowed)
            except BudgetError:
                continue
            if tuple(choice) not in seen:
                move = int(u), choice
                break
        if move is None:
            break
        u, choice = move
        seen.add(tuple(choice))
        trial = _measured(_candidate(scored, info, s, choice, cand.budget, dtype_bytes), measure)
        kept = trial.loss.value < best.loss.value
        layer, head = info.policy_layers[u // info.num_kv_heads], u % info.num_kv_heads
        option = lambda c: _describe(columns[c])  # noqa: E731
        trace.append({"layer": layer, "kv_head": head, "from": option(at[u]), "to": option(choice[u]),
                      "changed_heads": int((choice != at).sum()), "value": round(trial.loss.value, 6),
                      "kept": kept})  # fmt: skip
        log.info("repair: layer %d head %d %s -> %s (%d heads change): %.4f %s", layer, head, option(at[u]),
                 option(choice[u]), (choice != at).sum(), trial.loss.value, "kept" if kept else "undone")  # fmt: skip
        best, misses = (trial, 0) if kept else (best, misses + 1)
    return (best if best is cand else replace(best, tried=cand.tried)), trace  # a kept swap keeps the weights' record


def _describe(column: Column) -> str:
    rule, bits = column
    return ("full" if rule is None else f"window {rule[1]}") + ("" if bits == NATIVE_BITS else f" at {bits} bits")


def at_head_budget(scored: Scored, info: ModelInfo, s: CompileSettings) -> Candidate:
    """--budget: the top fraction of KV heads by score keep everything, the rest sink/window."""
    chosen = info.policy_layers
    ranking = scored.maps[s.method] if s.method in scored.maps else scored.losses[:, :, 0]
    sub = select_budget(ranking[chosen], s.budget, min_per_layer=s.min_per_layer)
    rules: list[list] = [[(s.sink, s.window)] * info.num_kv_heads for _ in range(info.num_layers)]
    for i, li in enumerate(chosen):
        rules[li] = [None if keep else (s.sink, s.window) for keep in sub[i]]
    ctx = s.reference_context
    cost = option_costs([(s.sink, s.window)], ctx, s.compensate)
    kv = float((sub * cost[0] + ~sub * cost[1]).sum()) / (sub.size * ctx)
    return Candidate(rules, s.budget, kv)


class Measurer:
    """Measured objective of candidates: each one applied to a copy of the model and run on `calib`
    (make_policy: Candidate -> HeadPolicy)."""

    def __init__(self, model, info: ModelInfo, calib: O.Calibration, ref: O.Reference, make_policy, progress: bool):
        self.model, self.info, self.calib, self.ref = model, info, calib, ref
        self.make_policy, self.progress = make_policy, progress
        self.runs = 0
        self.seconds = 0.0  # how long the last measurement took

    def __call__(self, cand: Candidate) -> O.Loss:
        native = cand.bits is None or all(b == NATIVE_BITS for row in cand.bits for b in row)
        if native and all(r is None for li in self.info.policy_layers for r in cand.rules[li]):
            return O.Loss(0.0, 0.0, 0.0, 1.0, 0.0, sum(self.ref.answered))  # every head full: the model itself
        model = applied_copy(self.model, self.make_policy(cand))
        n = len(self.calib.tasks) + len(self.calib.texts)
        t = time.perf_counter()
        with _bar(n, f"measure KV {100 * cand.kv_fraction:.0f}%", self.progress) as bar:
            loss = O.measure(model, self.calib, self.ref, progress=bar)
        self.runs, self.seconds = self.runs + 1, time.perf_counter() - t
        log.info("KV %.1f%%: %s", 100 * cand.kv_fraction, loss.describe())
        return loss


def select(
    scored: Scored,
    info: ModelInfo,
    s: CompileSettings,
    measure: Measurer,
    dtype_bytes: int = 4,
    until: float = math.inf,
) -> tuple[Candidate, list[dict], list[dict]]:
    """The candidate compile returns, measured; the budgets tried (target mode); the repair swaps
    (within s.repair_seconds, and ending by `until`, a time.perf_counter()). dtype_bytes: the
    model's element size (what quantised heads' byte costs are relative to)."""
    if s.mode == "budget":
        cand = at_head_budget(scored, info, s)
        return _measured(cand, measure), [], []
    deadline = lambda: min(until, time.perf_counter() + s.repair_seconds)  # noqa: E731
    if s.mode == "kv_budget":
        cand, weighed_as = weighed(scored, info, s, s.kv_budget, measure, dtype_bytes)
        repaired, swaps = repair(cand, weighed_as, info, s, measure, deadline(), dtype_bytes)
        return repaired, [], swaps
    tables: dict[float, Scored] = {}  # budget -> the estimates its best candidate was chosen with

    def check(fraction: float) -> tuple[bool, Candidate]:
        cand, tables[fraction] = weighed(scored, info, s, fraction, measure, dtype_bytes)
        return cand.loss.within(s.target_drop), cand

    grid = [b for b in s.kv_grid if b <= s.max_kv_budget + 1e-9]
    if not grid:
        raise BudgetError(f"no KV budget in the search grid is <= --max-kv-budget {s.max_kv_budget}")
    found = smallest_passing(grid, check)
    trace = [{"kv_budget": b, "kv_fraction": round(c.kv_fraction, 6), "ok": ok, **c.loss.as_dict()}
             for b, ok, c in found.trace]  # fmt: skip
    # repair where it pays most: the largest failing budget below the passing one may pass after
    # swaps (a smaller cache); else the passing one gets better (or nothing fails below it)
    failed = [c for b, ok, c in found.trace if not ok and (found.budget is None or b < found.budget)]
    if failed:
        near = max(failed, key=lambda c: c.budget)
        repaired, swaps = repair(near, tables[near.budget], info, s, measure, deadline(), dtype_bytes)
        if repaired.loss.within(s.target_drop):
            trace.append({"kv_budget": near.budget, "kv_fraction": round(repaired.kv_fraction, 6), "ok": True,
                          "repaired": True, **repaired.loss.as_dict()})  # fmt: skip
            return repaired, trace, swaps
    if found.budget is None:
        tried = "; ".join(f"KV {100 * b:.0f}%: {c.loss.describe()}" for b, _, c in found.trace)
        raise BudgetError(
            f"no KV budget up to {100 * grid[-1]:.0f}% keeps perplexity and answers within {s.target_drop:g}% of the "
            f"full model ({tried}); raise --max-kv-budget or --target-drop, or pick one with --kv-budget"
        )
    if failed:  # the repair above had its chance; the passing policy is returned as measured
        return found.result, trace, swaps
    repaired, swaps = repair(found.result, tables[found.budget], info, s, measure, deadline(), dtype_bytes)
    return repaired, trace, swaps


def weighed(scored: Scored, info: ModelInfo, s: CompileSettings, fraction: float, measure: Measurer,
            dtype_bytes: int = 4) -> tuple[Candidate, Scored]:  # fmt: skip
    """The knapsack at `fraction`, measured, for each of --quant-weights: the quantisation
    estimates times the weight against the windows' (--precision auto; native: the one
    candidate). Returns the candidate with the least measured objective and the estimates it
    was chosen with (what its repair swaps against); each candidate tried is on its `tried`.

    Why: both estimates are first-order sums of |gradient x output change|, but quantisation
    noise changes every position a little, in both directions, where eviction takes a few keys
    away for good; the sum overstates the first against the second by a factor no estimate
    tells. On SmolLM2 at 12.5% the weight-1 knapsack kept 17 heads whole at int8 where 48 whole
    at int4 kept more calibration answers (README, Compile and evaluate)."""
    weights = s.quant_weights if scored.quant is not None else (1.0,)
    best, best_table, tried, seen = None, scored, [], {}
    for w in weights:
        table = scored if w == 1.0 else replace(scored, quant=scored.quant * w)
        cand = at_kv_budget(table, info, s, fraction, dtype_bytes)
        key = tuple(cand.choice)
        cand = seen[key] if key in seen else _measured(cand, measure)
        seen[key] = cand
        tried.append({"quant_weight": w, "retrieval_heads": sum(r is None for row in cand.rules for r in row),
                      "kv_fraction": round(cand.kv_fraction, 6), **cand.loss.as_dict()})  # fmt: skip
        if best is None or cand.loss.value < best.loss.value:
            best, best_table = cand, table
    return replace(best, tried=tuple(tried) if len(weights) > 1 else ()), best_table


def _measured(cand: Candidate, measure: Measurer) -> Candidate:
    return replace(cand, loss=measure(cand))


# ---- stage 4: record ----------------------------------------------------------------------------------------------
def record(
    info: ModelInfo,
    s: CompileSettings,
    data: CalibrationData,
    ref: O.Reference,
    scored: Scored,
    chosen: Candidate,
    trace: list[dict],
    swaps: list[dict],
    heldout: O.Loss | None,
    seconds: dict[str, float],
    dtype_bytes: int = 4,
    heldout_skipped: str | None = None,
) -> HeadPolicy:
    """The policy: the chosen rules, the scores, the settings and what was measured."""
    draft = _candidate_policy(info, chosen, scored, s)
    ctx = s.reference_context
    results = {
        "reference_context": ctx,
        "mode": s.mode,
        "retrieval_heads": draft.num_retrieval,
        "kv_fraction": round(draft.kv_fraction(ctx, dtype_bytes=dtype_bytes), 6),
        "kv_fraction_chosen_heads": round(chosen.kv_fraction, 6),
        "kv_bytes": draft.kv_bytes(ctx, dtype_bytes=dtype_bytes),
        "full_kv_bytes": draft.full_kv_bytes(ctx, dtype_bytes=dtype_bytes),
        "dtype_bytes": dtype_bytes,
        "precision": s.precision,
        "calibration": {"loss": chosen.loss.as_dict(), "tasks": len(data.calib.tasks), "answered": sum(ref.answered),
                        "kinds": list(s.kinds), "lengths": list(s.lengths), "prose": T.CALIBRATION_PROSE[0],
                        "text_tokens": s.text_length * len(data.calib.texts), "text_from": s.text_from},
    }  # fmt: skip
    if heldout is not None:
        results["heldout"] = {"loss": heldout.as_dict(), "wording": "B", "prose": T.CALIBRATION_PROSE[1]}
    elif heldout_skipped is not None:
        results["heldout"] = {"skipped": heldout_skipped}
    if trace:
        results["search"] = trace
    if swaps:
        results["repair"] = swaps
    if chosen.tried:
        results["quant_weights"] = list(chosen.tried)
    results["compile_seconds"] = round(seconds["total"], 1)
    provenance = Provenance(
        version=__version__,
        method=s.method + ("+windows" if scored.per_head else ""),
        settings=settings_data(s),
        seed=s.seed,
        created=datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat(),
    )
    return draft.replace(results=results, provenance=provenance)


def _policy(
    info: ModelInfo,
    rules,
    scored: Scored,
    compensate: bool = False,
    *,
    bits: list[list[int]] | None = None,
    kv_group: int = DEFAULT_GROUP,
    kv_residual: int = DEFAULT_RESIDUAL,
) -> HeadPolicy:
    # per-head estimates: a head's score is the most streaming can cost it (its smallest window)
    scores = scored.losses.max(axis=2) if scored.per_head else scored.losses[:, :, 0]
    return HeadPolicy.from_rules(info, rules, scores=scores, compensate=compensate, bits=bits, kv_group=kv_group,
                                 kv_residual=kv_residual)  # fmt: skip


def _candidate_policy(info: ModelInfo, cand: Candidate, scored: Scored, s: CompileSettings) -> HeadPolicy:
    """The policy of a candidate under the settings (compensation, quantisation settings)."""
    return _policy(info, cand.rules, scored, s.compensate, bits=cand.bits, kv_group=s.kv_group,
                   kv_residual=s.kv_residual)  # fmt: skip


# ---- the pipeline ----------------------------------------------------------------------------------------------
def compile_policy(
    model, tokenizer, settings: CompileSettings | None = None, *, progress: bool = False, name: str | None = None
) -> CompileReport:
    """Run the stages on `model` and return a CompileReport whose `.policy` is ready to save or apply."""
    s = settings or CompileSettings()
    s.check()
    s = replace(s, precision=s.resolved_precision)  # recorded as it ran
    codec = T.as_codec(tokenizer)
    info = describe_model(model, name)
    dtype_bytes = next(model.parameters()).element_size()
    s.check_budget(len(info.policy_layers) * info.num_kv_heads, len(info.policy_layers))
    secs: dict[str, float] = {}
    t_all = time.perf_counter()

    with _timed(secs, "calibration"):
        data = make_calibration(codec, s)
    with _timed(secs, "reference"):
        n = len(data.calib.tasks) + len(data.calib.texts)
        with _bar(n, "full model", progress) as bar:
            ref = O.reference(model, data.calib, progress=bar)
    if not any(ref.answered):  # only the text terms are left to keep
        log.warning("the full model answers none of the %d calibration tasks; selection keeps its text NLL only",
                    len(data.calib.tasks))  # fmt: skip
    with _timed(secs, "score"):
        scored = score(model, data, ref, s, progress=progress)
    if s.passes == 2 and scored.per_head and s.mode != "budget":
        with _timed(secs, "rescore"):
            scored = rescore(model, data, ref, s, scored, info, dtype_bytes, progress)
    measure = Measurer(model, info, data.calib, ref, lambda cand: _candidate_policy(info, cand, scored, s), progress)
    with _timed(secs, "select"):
        chosen, trace, swaps = select(scored, info, s, measure, dtype_bytes, until=t_all + s.time_budget)
    heldout, skipped = None, None
    if data.heldout is not None:
        # report only: it runs when it fits in --time-budget, estimated as a reference pass over
        # the held-out set plus one measurement as long as the last
        need = secs["reference"] * _sequences(data.heldout) / _sequences(data.calib) + measure.seconds
        late = time.perf_counter() + need - (t_all + s.time_budget)
        if late > 0:
            skipped = (f"not run: it would end about {late:.0f} s past --time-budget {s.time_budget:g} s "
                       f"(about {need:.0f} s; raise --time-budget to run it)")  # fmt: skip
            log.warning("held-out check %s", skipped)
        else:
            with _timed(secs, "heldout"):
                href = O.reference(model, data.heldout)
                heldout = Measurer(model, info, data.heldout, href, measure.make_policy, progress)(chosen)
    secs["total"] = time.perf_counter() - t_all
    policy = record(info, s, data, ref, scored, chosen, trace, swaps, heldout, secs, dtype_bytes, skipped)
    log.info("compiled: %d/%d retrieval heads, KV %.1f%% at %d, %s", policy.num_retrieval, policy.num_heads,
             100 * policy.results["kv_fraction"], s.reference_context, chosen.loss.describe())  # fmt: skip
    est = scored.losses if scored.per_head else None
    return CompileReport(policy, scored.maps, secs, est)


def _sequences(calib: O.Calibration) -> int:
    return max(1, len(calib.tasks) + len(calib.texts))


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


@contextlib.contextmanager
def _timed(seconds: dict[str, float], stage: str):
    t = time.perf_counter()
    yield
    seconds[stage] = time.perf_counter() - t

