"""KV cache memory and speed: the full model vs applied policies, side by side, per phase.

SmolLM2-135M at 1K/2K/4K/8K context (8K is the model's context: there the prompt is 8K minus
the new tokens, so prompt + new tokens fill it). Three models run in one process: the
unmodified model (transformers' own SDPA attention and DynamicCache, untouched), a hand policy
(KV head 0 of every layer retrieval, the others sink 64 + window 256) and the bundled compiled
policy (headpolicy/policies/bundled/smollm2-135m-instruct.yaml), plus any `--policy NAME=PATH`.
For each thread count and context they alternate, the order rotating, so all see the same machine load: at least
`--repeats` times, and more (up to `--max-repeats`) until the full model has run
`--min-seconds`, so short contexts get the repeats their +-10-15% run-to-run noise on this
machine needs. A speed-up is the median over repeats of policy over full in the same repeat (its
min-max range is stored beside it); the other numbers are medians.

Per run: prefill seconds (the prompt in one forward), decode tokens/s (`--new-tokens` greedy
steps after it, the first included), KV bytes allocated and used. Per thread count, the full
model also decodes after a 64-token prompt: its tokens/s there over its tokens/s at a context is
that context's decode *ceiling*, the speed-up a policy whose attention and cache cost nothing
would reach (the weights' matrix-vector products are the same on both sides). Caches are made as
`headpolicy.runtime.generate` makes them (SplitKVCache reserved for prompt + new tokens, so
allocated == used unless --grow). KV bytes are checked against the policy's formula; the exit
status is 1 only if they differ. Peak RSS is measured apart, once per model and context, in a
fresh child process on one thread: the run's peak above the RSS of the loaded, warmed-up
model (the prefill's activations dominate it), and the absolute peak. The probes fix glibc's
mmap threshold (`--rss-allocator`, see RSS_ALLOCATOR) so that the peak counts live tensors,
not the freed blocks glibc happens to keep.

    python bench/kv_memory.py               # 1K-8K, --threads 1,2, 3-11 repeats, RSS probes (~60 min idle)
    python bench/kv_memory.py --quick       # smoke run: 512/1K, 8 tokens, 1 repeat, RSS at 512 (~2 min)
    python bench/kv_memory.py --contexts 4096 --threads 1 --repeats 3 --no-rss
    python bench/kv_memory.py --rss-only     # the RSS probes alone, into the stored JSON

Timing on a shared machine: prefer --threads 1 (with two threads on two busy cores OpenMP
stalls and distorts both sides); the ratios, not the absolute numbers, are what compare.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

# bench/kernels.py would shadow the Hugging Face `kernels` package that transformers imports:
# run as a script, this folder is sys.path[0], so it comes off the path first.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from headpolicy import HeadPolicy, Provenance, SplitKVCache, apply, describe_model, load_model  # noqa: E402
from headpolicy.io import write_json  # noqa: E402
from headpolicy.runtime.generate import cache_bytes, context_limit, new_cache  # noqa: E402

RESULTS = Path(__file__).parent / "results"
BUNDLED = Path(__file__).parents[1] / "headpolicy/policies/bundled/smollm2-135m-instruct.yaml"
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
# Targets of issue 15 (policy over full, per context): prefill speed-up, decode speed-up.
PREFILL_TARGET = {1024: 1.0, 2048: 1.0, 4096: 1.2, 8192: 1.2}
DECODE_TARGET = {4096: 1.5, 8192: 2.0}


def prompt_ids(tok, n_tokens: int) -> torch.Tensor:
    """A passkey haystack of exactly n_tokens tokens (content matters little for memory/speed)."""
    needle = "The pass key is 71432. Remember it. 71432 is the pass key. "
    text = FILLER * (n_tokens // 20 + 8)
    mid = len(text) // 2
    ids = tok(text[:mid] + needle + text[mid:], return_tensors="pt")["input_ids"]
    if ids.shape[1] < n_tokens:
        raise ValueError(f"the haystack has {ids.shape[1]} tokens, {n_tokens} were asked for")
    return ids[:, :n_tokens]


def load_policies(model, *, bundled: bool, extra: list[tuple[str, Path]] = ()) -> dict[str, HeadPolicy]:
    """hand, bundled (unless not `bundled`), then each --policy NAME=PATH."""
    policies = {"hand": hand_policy(model)}
    if bundled:
        policies["bundled"] = HeadPolicy.load(BUNDLED)
    for name, path in extra:
        policies[name] = HeadPolicy.load(path)
    return policies


def named_policy(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name.isidentifier() or name in ("full", "hand", "bundled") or not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"--policy takes NAME=PATH (a new name, an existing YAML file), got {text!r}")
    return name, Path(path)


def hand_policy(model) -> HeadPolicy:
    info = describe_model(model)
    keep = [[h == 0 for h in range(info.num_kv_heads)] for _ in range(info.num_layers)]
    prov = Provenance(method="hand", settings={"rule": "KV head 0 of every layer is retrieval"})
    return HeadPolicy.from_kinds(info, keep, sink=64, window=256, provenance=prov)


# ---- memory: peak resident set of one run -----------------------------------------------------------
def _status_kib(field: str) -> int | None:
    try:
        m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc malloc_trim), so that a run's RSS starts
    from what is live, not from what earlier runs freed and the allocator kept."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux: clear_refs 5), so VmHWM covers what follows."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ---- one run ---------------------------------------------------------------------------------------
@torch.no_grad()
def run(model, ids: torch.Tensor, new_tokens: int, grow: bool) -> dict:
    """Prefill, then greedy-decode `new_tokens` one at a time; time both phases."""
    cache = new_cache(model)
    if isinstance(cache, SplitKVCache) and not grow:
        cache.reserve(ids.shape[1] + new_tokens)  # as runtime/generate.generate does
    t0 = time.perf_counter()
    out = model(ids, cache=cache, use_cache=True, logits_to_keep=1)
    t1 = time.perf_counter()
    tok = out.logits[:, -1:].argmax(-1)
    for _ in range(new_tokens):
        out = model(tok, cache=cache, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
    t2 = time.perf_counter()
    used = cache.kv_bytes_used() if isinstance(cache, SplitKVCache) else cache_bytes(cache)
    return {
        "prefill_s": t1 - t0,
        "decode_tok_s": new_tokens / (t2 - t1),
        "kv_bytes_allocated": cache_bytes(cache),
        "kv_bytes_used": used,
    }


def probe_rss(args) -> int:
    """Child process: one model, one context; print the run's peak RSS as a JSON line.

    A fresh process per (model, context), because in a process that ran other models the
    allocator's kept and fragmented memory makes a run's own peak unreadable.
    """
    torch.set_num_threads(1)
    full, tok = load_model(args.model)
    policies = load_policies(full, bundled=True, extra=args.policy)
    model = full if args.probe_rss == "full" else apply(full, policies[args.probe_rss])
    limit = context_limit(full)
    ids = prompt_ids(tok, min(args.contexts[0], limit - args.new_tokens) if limit else args.contexts[0])
    run(model, prompt_ids(tok, 64), 2, args.grow)  # warm up: first-call allocations stay out of the peak
    release_free_memory()
    loaded = _status_kib("VmRSS")
    if loaded is None or not reset_peak_rss():
        print(json.dumps(None))
        return 0
    run(model, ids, args.new_tokens, args.grow)
    peak = _status_kib("VmHWM")
    print(json.dumps({"peak_rss_mib": peak / 1024, "run_over_loaded_mib": (peak - loaded) / 1024}))
    return 0


# glibc raises its mmap threshold (up to 32 MiB) each time a large mmapped block is freed, after
# which freed temporaries stay in the heap and count in RSS: the peak then measures where the
# allocator happened to put them (the same hand-policy prefill at 4K peaked 221 to 507 MiB above
# the loaded model from run to run). A fixed threshold returns every freed block of 128 KiB or
# more to the system, so the peak measures the live tensors; full and policies alike.
RSS_ALLOCATOR = {"fixed": {"MALLOC_MMAP_THRESHOLD_": "131072"}, "default": {}}


def measure_rss(names: list[str], context: int, args) -> dict:
    """Peak RSS of one run of each model at `context`, each in a fresh child process."""
    out = {}
    env = {**os.environ, **RSS_ALLOCATOR[args.rss_allocator]}
    for name in names:
        cmd = [sys.executable, __file__, "--probe-rss", name, "--model", args.model, "--contexts", str(context),
               "--new-tokens", str(args.new_tokens)] + (["--grow"] if args.grow else [])  # fmt: skip
        cmd += [f"--policy={n}={p}" for n, p in args.policy]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        lines = done.stdout.strip().splitlines()
        out[name] = json.loads(lines[-1]) if done.returncode == 0 and lines else None
        if out[name] is None:
            print(f"peak RSS probe of {name} at {context} gave nothing: {done.stderr.strip()[-300:]}", file=sys.stderr)
    return out


def median_runs(runs: list[dict]) -> dict:
    out = {}
    for key in runs[0]:
        values = [r[key] for r in runs if r[key] is not None]
        out[key] = statistics.median(values) if values else None
    return out


def floor_decode(full, ids, args) -> float:
    """The full model's decode tokens/s after a short prompt (median of 3): decode without attention cost, nearly."""
    return statistics.median(run(full, ids, args.new_tokens, args.grow)["decode_tok_s"] for _ in range(3))


