"""`headpolicy eval MODEL --policy FILE`: the policy against the full cache, all-streaming and random heads."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from headpolicy.cli import command
from headpolicy.cli.args import add_model, add_no_fingerprint_check, float_list, int_list


def _configure(p: argparse.ArgumentParser) -> None:
    from headpolicy.eval.suite import SuiteSettings

    d = SuiteSettings()
    add_model(p)
    p.add_argument("--policy", required=True, help="policy YAML to evaluate")
    p.add_argument("--lengths", type=int_list, default=d.lengths, help="prompt lengths in tokens, e.g. 2048,4096")
    p.add_argument("--depths", type=float_list, default=d.depths, help="needle depths, e.g. 0.25,0.75")
    p.add_argument("--kinds", default=",".join(d.kinds), help="task kinds: passkey,multikey")
    p.add_argument("--random-seeds", type=int, default=d.random_seeds, help="random-head baselines to average")
    p.add_argument("--seed", type=int, default=d.seed, help="task and haystack seed")
    p.add_argument("-o", "--output", help="JSON results file (default: eval_<policy name>.json)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_no_fingerprint_check(p, "evaluate")


@command("eval", help="compare a policy with the full cache, all-streaming and random heads", configure=_configure)
def run_eval(args: argparse.Namespace) -> int:
    from headpolicy.errors import BudgetError
    from headpolicy.eval.suite import SuiteSettings, format_table, run_suite
    from headpolicy.io import write_json
    from headpolicy.models import load_source
    from headpolicy.policies.schema import HeadPolicy
    from headpolicy.profiler.tasks import KINDS

    policy = HeadPolicy.load(args.policy)
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    bad = [k for k in kinds if k not in KINDS or k == "repeat"]
    if bad or not kinds:
        raise BudgetError(f"--kinds: unknown task kind {bad[0] if bad else ''!r} (use passkey, multikey)")
    settings = SuiteSettings(lengths=args.lengths, depths=args.depths, kinds=kinds,
                             random_seeds=args.random_seeds, seed=args.seed)  # fmt: skip
    t0 = time.perf_counter()
    model, tok = load_source(args.model)
    result = run_suite(model, tok, policy, settings, progress=not args.quiet,
                       check_fingerprint=not args.no_fingerprint_check)  # fmt: skip
    result["policy"]["file"] = str(args.policy)
    result["wall_seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(args.output or f"eval_{Path(args.policy).stem}.json")
    write_json(out, result)
    print(format_table(result))
    print(f"written {out}")
    return 0
