"""`headpolicy eval MODEL --policy FILE`: what the policy loses against the full model, on held-out data."""

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
    p.add_argument("--kinds", default=",".join(d.kinds), help="needle kinds: passkey,word,code,multikey")
    p.add_argument("--seeds", type=int, default=d.seeds, help="items per kind and depth (default %(default)s)")
    p.add_argument("--text-lengths", type=int_list, default=d.text_lengths,
                   help="long-text perplexity at these lengths (default 4096,8192)")  # fmt: skip
    p.add_argument("--baselines", default="", help="also run: streaming,random (same items)")
    p.add_argument("--seed", type=int, default=d.seed, help="task and text seed")
    p.add_argument("--full-from", metavar="JSON",
                   help="take the full model's answers and perplexity from this earlier eval result instead of "
                        "running it again (checked: same weights, settings, items and texts)")  # fmt: skip
    p.add_argument("-o", "--output", help="JSON results file (default: eval_<policy name>.json)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_no_fingerprint_check(p, "evaluate")


def _names(text: str, known: tuple[str, ...], option: str) -> tuple[str, ...]:
    from headpolicy.errors import BudgetError

    names = tuple(k.strip() for k in text.split(",") if k.strip())
    bad = [k for k in names if k not in known]
    if bad:
        raise BudgetError(f"{option}: unknown name {bad[0]!r} (known: {', '.join(known)})")
    return names


@command("eval", help="paired accuracy and perplexity of a policy against the full model", configure=_configure)
def run_eval(args: argparse.Namespace) -> int:
    from headpolicy.errors import BudgetError
    from headpolicy.eval.suite import BASELINES, SuiteSettings, format_table, run_suite
    from headpolicy.io import write_json
    from headpolicy.models import load_source
    from headpolicy.policies.schema import HeadPolicy
    from headpolicy.profiler.tasks import NEEDLE_KINDS

    policy = HeadPolicy.load(args.policy)
    kinds = _names(args.kinds, NEEDLE_KINDS, "--kinds")
    if not kinds:
        raise BudgetError(f"--kinds: give at least one of {', '.join(NEEDLE_KINDS)}")
    settings = SuiteSettings(lengths=args.lengths, depths=args.depths, kinds=kinds, seeds=args.seeds,
                             text_lengths=args.text_lengths, baselines=_names(args.baselines, BASELINES, "--baselines"),
                             seed=args.seed)  # fmt: skip
    full_from = _read_result(args.full_from) if args.full_from else None
    t0 = time.perf_counter()
    model, tok = load_source(args.model)
    result = run_suite(model, tok, policy, settings, progress=not args.quiet,
                       check_fingerprint=not args.no_fingerprint_check, full_from=full_from)  # fmt: skip
    result["policy"]["file"] = str(args.policy)
    result["wall_seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(args.output or f"eval_{Path(args.policy).stem}.json")
    write_json(out, result)
    print(format_table(result))
    print(f"written {out}")
    return 0


def _read_result(path: str) -> dict:
    import json

    from headpolicy.errors import ResultsMismatchError

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ResultsMismatchError(f"--full-from {path}: cannot read an eval result ({e})") from None
    if not isinstance(data, dict):
        raise ResultsMismatchError(f"--full-from {path}: not an eval result (a JSON object)")
    return data