def measure_context(models: dict, policies: dict, context: int, ids, args, esize: int) -> dict:
    """All models at one context (prompt `ids` + new tokens), alternating, the order rotating per
    repeat; medians and ratios."""
    names = list(models)
    runs = {n: [] for n in names}
    rep = 0

    def more() -> bool:
        enough = measured_s(runs["full"], args.new_tokens) >= args.min_seconds
        return rep < args.repeats or (rep < args.max_repeats and not enough)

    while more():
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            runs[name].append(run(models[name], ids, args.new_tokens, args.grow))
        rep += 1
    T = ids.shape[1] + args.new_tokens
    full = median_runs(runs["full"])
    row = {"context": context, "prompt_tokens": ids.shape[1], "tokens_cached": T, "repeats": rep, "full": full,
           "runs": runs}  # fmt: skip
    full_formula = next(iter(policies.values())).full_kv_bytes(T, dtype_bytes=esize)
    for name, policy in policies.items():
        med = median_runs(runs[name])
        # ratios per repeat (the two runs next to each other in time), then their median
        pairs = list(zip(runs["full"], runs[name], strict=True))
        prefill = [f["prefill_s"] / p["prefill_s"] for f, p in pairs]
        decode = [p["decode_tok_s"] / f["decode_tok_s"] for f, p in pairs]
        med["prefill_speedup"], med["decode_speedup"] = statistics.median(prefill), statistics.median(decode)
        med["prefill_speedup_range"] = [min(prefill), max(prefill)]  # the spread the median is taken over
        med["decode_speedup_range"] = [min(decode), max(decode)]
        med["kv_ratio_full_over_policy"] = full["kv_bytes_allocated"] / med["kv_bytes_allocated"]
        med["kv_bytes_formula"] = policy.kv_bytes(T, dtype_bytes=esize)
        med["formula_matches"] = (
            med["kv_bytes_used"] == med["kv_bytes_formula"] and full["kv_bytes_used"] == full_formula
        )
        med["targets"] = targets(context, med)
        row[name] = med
    return row


