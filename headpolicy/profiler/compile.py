"""`compile_policy`: profile a model on synthetic tasks, score its KV heads, select, verify.

    model, tok = headpolicy.load_model("smollm2-135m")
    policy = compile_policy(model, tok, CompileSettings(budget=0.25))
    policy.save("smollm2-135m-instruct.yaml")

1. sample a haystack with the model itself (enough tokens that no task repeats it); build
   scoring tasks (passkey on the sampled haystack, multikey on the repeated-sentence
   filler, repeated random tokens);
2. score every KV head with the chosen scorer(s) -> [layers, kv_heads];
3. select: a fixed budget, or the smallest budget whose held-out accuracy (other seeds,
   depths and lengths; passkey and multikey on the sampled haystack; run through
   headpolicy.apply and the split cache) stays within `target_drop` points of the full
   model's;
4. record scores, settings and the measured results in the policy.

The held-out check is the expensive part (a 4K-token prompt is ~13 s on 2 CPU cores), so
candidates run only the tasks the full model answers (the others count as misses: the
policy accuracy recorded is a lower bound), and a candidate stops at its first miss past
the tolerance.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from headpolicy.errors import BudgetError
from headpolicy.policies.schema import HeadPolicy, Provenance
from headpolicy.policies.select import DEFAULT_GRID, budget_heads, select_budget, select_closed_loop
from headpolicy.profiler import tasks as T
from headpolicy.profiler.scorers import get_scorer, scorer_names
from headpolicy.profiler.scorers.ensemble import MEMBERS as ENSEMBLE
from headpolicy.profiler.scorers.ensemble import fuse

log = logging.getLogger(__name__)

# `hybrid` = mean of these scorers' scores, each divided by its maximum first.
HYBRID = ("retrieval", "attention_mass")
# Methods whose score map is built from other scorers' maps: method -> members.
COMBINED = {"hybrid": HYBRID, "ensemble": ENSEMBLE}


@dataclass
class CompileSettings:
    method: str = "attention_mass"  # a scorer name, "hybrid" or "ensemble"; default from bench/scorers.py (README)
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
        known = [*scorer_names(), "hybrid"]
        if self.method not in known:
            raise BudgetError(f"unknown method {self.method!r} (known: {', '.join(known)})")
        if self.budget is not None:
            budget_heads(self.budget, 1)  # range check
            if self.budget > self.max_budget:
                raise BudgetError(f"budget {self.budget} exceeds --max-budget {self.max_budget}")
        if self.target_drop < 0:
            raise BudgetError(f"--target-drop must be >= 0 points, got {self.target_drop}")
        if self.sink < 0 or self.window < 1:
            raise BudgetError(f"need sink >= 0 and window >= 1, got sink {self.sink}, window {self.window}")
        if not self.lengths or any(n < 64 for n in (*self.lengths, *self.heldout_lengths)):
            raise BudgetError("task lengths must be >= 64 tokens")


@dataclass
class CompileReport:
    policy: HeadPolicy
    scores: dict[str, np.ndarray]
    seconds: dict[str, float] = field(default_factory=dict)


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


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


def allowed_misses(tolerance: float, n_tasks: int) -> int:
    """Tasks a policy may lose and stay within `tolerance` points on `n_tasks` tasks."""
    return int(tolerance * n_tasks / 100.0 + 1e-9)


def combine(scores: dict[str, np.ndarray]) -> np.ndarray:
    """Mean of max-normalised scores (each scorer in [0, 1] before averaging)."""
    parts = [v / v.max() if v.max() > 0 else v for v in scores.values()]
    return np.mean(parts, axis=0)


def combined_scores(method: str, members: dict[str, np.ndarray]) -> np.ndarray:
    """The score map of a COMBINED method from its members' maps: rank fusion for
    `ensemble` (scorers/ensemble.py), the mean of max-normalised maps for `hybrid`."""
    return fuse(members) if method == "ensemble" else combine(members)


def compile_policy(
    model, tokenizer, settings: CompileSettings | None = None, *, progress: bool = False, name: str | None = None
) -> CompileReport:
    """Profile `model` and return a CompileReport whose `.policy` is ready to save/apply."""
    from headpolicy import __version__
    from headpolicy.eval.retrieval import outcomes
    from headpolicy.models import describe_model

    s = settings or CompileSettings()
    s.check()
    codec = T.as_codec(tokenizer)
    info = describe_model(model, name)
    # Only full-attention layers are chosen for; a hybrid model's own sliding-window layers
    # stay as they are (ModelInfo.native_windows), so budgets count the other heads only.
    chosen = info.policy_layers
    secs: dict[str, float] = {}
    if s.budget is not None:  # fail before profiling, not after
        n = len(chosen) * info.num_kv_heads
        if budget_heads(s.budget, n) < s.min_per_layer * len(chosen):
            raise BudgetError(
                f"a budget of {budget_heads(s.budget, n)} retrieval heads cannot give each of {len(chosen)} "
                f"layers {s.min_per_layer} (needs at least {s.min_per_layer * len(chosen)}); "
                "lower --min-per-layer or raise the budget"
            )
    t_all = time.perf_counter()

    t = time.perf_counter()
    pool = haystack_pool(model, codec, s)
    tasks = scoring_tasks(codec, s, pool)
    secs["tasks"] = time.perf_counter() - t

    names = list(COMBINED.get(s.method, [s.method]))
    scores: dict[str, np.ndarray] = {}
    t = time.perf_counter()
    for n in names:
        scorer = get_scorer(n)
        todo = sum(task.kind in scorer.kinds for task in tasks)
        with _bar(todo, f"score {n}", progress) as bar:
            scores[n] = scorer(model, tasks, sink=s.sink, window=s.window, progress=bar)
    final = combined_scores(s.method, scores) if s.method in COMBINED else scores[s.method]
    secs["score"] = time.perf_counter() - t

    def expand(sub: np.ndarray) -> np.ndarray:
        """A [len(chosen), kv_heads] selection as a [layers, kv_heads] table."""
        table = np.zeros(final.shape, dtype=bool)
        table[chosen] = sub
        return table

    def make(table: np.ndarray, results=None) -> HeadPolicy:
        return HeadPolicy.from_kinds(info, table.tolist(), sink=s.sink, window=s.window, scores=final, results=results)

    held = heldout_tasks(codec, s, pool) if (s.budget is None or s.verify) else []
    full_acc, answered = None, []
    if held:
        t = time.perf_counter()
        with _bar(len(held), "held-out full model", progress) as bar:
            answered = [o.task for o in outcomes(model, codec, held, progress=bar) if o.correct]
        full_acc = 100.0 * len(answered) / len(held)
        secs["heldout_full"] = time.perf_counter() - t
    # only the full model's answered tasks run; search candidates stop once they cannot pass
    stops: dict[int, bool] = {}

    def evaluate(table: np.ndarray, search: bool = True) -> float:
        k = int(table.sum())
        limit = allowed_misses(s.target_drop, len(held)) if search else None
        with _bar(len(answered), f"held-out {k} retrieval heads", progress) as bar:
            outs = outcomes(model, codec, answered, policy=make(table), progress=bar, max_misses=limit)
        stops[k] = len(outs) < len(answered)
        return 100.0 * sum(o.correct for o in outs) / len(held)

    t = time.perf_counter()
    trace: list[dict] = []
    if s.budget is not None:
        table = expand(select_budget(final[chosen], s.budget, min_per_layer=s.min_per_layer))
        budget = s.budget
        policy_acc = evaluate(table, search=False) if held else None
    else:
        grid = [b for b in s.budgets if b <= s.max_budget]
        if not grid:
            raise BudgetError(f"no budget in the search grid is <= --max-budget {s.max_budget}")
        found = select_closed_loop(
            final[chosen],
            lambda sub: evaluate(expand(sub)),
            full_accuracy=full_acc,
            tolerance=s.target_drop,
            budgets=grid,
            min_per_layer=s.min_per_layer,
        )
        table, budget, policy_acc, trace = expand(found.table), found.budget, found.accuracy, found.trace
        for step in trace:  # stopped early: the tasks it did not run count as misses
            step["stopped_early"] = stops.get(step["retrieval_heads"], False)
    secs["select"] = time.perf_counter() - t
    secs["total"] = time.perf_counter() - t_all

    draft = make(table)
    ctx = s.reference_context
    results = {
        "reference_context": ctx,
        "retrieval_heads": int(table.sum()),
        "budget": float(budget),
        "kv_fraction": round(draft.kv_fraction(ctx), 6),
        "kv_bytes": draft.kv_bytes(ctx),
        "full_kv_bytes": draft.full_kv_bytes(ctx),
    }
    if held:
        results["heldout"] = {
            "tasks": len(held),
            "kinds": sorted({h.kind for h in held}),
            "lengths": list(s.heldout_lengths),
            "depths": list(s.heldout_depths),
            "full_accuracy": full_acc,
            "policy_accuracy": policy_acc,
            "scope": "policy runs only the tasks the full model answers; the others count as misses",
        }
    if trace:
        results["search"] = trace
    results["compile_seconds"] = round(secs["total"], 1)
    settings_dict = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(s).items()}
    provenance = Provenance(
        version=__version__,
        method=s.method,
        settings=settings_dict,
        seed=s.seed,
        created=datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat(),
    )
    policy = make(table, results).replace(provenance=provenance)
    log.info("compiled: %d/%d retrieval heads, KV %.1f%% at %d", policy.num_retrieval, policy.num_heads,
             100 * results["kv_fraction"], ctx)  # fmt: skip
    return CompileReport(policy, scores | ({s.method: final} if s.method in COMBINED else {}), secs)
