"""Per-head KV precision against the full cache and transformers' QuantizedCache, side by side in one run.

For SmolLM2-135M at 2K and 4K tokens, every configuration runs the same held-out items
(`headpolicy eval`'s data: wording "B", Moby-Dick) and the same long texts:

    full            the unmodified model, transformers' DynamicCache in the model's dtype
    quanto-int2/4   transformers' QuantizedCache, optimum-quanto backend, 2 or 4 bits on every head
                    (int2 is the peer at ~12.5% of a float32 cache, int4 at ~19%)
    hqq-int2/4/8    the same with the HQQ backend (2, 4 and 8 bits)
                    (peers: group 32, residual 32 tokens, as headpolicy's defaults)
    native          a headpolicy policy compiled with --kv-budget F, every head in the model's dtype
    auto            a headpolicy policy compiled with --kv-budget F --precision auto (KV bits per head)

Per configuration and length: KV bytes measured from the cache after each item, as a fraction of
the full cache in the model's dtype and of a bfloat16 full cache; accuracy and items lost/gained
paired against the full model; the long-text perplexity ratio (teacher-forced; caches that only
show their effect when read are run as a prefill of `text_from` tokens, then 128-token chunks over
the cache, for the peers and the quantised policy alike); decode tokens/s (greedy, after an L-token
prompt, prefill excluded). A peer whose backend is not installed is reported as skipped with the
reason (`make install` brings optimum-quanto through the `bench` extra; HQQ: `pip install hqq`).

    python bench/precision.py                                  # compiles both policies (long), then evaluates
    python bench/precision.py --native a.yaml --auto b.yaml    # policies compiled before
    python bench/precision.py --quick                          # tiny smoke run: few items, short texts

Writes bench/results/precision_<tag>.json (tag: "quick" with --quick) and prints a table.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

# bench/kernels.py would shadow the Hugging Face `kernels` package that transformers imports:
# run as a script, this folder is sys.path[0], so it comes off the path first.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from headpolicy.eval.suite import SuiteSettings, paired, suite_tasks, suite_texts  # noqa: E402
from headpolicy.io import write_json  # noqa: E402
from headpolicy.models import describe_model, load_source  # noqa: E402
from headpolicy.policies.schema import HeadPolicy  # noqa: E402
from headpolicy.profiler import compile as C  # noqa: E402
from headpolicy.profiler import objective as O  # noqa: E402
from headpolicy.profiler import tasks as T  # noqa: E402
from headpolicy.runtime.cache import SplitKVCache, cache_argument  # noqa: E402
from headpolicy.runtime.generate import applied_copy, cache_bytes, context_limit, generate, new_cache  # noqa: E402

RESULTS = Path(__file__).parent / "results"
PEERS = (("quanto", 2), ("quanto", 4), ("hqq", 2), ("hqq", 4), ("hqq", 8))
PEER_NAMES = {f"{backend}-int{bits}": (backend, bits) for backend, bits in PEERS}
PEER_GROUP, PEER_RESIDUAL = 32, 32
CHUNK = 128  # text tokens per forward over a cache (module docstring)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--lengths", default="2048,4096")
    p.add_argument("--kv-budget", type=float, default=0.125,
                   help="both policies: KV at 4K <= this fraction of the full cache in the model's dtype")  # fmt: skip
    p.add_argument("--native", help="a native-precision policy YAML (else compiled here)")
    p.add_argument("--auto", help="a --precision auto policy YAML (else compiled here)")
    p.add_argument("--seeds", type=int, default=3, help="held-out items per kind, depth and length")
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--quick", action="store_true", help="a smoke run: 2 items, short texts, tiny calibration")
    p.add_argument("--tag", default=None)
    p.add_argument("--peers", type=peer_list, default=list(PEER_NAMES),
                   help="QuantizedCache peers to run, comma-separated (default: all)")  # fmt: skip
    return p.parse_args()


def peer_list(text: str) -> list[str]:
    """--peers, checked before anything is loaded or compiled."""
    names = [x.strip() for x in text.split(",") if x.strip()]
    if unknown := sorted(set(names) - set(PEER_NAMES)):
        raise argparse.ArgumentTypeError(f"unknown {unknown}; choose among {list(PEER_NAMES)}")
    return names


# ---- configurations: (name, model, make_cache) ----------------------------------------------------------
def peer_cache(backend: str, bits: int, model):
    from transformers import QuantizedCache

    return QuantizedCache(backend, model.config, nbits=bits, q_group_size=PEER_GROUP, residual_length=PEER_RESIDUAL)


def peer_status(backend: str, bits: int, model) -> str | None:
    """None when the peer runs here, else why it is skipped (one line)."""
    try:
        cache = peer_cache(backend, bits, model)
        ids = torch.randint(3, 100, (1, 2 * PEER_RESIDUAL + 8))
        with torch.no_grad():
            model(ids, use_cache=True, **{cache_argument(model.forward): cache})
    except Exception as e:  # noqa: BLE001 (any failure of a third-party backend is a reason to skip it)
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
    return None


def tensor_bytes(x, seen: set) -> int:
    """Bytes of every tensor reachable from x (tensor subclasses such as quanto's QTensor through
    their inner tensors), each storage once."""
    if isinstance(x, torch.Tensor):
        if hasattr(x, "__tensor_flatten__") and type(x) is not torch.Tensor:
            names, _ = x.__tensor_flatten__()
            return sum(tensor_bytes(getattr(x, n), seen) for n in names)
        key = (x.untyped_storage().data_ptr(), x.untyped_storage().nbytes())
        if key in seen:
            return 0
        seen.add(key)
        return x.untyped_storage().nbytes()
    if isinstance(x, dict):
        return sum(tensor_bytes(v, seen) for v in x.values())
    if isinstance(x, list | tuple):
        return sum(tensor_bytes(v, seen) for v in x)
    if hasattr(x, "__dict__") and not isinstance(x, torch.nn.Module):
        return sum(tensor_bytes(v, seen) for v in vars(x).values())
    return 0


def kv_bytes(cache) -> int:
    if isinstance(cache, SplitKVCache) or cache is None:
        return cache_bytes(cache)
    seen: set = set()
    return sum(tensor_bytes(vars(layer), seen) for layer in cache.layers)


# ---- measurements ----------------------------------------------------------------------------------------
@torch.no_grad()
def answer(model, codec, task, make_cache):
    ids = torch.tensor([list(task.input_ids)])
    gen = generate(model, ids, max_new_tokens=len(task.answer_ids) + 1, cache=make_cache())
    text = codec.decode(gen.tokens[0].tolist())
    return text.strip().startswith(task.answer.strip()), kv_bytes(gen.cache)


@torch.no_grad()
def text_nll(model, text, text_from: int, make_cache) -> float:
    """Mean NLL from text_from + 1 on: one forward for the full model and native policies; over
    the cache in chunks for caches whose loss shows only when they are read."""
    if make_cache is None:
        return float(O.text_nll(model, text, text_from).double().mean())  # quantised policies: chunked there
    ids = torch.tensor([list(text)])
    cache, arg = make_cache(), cache_argument(model.forward)
    model(ids[:, :text_from], use_cache=True, logits_to_keep=1, **{arg: cache})
    logits = [model(ids[:, a : a + CHUNK], use_cache=True, **{arg: cache}).logits[0]
              for a in range(text_from, ids.shape[1], CHUNK)]  # fmt: skip
    nll = torch.nn.functional.cross_entropy(torch.cat(logits)[:-1].float(), ids[0, text_from + 1 :])
    return float(nll)


@torch.no_grad()
def decode_rate(model, prompt: list[int], tokens: int, make_cache) -> float:
    """Greedy decode tokens/s after `prompt`: the prompt is prefilled once into a cache, then only
    the `tokens` single-token steps are timed (a difference of two whole generations would carry
    the prefill's own run-to-run noise, larger than the decode time)."""
    ids = torch.tensor([prompt])
    cache = make_cache()
    if cache is None:  # not `or`: a transformers Cache with no layers yet has len 0, so it is falsy
        cache = new_cache(model)
    arg = cache_argument(model.forward)
    out = model(ids, use_cache=True, logits_to_keep=1, **{arg: cache})
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    t = time.perf_counter()
    for _ in range(tokens):
        nxt = model(nxt, use_cache=True, **{arg: cache}).logits[:, -1].argmax(-1, keepdim=True)
    return tokens / max(1e-9, time.perf_counter() - t)


def compile_one(model, tok, budget: float, precision: str, quick: bool) -> HeadPolicy:
    extra = dict(lengths=(512,), kinds=("passkey",), depths=(0.5,), text_length=768, text_from=256, heldout=False,
                 reference_context=512, windows=(64, 128)) if quick else {}  # fmt: skip
    settings = C.CompileSettings(kv_budget=budget, precision=precision, **extra)
    return C.compile_policy(model, tok, settings, progress=True).policy


def policy_file(tag: str, name: str) -> Path:
    """Where a run keeps the policy it measured as `name` (native / auto)."""
    return RESULTS / f"precision_{tag}_{name}.yaml"


def main() -> int:
    args = parse()
    torch.manual_seed(0)
    lengths = tuple(int(x) for x in args.lengths.split(","))
    if args.quick:
        lengths = tuple(min(n, 512) for n in lengths[:1])
    model, tok = load_source(args.model)
    model.eval()
    info = describe_model(model)
    codec = T.as_codec(tok)
    dtype_bytes = next(model.parameters()).element_size()
    tag = args.tag or ("quick" if args.quick else info.name)
    policies, copies = {}, []
    budget = max(args.kv_budget, 0.3) if args.quick else args.kv_budget  # 512-token quick runs: sink + window is 25%
    for name, path, precision in (("native", args.native, "native"), ("auto", args.auto, "auto")):
        t0 = time.perf_counter()
        policies[name] = HeadPolicy.load(path) if path else compile_one(model, tok, budget, precision,
                                                                        args.quick)  # fmt: skip
        kept = policy_file(tag, name)  # beside the results (a later run can take it back)
        if not path:
            policies[name].save(kept)  # compiled here: kept at once, so a stopped run loses no compile
        elif Path(path).resolve() != kept.resolve():
            copies.append(name)  # a given file: copied beside the results once they are written
        print(f"[{name}: {policies[name].num_retrieval}/{policies[name].num_heads} retrieval, "
              f"{policies[name].num_quantized} quantised, {time.perf_counter() - t0:.0f}s]", flush=True)  # fmt: skip

    configs: list[tuple[str, object, object, str | None]] = [("full", model, None, None)]
    for name, (backend, bits) in PEER_NAMES.items():
        if name not in args.peers:
            continue
        reason = peer_status(backend, bits, model)
        make = (lambda b=backend, n=bits: peer_cache(b, n, model)) if reason is None else None
        configs.append((name, model, make, reason))
    for name, pol in policies.items():
        configs.append((name, applied_copy(model, pol), None, None))

    suite = SuiteSettings(lengths=lengths, seeds=1 if args.quick else args.seeds,
                          depths=(0.5,) if args.quick else SuiteSettings.depths,
                          kinds=("passkey", "word") if args.quick else T.NEEDLE_KINDS,
                          text_lengths=lengths, texts=1 if args.quick else 2,
                          text_from=min(1024, lengths[0] // 2))  # fmt: skip
    tasks = suite_tasks(codec, suite)
    texts = suite_texts(codec, suite, context_limit(model))
    rows: dict[str, dict] = {}
    for name, m, make, reason in configs:
        if reason is not None:
            rows[name] = {"skipped": reason}
            print(f"[{name}: skipped: {reason}]", flush=True)
            continue
        new_cache = make if make is not None else (lambda: None)
        per_len = {}
        for L in lengths:
            items = [t for t in tasks if t.length == L]
            t0 = time.perf_counter()
            outs = [answer(m, codec, t, new_cache) for t in items]
            nll = [text_nll(m, t, suite.text_from, make) for t in texts if len(t) == L]
            rate = decode_rate(m, list(items[0].input_ids), 4 if args.quick else args.decode_tokens, new_cache)
            per_len[L] = {"correct": [c for c, _ in outs], "kv_bytes": float(np.mean([b for _, b in outs])),
                          "text_nll": nll, "decode_tok_s": rate,
                          "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
            print(f"[{name} @ {L}: {sum(c for c, _ in outs)}/{len(outs)} right, {time.perf_counter() - t0:.0f}s]",
                  flush=True)  # fmt: skip
        rows[name] = per_len
        if m is not model:
            del m

    result = summarise(rows, lengths, dtype_bytes)
    result["meta"] = {"model": info.name, "dtype_bytes": dtype_bytes, "kv_budget": args.kv_budget,
                      "lengths": list(lengths), "items_per_length": len(tasks) // len(lengths),
                      "peer_settings": {"q_group_size": PEER_GROUP, "residual_length": PEER_RESIDUAL},
                      "policies": {k: {"retrieval": p.num_retrieval, "quantized": p.num_quantized,
                                       "heads": p.num_heads, "file": f"bench/results/{policy_file(tag, k).name}"}
                                   for k, p in policies.items()},
                      "quick": args.quick, "threads": torch.get_num_threads(),
                      "machine": platform.machine()}  # fmt: skip
    out = write_json(RESULTS / f"precision_{tag}.json", result)
    for name in copies:
        policies[name].save(policy_file(tag, name))
    print(format_table(result))
    print(out)
    return 0


def summarise(rows: dict, lengths, dtype_bytes: int) -> dict:
    full = rows["full"]
    table = {}
    for name, per_len in rows.items():
        if "skipped" in per_len:
            table[name] = per_len
            continue
        table[name] = {}
        for L in lengths:
            r, f = per_len[L], full[L]
            frac = r["kv_bytes"] / f["kv_bytes"]
            ppl = math.exp(np.mean(r["text_nll"]) - np.mean(f["text_nll"])) if r["text_nll"] else None
            table[name][str(L)] = {
                "kv_bytes": r["kv_bytes"], "kv_fraction": round(frac, 5),
                "kv_fraction_bf16": round(frac * dtype_bytes / 2, 5),
                "accuracy": round(float(np.mean(r["correct"])), 4), "paired": paired(f["correct"], r["correct"]),
                "ppl_ratio": None if ppl is None else round(ppl, 5),
                "decode_tok_s": round(r["decode_tok_s"], 2),
                "decode_vs_native": None if "native" not in rows or "skipped" in rows["native"]
                else round(r["decode_tok_s"] / rows["native"][L]["decode_tok_s"], 3),
            }  # fmt: skip
    return {"configs": table}


def format_table(result: dict) -> str:
    head = f"{'config':<12} {'len':>5} {'KV/full':>8} {'KV/bf16':>8} {'acc':>6} {'lost':>5} {'gained':>6} " \
           f"{'ppl x':>7} {'tok/s':>7} {'vs native':>9}"  # fmt: skip
    lines = [head, "-" * len(head)]
    for name, per_len in result["configs"].items():
        if "skipped" in per_len:
            lines.append(f"{name:<12} skipped: {per_len['skipped']}")
            continue
        for L, r in per_len.items():
            ppl = "-" if r["ppl_ratio"] is None else f"{r['ppl_ratio']:.4f}"
            vs = "-" if r["decode_vs_native"] is None else f"{r['decode_vs_native']:.2f}"
            lines.append(f"{name:<12} {L:>5} {r['kv_fraction']:>8.3f} {r['kv_fraction_bf16']:>8.3f} "
                         f"{r['accuracy']:>6.3f} {r['paired']['lost']:>5} {r['paired']['gained']:>6} {ppl:>7} "
                         f"{r['decode_tok_s']:>7.1f} {vs:>9}")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