def measured_s(runs: list[dict], new_tokens: int) -> float:
    """Seconds of prefill and decode the runs measured."""
    return sum(r["prefill_s"] + new_tokens / r["decode_tok_s"] for r in runs)


def targets(context: int, med: dict) -> dict:
    """Issue 15's targets at this context: met (True/False) or not set (absent)."""
    out = {}
    if context in PREFILL_TARGET:
        out["prefill"] = med["prefill_speedup"] >= PREFILL_TARGET[context]
    if context in DECODE_TARGET:
        out["decode"] = med["decode_speedup"] >= DECODE_TARGET[context]
    return out


def thread_list(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"--threads takes thread counts like 1 or 1,2, got {text!r}")
    return values


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="repeats per context, at least")
    ap.add_argument("--min-seconds", type=float, default=60.0,
                    help="more repeats (up to --max-repeats) until the full model measured this long")  # fmt: skip
    ap.add_argument("--max-repeats", type=int, default=11)
    ap.add_argument("--threads", type=thread_list, default=None,
                    help="torch intra-op thread counts, each reported apart (default 1,2; --quick: 1)")  # fmt: skip
    ap.add_argument("--no-bundled", action="store_true", help="no bundled policy")
    ap.add_argument("--policy", type=named_policy, action="append", default=[], metavar="NAME=PATH",
                    help="one more policy to measure beside hand and bundled (repeatable)")  # fmt: skip
    ap.add_argument("--grow", action="store_true", help="do not reserve: split caches grow in blocks as tokens come")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: contexts 512 1024, 8 tokens, 1 repeat, peak RSS at 512 only")  # fmt: skip
    ap.add_argument("--no-rss", action="store_true", help="skip the peak-RSS child processes")
    ap.add_argument("--rss-only", action="store_true",
                    help="only the peak-RSS probes, stored into the existing --out JSON")  # fmt: skip
    ap.add_argument("--rss-allocator", choices=sorted(RSS_ALLOCATOR), default="fixed",
                    help="glibc mmap threshold of the probes: fixed at 128 KiB (default) or dynamic")  # fmt: skip
    ap.add_argument("--probe-rss", help=argparse.SUPPRESS)  # child mode: full, hand, bundled or a --policy name
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/kv_memory_cpu.json)")
    args = ap.parse_args(argv)
    if args.quick:
        args.contexts, args.new_tokens, args.repeats, args.min_seconds = [512, 1024], 8, 1, 0.0
    threads_list = args.threads or ([1] if args.quick else [1, 2])
    out_path = args.out or RESULTS / ("kv_memory_cpu_quick.json" if args.quick else "kv_memory_cpu.json")

    if args.probe_rss:
        return probe_rss(args)
    if args.rss_only:
        return rss_only(args, out_path)
    full, tok = load_model(args.model)
    policies = load_policies(full, bundled=not args.no_bundled, extra=args.policy)
    models = {"full": full} | {name: apply(copy.deepcopy(full), p) for name, p in policies.items()}
    esize = next(full.parameters()).element_size()
    limit = context_limit(full)  # 8K is the model's context: the prompt leaves room for the new tokens
    warm = prompt_ids(tok, 64)
    for m in models.values():  # first-call costs (allocator, thread pool) stay out of the first timing
        run(m, warm, 2, args.grow)

    by_threads = []
    for threads in threads_list:
        torch.set_num_threads(threads)
        load_before = os.getloadavg()
        rows = []
        floor = floor_decode(full, warm, args)
        print(f"\n== {threads} thread(s), load average {load_before[0]:.1f}; full model decode at 64 tokens "
              f"{floor:.2f} tok/s")  # fmt: skip
        for ctx in args.contexts:
            ids = prompt_ids(tok, min(ctx, limit - args.new_tokens) if limit else ctx)
            rows.append(measure_context(models, policies, ctx, ids, args, esize))
            rows[-1]["decode_ceiling"] = floor / rows[-1]["full"]["decode_tok_s"]
            print_row(rows[-1], policies, header=len(rows) == 1)
        by_threads.append({"threads": threads, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                           "decode_tok_s_at_64_tokens": floor, "rows": rows})  # fmt: skip

    memory = []
    if not args.no_rss:
        memory = measure_all_rss(list(models), args)

    result = {
        "benchmark": "kv_memory",
        "model": describe_model(full).name,
        "policies": {name: describe_policy(p) for name, p in policies.items()},
        "new_tokens": args.new_tokens,
        "repeats": {"at_least": args.repeats, "min_seconds": args.min_seconds, "at_most": args.max_repeats},
        "reserved": not args.grow,
        "targets": {"prefill_speedup": PREFILL_TARGET, "decode_speedup": DECODE_TARGET},
        "device": "cpu",
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
        },
        "by_threads": by_threads,
        "peak_rss": memory,
        "rss_allocator": {"name": args.rss_allocator, "env": RSS_ALLOCATOR[args.rss_allocator]},
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_json(out_path, result)
    print(f"\nwrote {out_path}")
    ok = all(row[name]["formula_matches"] for t in by_threads for row in t["rows"] for name in policies)
    return 0 if ok else 1


