"""Triton kernels generated per policy, behind two `torch.library` custom ops.

README
======

What is here
------------
- spec.py       PrefillSpec / DecodeSpec: every constant a kernel is specialised on
                (head_dim, group size, per-KV-head table, dtype, block sizes, warps, stages)
                and a filename-safe name built from all of them plus the template hash.
- templates.py  the Triton sources with `$placeholders`.
- emitter.py    render a spec, write it to the on-disk cache
                ($HEADPOLICY_KERNEL_CACHE, else ~/.cache/headpolicy/kernels), import it once
                per process. HEADPOLICY_DISABLE_CODEGEN=1 or `set_enabled(False)` makes that
                raise CodegenDisabledError; a missing Triton raises KernelCompileError.
- kernels.py    launchers (shape/stride checks, split-K choice, launch).
- reference.py  the PyTorch references of the two ops (dense, built on policies/rule.py).
- ops.py        the custom ops `torch.ops.headpolicy.prefill_attention` and
                `torch.ops.headpolicy.decode_attention`, with fake implementations.
- cpu.py        CPU kernels for quantised KV parts (decode over the codes; quantising a new
                token into a ring slot): cpu_kernels.c built with the system C compiler per
                (head_dim, bits, group, queries per KV head) into the same cache, called through
                ctypes; the PyTorch path where no compiler is found.
- aot.py        compile the generated kernels for a CUDA arch without a GPU
                (`python -m headpolicy.codegen.aot --arch 90 --dtype bf16 --head-dim 128`).

Testing on CPU: with TRITON_INTERPRET=1 the launchers run the kernels in Triton's
interpreter (tests/codegen sets it). Set it before the first kernel is loaded; if torch has
already imported triton.language by then, the launchers re-import its @jit helpers once so
the interpreter can call them. The interpreter has no bf16 matmul, so bf16 interpreter builds
multiply in fp32 (spec.upcast_matmul, "_mmf32" in the name); GPU builds never do.

Importing this package imports torch only; Triton is imported when a kernel is first loaded.

Which implementation runs
-------------------------
backend "auto" (default): CUDA tensors run the generated kernels, anything else the PyTorch
reference. "triton" forces the kernels (CPU tensors need TRITON_INTERPRET=1), "reference"
forces PyTorch. Choose with `set_backend(name)`, `with backend(name):` or
HEADPOLICY_KERNEL_BACKEND. The choice happens inside the op at run time, so eager code,
torch.export graphs and torch.compile (the op is opaque to it) all follow it.

How the runtime calls them (runtime/attention.py `_kernel`, one layer, plan = policies.plan.LayerPlan)
----------------------------------------------------------------------------------------------------
Prefill of a fresh sequence (no cache yet, or plain K/V holding every token), left padding:

    retrieval, sink, window = plan.head_table        # built once per plan
    out = torch.ops.headpolicy.prefill_attention(q, k, v, pad, retrieval, sink, window, scale)

(pad: [B] left-padding counts or None; the queries are the last S of the T slots.)

Decode (S == 1) over a SplitKVCache layer, the new token already committed (a ring slot it
overwrites holds rank q_rank - window, which the query may not attend anyway):

    out = torch.ops.headpolicy.decode_attention(
        q, q_rank, layer.keys, layer.values, k_rank,
        [s.k for s in layer.streams], [s.v ...], [s.rank ...], plan.group_sinks, plan.group_windows, scale)

(q [B, Hq, 1, D], q_rank [B]; the retrieval part [B, R, T, D] with key ranks [B, T] or None;
each streaming group's one buffer [B, Hg, <= sink + window, D] with ranks: sink tokens and
ring tokens share it, the ranks tell them apart.)

Specs (every compile-time constant of a kernel) are built once per layout and cached
(kernels.prefill_spec / kernels.decode_spec), so a decode step does no planning.
Chunked prefill on top of a split cache (S > 1 with a cache) keeps the PyTorch path.
A policy with compensation tokens (policies/rule.py) has no kernel: `_kernel` raises
UnsupportedPolicyError for such a plan, and HEADPOLICY_KERNEL_BACKEND=reference runs it in PyTorch.
"""

from headpolicy.codegen.emitter import cache_dir, codegen_enabled, kernel_path, load_kernels, render, set_enabled
from headpolicy.codegen.ops import backend, decode_attention, get_backend, prefill_attention, set_backend
from headpolicy.codegen.spec import DecodeSpec, HeadRun, PrefillSpec, head_runs

__all__ = [
    "DecodeSpec",
    "HeadRun",
    "PrefillSpec",
    "backend",
    "cache_dir",
    "codegen_enabled",
    "decode_attention",
    "get_backend",
    "head_runs",
    "kernel_path",
    "load_kernels",
    "prefill_attention",
    "render",
    "set_backend",
    "set_enabled",
]
