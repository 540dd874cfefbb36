"""`compile_policy`: profile a model on synthetic tasks and write down which KV heads keep the full cache.

    model, tok = headpolicy.load_model("smollm2-135m")
    report = compile_policy(model, tok, CompileSettings(budget=0.25))
    report.policy.save("smollm2-135m-instruct.yaml")

Named stages, each a small function with explicit inputs and outputs:

    make_tasks  sample a haystack with the model itself (long enough that no task repeats it)
                and build the scoring tasks (passkey, multikey, repeated random tokens) and the
                held-out tasks (other seeds, depths and lengths)
    score       every KV head with the chosen scorer -> {name: [layers, kv_heads]}
    select      a fixed budget, or the closed loop: the smallest budget whose held-out accuracy
                stays within `target_drop` points of the full model's
    verify      held-out accuracy of the chosen heads, through apply + the split cache
                (runtime/generate.py: what a user of the policy gets)
    record      scores, settings and the measured results, into the HeadPolicy

The held-out check is the expensive part (a 4K-token prompt is ~13 s on 2 CPU cores), so the
`Verifier` runs the full model once, candidates run only the tasks the full model answers
(the others count as misses: the policy accuracy recorded is a lower bound), and a search
candidate stops at its first miss past the tolerance.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from headpolicy.errors import BudgetError
from headpolicy.models import describe_model
from headpolicy.policies.schema import MAX_TOKENS, HeadPolicy, ModelInfo, Provenance
from headpolicy.policies.select import DEFAULT_GRID, budget_heads, select_budget, select_closed_loop
from headpolicy.profiler import tasks as T
from headpolicy.profiler.scorers import get_scorer, scorer_names
from headpolicy.runtime.generate import answers, applied_copy
from headpolicy.version import __version__

log = logging.getLogger(__name__)


@dataclass
class CompileSettings:
    method: str = "attention_mass"  # a registered scorer (combined ones too); default from bench/scorers.py (README)
    budget: float | None = None  # fraction of KV heads kept retrieval; None = closed loop
    target_drop: float = 2.0  # closed loop: allowed held-out accuracy drop, in points
    sink: int = 64
    window: int = 256
    lengths: tuple[int, ...] = (1024,)  # scoring task lengths
    depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    heldout_lengths: tuple[int, ...] = (2048, 4096)
    heldout_depths: tuple[float, ...] = (0.25, 0.5, 0.75)
    repeat_length: int = 1024
    haystack_tokens: int | None = None  # sampled pool size; default: the longest task
    min_per_layer: int = 0
    max_budget: float = 1.0
    budgets: tuple[float, ...] = DEFAULT_GRID
    reference_context: int = 4096
    verify: bool = True  # budget mode: also measure held-out accuracy (full vs policy)
    seed: int = 0

    def check(self) -> None:
        known = scorer_names()
        if self.method not in known:
            raise BudgetError(f"unknown method {self.method!r} (known: {', '.join(known)})")
        if self.budget is not None:
            budget_heads(self.budget, 1)  # range check
            if self.budget > self.max_budget:
                raise BudgetError(f"budget {self.budget} exceeds --max-budget {self.max_budget}")
        if self.target_drop < 0:
            raise BudgetError(f"--target-drop must be >= 0 points, got {self.target_drop}")
        if not (0 <= self.sink <= MAX_TOKENS and 1 <= self.window <= MAX_TOKENS):
            raise BudgetError(
                f"need 0 <= sink <= MAX_TOKENS and 1 <= window <= MAX_TOKENS (= {MAX_TOKENS}), "
                f"got sink {self.sink}, window {self.window}"
            )
        if not self.lengths or any(n < 64 for n in (*self.lengths, *self.heldout_lengths)):
            raise BudgetError("task lengths must be >= 64 tokens")

    def check_budget(self, heads: int, layers: int) -> None:
        """Fail before profiling, not after, when a fixed budget cannot give every layer its minimum."""
        if self.budget is None:
            return
        n = budget_heads(self.budget, heads)
        if n < self.min_per_layer * layers:
            raise BudgetError(
                f"a budget of {n} retrieval heads cannot give each of {layers} layers {self.min_per_layer} "
                f"(needs at least {self.min_per_layer * layers}); lower --min-per-layer or raise the budget"
            )


@dataclass
class CompileReport:
    policy: HeadPolicy
    scores: dict[str, np.ndarray]  # the method's map and, for a combined method, its members'
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskSet:
    scoring: list[T.Task]
    heldout: list[T.Task]  # empty when nothing is verified


@dataclass(frozen=True)
class Selection:
    table: np.ndarray  # bool [layers, kv_heads], True = retrieval
    budget: float
    accuracy: float | None  # held-out accuracy of the chosen heads (None: not verified)
    trace: list[dict]  # closed loop: every budget tried


# ---- stage 1: tasks ---------------------------------------------------------------------------------
def haystack_pool(model, codec, s: CompileSettings) -> list[int]:
    """The sampled haystack every compile task cuts its filler from (long enough not to repeat)."""
    return T.sample_haystack(model, codec, s.haystack_tokens or max(*s.lengths, *s.heldout_lengths), seed=s.seed)


def scoring_tasks(codec, s: CompileSettings, pool: Sequence[int]) -> list[T.Task]:
    out = T.task_grid(codec, kinds=["passkey"], lengths=s.lengths, depths=s.depths, seed=s.seed, pool=pool)
    out += T.task_grid(codec, kinds=["multikey"], lengths=s.lengths, depths=s.depths, seed=s.seed)
    out.append(T.repeated_tokens(codec.vocab_size, s.repeat_length, s.seed, low=min(100, codec.vocab_size // 2)))
    return out


def heldout_tasks(codec, s: CompileSettings, pool: Sequence[int]) -> list[T.Task]:
    """Other seeds, depths and lengths than the scoring tasks; passkey and multikey, sampled haystack."""
    seed = s.seed + 7919
    lengths, depths = s.heldout_lengths, s.heldout_depths
    return T.task_grid(codec, kinds=T.NEEDLE_KINDS, lengths=lengths, depths=depths, seed=seed, pool=pool)


def make_tasks(model, codec, s: CompileSettings) -> TaskSet:
    pool = haystack_pool(model, codec, s)
    verified = s.budget is None or s.verify
    return TaskSet(scoring_tasks(codec, s, pool), heldout_tasks(codec, s, pool) if verified else [])


# ---- stage 2: score -----------------------------------------------------------------------------------
def score(model, tasks: TaskSet, s: CompileSettings, *, progress: bool = False) -> dict[str, np.ndarray]:
    """{name: [layers, kv_heads]} of `s.method` (and its members, for a combined method)."""
    return get_scorer(s.method).score_maps(
        model, tasks.scoring, sink=s.sink, window=s.window, bar=lambda n, desc: _bar(n, desc, progress)
    )


# ---- stages 3 and 4: select, verify ---------------------------------------------------------------------
def allowed_misses(tolerance: float, n_tasks: int) -> int:
    """Tasks a policy may lose and stay within `tolerance` points on `n_tasks` tasks."""
    return int(tolerance * n_tasks / 100.0 + 1e-9)


class Verifier:
    """Held-out accuracy of head tables, measured through apply + the split cache.

    The full model runs every held-out task once (here, at construction); a candidate runs only
    the tasks the full model answers, so its accuracy (over all held-out tasks) is a lower bound.
    """

    def __init__(self, model, codec, heldout: list[T.Task], make_policy, *, tolerance: float, progress: bool):
        self.model, self.codec, self.heldout, self.make_policy = model, codec, heldout, make_policy
        self.tolerance, self.progress = tolerance, progress
        with _bar(len(heldout), "held-out full model", progress) as bar:
            self.answered = [o.task for o in answers(model, codec.decode, heldout, progress=bar) if o.correct]
        self.full_accuracy = 100.0 * len(self.answered) / len(heldout)
        self.stopped: dict[int, bool] = {}  # retrieval heads -> stopped at its first miss past the tolerance

    def accuracy(self, table: np.ndarray, *, search: bool = True) -> float:
        """Held-out accuracy (percent) of `table`; a search candidate stops once it cannot pass."""
        k = int(table.sum())
        limit = allowed_misses(self.tolerance, len(self.heldout)) if search else None
        model = applied_copy(self.model, self.make_policy(table))
        with _bar(len(self.answered), f"held-out {k} retrieval heads", self.progress) as bar:
            outs = answers(model, self.codec.decode, self.answered, progress=bar, max_misses=limit)
        self.stopped[k] = len(outs) < len(self.answered)
        return 100.0 * sum(o.correct for o in outs) / len(self.heldout)


def select(scores: np.ndarray, info: ModelInfo, s: CompileSettings, verifier: Verifier | None) -> Selection:
    """Choose the retrieval heads of the model's full-attention layers (a hybrid model's own sliding
    layers stay as they are, ModelInfo.native_windows, and do not count in the budget)."""
    chosen = info.policy_layers

    def expand(sub: np.ndarray) -> np.ndarray:
        table = np.zeros(scores.shape, dtype=bool)
        table[chosen] = sub
        return table

    if s.budget is not None:
        table = expand(select_budget(scores[chosen], s.budget, min_per_layer=s.min_per_layer))
        accuracy = verifier.accuracy(table, search=False) if verifier is not None else None
        return Selection(table, s.budget, accuracy, [])
    grid = [b for b in s.budgets if b <= s.max_budget]
    if not grid:
        raise BudgetError(f"no budget in the search grid is <= --max-budget {s.max_budget}")
    found = select_closed_loop(
        scores[chosen],
        lambda sub: verifier.accuracy(expand(sub)),
        full_accuracy=verifier.full_accuracy,
        tolerance=s.target_drop,
        budgets=grid,
        min_per_layer=s.min_per_layer,
    )
    for step in found.trace:  # stopped early: the tasks it did not run count as misses
        step["stopped_early"] = verifier.stopped.get(step["retrieval_heads"], False)
    return Selection(expand(found.table), found.budget, found.accuracy, found.trace)


# ---- stage 5: record -------------------------------------------------------------------------------------
def record(
    info: ModelInfo,
    s: CompileSettings,
    scores: np.ndarray,
    chosen: Selection,
    verifier: Verifier | None,
    seconds: dict[str, float],
) -> HeadPolicy:
    """The policy: the chosen table, the scores, the settings and what was measured."""
    draft = _policy(info, s, chosen.table, scores)
    ctx = s.reference_context
    results = {
        "reference_context": ctx,
        "retrieval_heads": int(chosen.table.sum()),
        "budget": float(chosen.budget),
        "kv_fraction": round(draft.kv_fraction(ctx), 6),
        "kv_bytes": draft.kv_bytes(ctx),
        "full_kv_bytes": draft.full_kv_bytes(ctx),
    }
    if verifier is not None:
        results["heldout"] = {
            "tasks": len(verifier.heldout),
            "kinds": sorted({h.kind for h in verifier.heldout}),
            "lengths": list(s.heldout_lengths),
            "depths": list(s.heldout_depths),
            "full_accuracy": verifier.full_accuracy,
            "policy_accuracy": chosen.accuracy,
            "scope": "policy runs only the tasks the full model answers; the others count as misses",
        }
    if chosen.trace:
        results["search"] = chosen.trace
    results["compile_seconds"] = round(seconds["total"], 1)
    provenance = Provenance(
        version=__version__,
        method=s.method,
        settings={k: list(v) if isinstance(v, tuple) else v for k, v in asdict(s).items()},
        seed=s.seed,
        created=datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat(),
    )
    return _policy(info, s, chosen.table, scores, results).replace(provenance=provenance)


def _policy(info: ModelInfo, s: CompileSettings, table: np.ndarray, scores: np.ndarray, results=None) -> HeadPolicy:
    return HeadPolicy.from_kinds(info, table.tolist(), sink=s.sink, window=s.window, scores=scores, results=results)


# ---- the pipeline ----------------------------------------------------------------------------------------------
def compile_policy(
    model, tokenizer, settings: CompileSettings | None = None, *, progress: bool = False, name: str | None = None
) -> CompileReport:
    """Run the stages on `model` and return a CompileReport whose `.policy` is ready to save or apply."""
    s = settings or CompileSettings()
    s.check()
    codec = T.as_codec(tokenizer)
    info = describe_model(model, name)
    s.check_budget(len(info.policy_layers) * info.num_kv_heads, len(info.policy_layers))
    secs: dict[str, float] = {}
    t_all = time.perf_counter()

    with _timed(secs, "tasks"):
        tasks = make_tasks(model, codec, s)
    with _timed(secs, "score"):
        maps = score(model, tasks, s, progress=progress)
    final = maps[s.method]
    verifier = None
    if tasks.heldout:
        with _timed(secs, "heldout_full"):
            make_policy = lambda table: _policy(info, s, table, final)
            verifier = Verifier(model, codec, tasks.heldout, make_policy, tolerance=s.target_drop, progress=progress)
    with _timed(secs, "select"):
        chosen = select(final, info, s, verifier)
    secs["total"] = time.perf_counter() - t_all
    policy = record(info, s, final, chosen, verifier, secs)
    log.info("compiled: %d/%d retrieval heads, KV %.1f%% at %d", policy.num_retrieval, policy.num_heads,
             100 * policy.results["kv_fraction"], s.reference_context)  # fmt: skip
    return CompileReport(policy, maps, secs)


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


@contextlib.contextmanager
def _timed(seconds: dict[str, float], stage: str):
    t = time.perf_counter()
    yield
    seconds[stage] = time.perf_counter() - t