def measure_all_rss(names: list[str], args) -> list[dict]:
    print(f"\npeak RSS, one run per fresh process (1 thread, allocator {args.rss_allocator}): "
          "MiB above the loaded model / absolute")  # fmt: skip
    memory = []
    for ctx in args.contexts[:1] if args.quick else args.contexts:
        memory.append({"context": ctx, **measure_rss(names, ctx, args)})
        print_rss(memory[-1], names)
    return memory


def rss_only(args, out_path: Path) -> int:
    """The peak-RSS probes alone, written into the stored results (their timings kept)."""
    result = json.loads(out_path.read_text())
    names = ["full", *result["policies"]]
    result["peak_rss"] = measure_all_rss(names, args)
    result["rss_allocator"] = {"name": args.rss_allocator, "env": RSS_ALLOCATOR[args.rss_allocator]}
    write_json(out_path, result)
    print(f"\nwrote {out_path}")
    return 0


def describe_policy(p: HeadPolicy) -> dict:
    windows = sorted({p.head_window(li, h) for li, row in enumerate(p.layers) for h, s in enumerate(row)
                      if not s.is_retrieval})  # fmt: skip
    return {"retrieval_heads": p.num_retrieval, "kv_heads": p.num_heads, "sink_window": windows,
            "method": p.provenance.method}  # fmt: skip


