"""Head layouts at equal bytes, measured on compile's own calibration set, side by side.

compile's knapsack adds two first-order estimates per head: what its window loses and what
its KV bits lose. Whether their relative sizes are right is a question for measurement: this
script measures, on the same calibration tasks and text compile uses (the full model's
answers as the reference), a compiled policy beside layouts built from its head scores at
the same byte budget:

    policy              the policy given (--policy), as compiled
    int4_whole_topK     the K heads with the highest scores keep every token, every head at
                        int4, the others sink 64 + window --window; K as large as fits the budget
    int4_whole_topK_wW_int8
                        the same with the windows at int8 and window --short-window

    python bench/layouts.py --policy bench/results/compile_smollm2-135m_auto_0.125_grid.yaml \\
        --kv-budget 0.125 --depth-grid

Prints a table and writes bench/results/layouts_<policy name>.json. It runs the full model
once over the calibration set and each layout once (about 3 minutes a layout with
--depth-grid on 2 cores). The layouts are diagnostics: the scores they rank by are the
policy's own (compile's estimate of streaming each head), nothing here reads eval data.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402

from headpolicy import HeadPolicy, load_model  # noqa: E402
from headpolicy.io import write_json  # noqa: E402
from headpolicy.models import describe_model  # noqa: E402
from headpolicy.profiler import compile as C  # noqa: E402
from headpolicy.profiler import objective as O  # noqa: E402
from headpolicy.profiler import tasks as T  # noqa: E402
from headpolicy.runtime.generate import applied_copy  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def ranked_layout(info, order: np.ndarray, whole: int, whole_bits: int, window_bits: int, sink: int, window: int,
                  group: int, residual: int) -> HeadPolicy:  # fmt: skip
    """The `whole` heads first in `order` keep every token at whole_bits; the rest sink + window at window_bits."""
    H = info.num_kv_heads
    kept = set(order[:whole].tolist())
    rules = [[None if li * H + h in kept else (sink, window) for h in range(H)] for li in range(info.num_layers)]
    bits = [[whole_bits if li * H + h in kept else window_bits for h in range(H)] for li in range(info.num_layers)]
    return HeadPolicy.from_rules(info, rules, bits=bits, kv_group=group, kv_residual=residual)


def largest_fitting(make, budget: float, context: int, heads: int) -> tuple[int, HeadPolicy]:
    """The largest number of whole heads whose layout keeps at most `budget` of the full cache."""
    for whole in range(heads, -1, -1):
        policy = make(whole)
        if policy.kv_fraction(context) <= budget + 1e-9:
            return whole, policy
    raise SystemExit(f"no layout fits --kv-budget {budget}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--policy", required=True, help="a compiled policy: measured as is, its scores rank the heads")
    p.add_argument("--kv-budget", type=float, required=True, help="fraction of the float32 cache at --context")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--depth-grid", action="store_true", help="calibrate as compile --depth-grid does")
    p.add_argument("--window", type=int, default=2048, help="the int4 layout's window")
    p.add_argument("--short-window", type=int, default=1024, help="the int8-window layout's window")
    p.add_argument("--out", help="JSON path (default bench/results/layouts_<policy name>.json)")
    args = p.parse_args()

    model, tok = load_model(args.model)
    info = describe_model(model)
    given = HeadPolicy.load(args.policy)
    given.check_model(info)
    s = C.CompileSettings(kv_budget=args.kv_budget, depth_grid=args.depth_grid, reference_context=args.context)
    data = C.make_calibration(T.as_codec(tok), s)
    t0 = time.perf_counter()
    ref = O.reference(model, data.calib)
    print(f"full model: {sum(ref.answered)} of {len(data.calib.tasks)} calibration tasks answered "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
    scores = np.array([[h.score for h in row] for row in given.layers], dtype=float)
    order = np.argsort(-scores.ravel(), kind="stable")
    heads, group, residual = scores.size, given.kv_group, given.kv_residual
    layouts = [("policy", given)]
    whole, pol = largest_fitting(lambda k: ranked_layout(info, order, k, 4, 4, 64, args.window, group, residual),
                                 args.kv_budget, args.context, heads)  # fmt: skip
    layouts.append((f"int4_whole_top{whole}_w{args.window}_int4", pol))
    whole, pol = largest_fitting(lambda k: ranked_layout(info, order, k, 4, 8, 64, args.short_window, group,
                                                         residual), args.kv_budget, args.context, heads)  # fmt: skip
    layouts.append((f"int4_whole_top{whole}_w{args.short_window}_int8", pol))
    rows = []
    for name, policy in layouts:
        t = time.perf_counter()
        loss = O.measure(applied_copy(model, policy), data.calib, ref)
        rows.append({"layout": name, "retrieval_heads": policy.num_retrieval,
                     "kv_fraction": round(policy.kv_fraction(args.context), 6), **loss.as_dict(),
                     "seconds": round(time.perf_counter() - t, 1)})  # fmt: skip
        print(f"{name:<34} heads {policy.num_retrieval:>3}  KV {100 * rows[-1]['kv_fraction']:5.2f}%  "
              f"{loss.describe()}", flush=True)  # fmt: skip
    out = Path(args.out or RESULTS / f"layouts_{Path(args.policy).stem}.json")
    write_json(out, {"model": info.name, "policy": str(args.policy), "kv_budget": args.kv_budget,
                     "context": args.context, "depth_grid": args.depth_grid,
                     "calibration_tasks": len(data.calib.tasks), "answered": int(sum(ref.answered)),
                     "layouts": rows})  # fmt: skip
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