def print_row(row: dict, policies: dict, header: bool) -> None:
    mib = 2**20
    if header:
        print(
            f"{'context':>7} {'model':>7} | {'KV alloc MiB':>12} {'used MiB':>8} {'full/pol':>8} | "
            f"{'prefill s':>9} {'speed-up':>8} | {'decode tok/s':>12} {'speed-up':>8} | targets"
        )
    f = row["full"]
    print(
        f"{row['context']:>7} {'full':>7} | {f['kv_bytes_allocated'] / mib:>12.2f} {f['kv_bytes_used'] / mib:>8.2f} "
        f"{'':>8} | {f['prefill_s']:>9.2f} {'':>8} | {f['decode_tok_s']:>12.2f} {'':>8} | "
        f"decode ceiling {row['decode_ceiling']:.2f}x"
    )
    for name in policies:
        p = row[name]
        met = " ".join(f"{k} {'ok' if v else 'MISSED'}" for k, v in p["targets"].items())
        kv = "" if p["formula_matches"] else "  KV MISMATCH"
        print(
            f"{'':>7} {name:>7} | {p['kv_bytes_allocated'] / mib:>12.2f} {p['kv_bytes_used'] / mib:>8.2f} "
            f"{p['kv_ratio_full_over_policy']:>7.2f}x | {p['prefill_s']:>9.2f} {p['prefill_speedup']:>7.2f}x | "
            f"{p['decode_tok_s']:>12.2f} {p['decode_speedup']:>7.2f}x | {met}{kv}"
        )


def print_rss(row: dict, names: list[str]) -> None:
    cells = []
    for name in names:
        r = row[name]
        cells.append(f"{name} " + ("n/a" if r is None else f"{r['run_over_loaded_mib']:.0f} / {r['peak_rss_mib']:.0f}"))
    print(f"{row['context']:>7}: " + "   ".join(cells))


if __name__ == "__main__":
    sys.exit(main())
