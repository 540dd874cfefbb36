"""`torch.library` custom ops: headpolicy::prefill_attention, headpolicy::decode_attention and
headpolicy::decode_attention_quantized (decode over a cache with quantised heads).

Eager code, torch.export graphs and torch.compile all call these same ops. Each op has a
fake (meta) implementation, so tracing never runs a kernel. Which implementation runs:

    backend "auto" (default)  CUDA tensors -> generated Triton kernels, otherwise the PyTorch reference
                              (decode of quantised parts on the CPU: the C kernel of codegen/cpu.py)
    backend "triton"          always the kernels (CPU needs TRITON_INTERPRET=1; tests use this)
    backend "reference"       always the PyTorch reference

Set it with `set_backend(...)`, the `backend(...)` context manager, or HEADPOLICY_KERNEL_BACKEND.
The ops are for inference: they register no backward.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import Tensor

from headpolicy.codegen.emitter import codegen_enabled
from headpolicy.codegen.reference import (
    QUANT_TENSORS,
    decode_quantized_reference,
    decode_reference,
    prefill_reference,
)

BACKENDS = ("auto", "triton", "reference")
_backend: str | None = None  # None: follow HEADPOLICY_KERNEL_BACKEND


def set_backend(name: str | None) -> None:
    """'auto' | 'triton' | 'reference', or None to follow HEADPOLICY_KERNEL_BACKEND (default 'auto')."""
    global _backend
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose one of {BACKENDS}")
    _backend = name


def get_backend() -> str:
    name = _backend or os.environ.get("HEADPOLICY_KERNEL_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"HEADPOLICY_KERNEL_BACKEND={name!r} is not one of {BACKENDS}")
    return name


@contextlib.contextmanager
def backend(name: str):
    """Run the ops with backend `name` inside the block."""
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def use_kernels(t: Tensor) -> bool:
    """Whether work on `t` runs the generated kernels (the backend choice above; the one place it is made)."""
    name = get_backend()
    return name == "triton" or (name == "auto" and t.is_cuda)


def use_cpu_kernel(t: Tensor) -> bool:
    """Whether quantised parts' work on `t` may run the C kernels (codegen/cpu.py): backend "auto",
    code generation on, on the CPU. Asked once per layer and step (decode, and each ring write)."""
    return t.is_cpu and get_backend() == "auto" and codegen_enabled()


@torch.library.custom_op("headpolicy::prefill_attention", mutates_args=())
def prefill_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pad: Tensor | None,
    retrieval: list[bool],
    sink: list[int],
    window: list[int],
    scale: float,
) -> Tensor:
    """Headpolicy attention for queries that are the last S of T slots (a fresh prefill: S == T).

    q: [B, Hq, S, D]; k, v: [B, Hkv, T, D] (Hq % Hkv == 0, query head h reads KV head h // (Hq // Hkv));
    pad: [B] int, left-padding slots per row (rank = slot - pad), or None for no padding;
    retrieval, sink, window: per-KV-head table, length Hkv (sink/window ignored for retrieval heads);
    scale: softmax scale. Returns [B, Hq, S, D] in q.dtype; padding query rows are zeros.
    """
    if not (len(retrieval) == len(sink) == len(window) == k.shape[1]):
        raise ValueError(
            f"prefill_attention: the head table needs one entry per KV head ({k.shape[1]}), got "
            f"retrieval={len(retrieval)}, sink={len(sink)}, window={len(window)}"
        )
    if q.dim() != 4 or k.dim() != 4 or q.shape[1] % k.shape[1]:
        raise ValueError(
            f"prefill_attention: q {tuple(q.shape)} and k {tuple(k.shape)} must be [B, H, S, D], Hq % Hkv == 0"
        )
    if use_kernels(q):
        from headpolicy.codegen.kernels import prefill_triton

        return prefill_triton(q, k, v, pad, retrieval, sink, window, scale)
    return prefill_reference(q, k, v, pad, retrieval, sink, window, scale)


@prefill_attention.register_fake
def _prefill_fake(q, k, v, pad, retrieval, sink, window, scale):
    torch._check(q.shape[1] % k.shape[1] == 0, lambda: "query heads must be a multiple of KV heads")
    torch._check(len(retrieval) == k.shape[1], lambda: "the head table must have one entry per KV head")
    return torch.empty_like(q)


@torch.library.custom_op("headpolicy::decode_attention", mutates_args=())
def decode_attention(
    q: Tensor,
    q_rank: Tensor,
    k_full: Tensor,
    v_full: Tensor,
    full_rank: Tensor | None,
    group_k: list[Tensor],
    group_v: list[Tensor],
    group_rank: list[Tensor],
    group_sink: list[int],
    group_window: list[int],
    scale: float,
) -> Tensor:
    """One decode step over the split KV cache (runtime/cache.py layout), new token already stored.

    q: [B, Hq, 1, D], heads ordered [retrieval | group 0 | group 1 | ...] like the cache;
    q_rank: [B] int, rank of the query token (-1: padding row -> zeros);
    k_full, v_full: [B, R, T, D] retrieval heads (R may be 0); full_rank: [B, T] key ranks
      (-1 = padding) or None when slot t has rank t;
    per streaming group g (lists of equal length): its buffer group_k/group_v [B, Hg, N, D] with
      ranks group_rank [B, N] (-1 = empty slot; sink tokens and ring tokens share the buffer, the
      ranks tell them apart), and its rule group_sink[g], group_window[g];
    scale: softmax scale. Returns [B, Hq, 1, D] in q.dtype.
    """
    args = (q, q_rank, k_full, v_full, full_rank, group_k, group_v, group_rank, group_sink, group_window, scale)
    lists = dict(group_k=group_k, group_v=group_v, group_rank=group_rank, group_window=group_window)
    if any(len(x) != len(group_sink) for x in lists.values()):
        sizes = ", ".join(f"{name}={len(x)}" for name, x in lists.items())
        raise ValueError(f"decode_attention: one entry per streaming group ({len(group_sink)}) needed, got {sizes}")
    if use_kernels(q):
        from headpolicy.codegen.kernels import decode_triton

        return decode_triton(*args)
    return decode_reference(*args)


@decode_attention.register_fake
def _decode_fake(q, q_rank, k_full, v_full, full_rank, group_k, group_v, group_rank, group_sink, group_window, scale):
    torch._check(q.shape[2] == 1, lambda: "decode_attention takes one query per row")
    torch._check(len(group_k) == len(group_sink) == len(group_window), lambda: "one sink/window per group")
    return torch.empty_like(q)


@torch.library.custom_op("headpolicy::decode_attention_quantized", mutates_args=())
def decode_attention_quantized(
    q: Tensor,
    q_rank: Tensor,
    k_full: Tensor,
    v_full: Tensor,
    full_rank: Tensor | None,
    group_k: list[Tensor],
    group_v: list[Tensor],
    group_rank: list[Tensor],
    group_sink: list[int],
    group_window: list[int],
    quant: list[Tensor],
    quant_retrieval: list[bool],
    quant_bits: list[int],
    quant_sink: list[int],
    quant_window: list[int],
    kv_group: int,
    scale: float,
) -> Tensor:
    """decode_attention over a split cache that also has quantised parts (policies/precision.py).

    The first ten arguments and `scale` mean what they mean for decode_attention. Each quantised
    part i contributes QUANT_TENSORS tensors to `quant`, at [10 * i, 10 * i + 10):
      k codes, k scales, k zeros, v codes, v scales, v zeros   (precision.Quantized layout, uint8 / float16)
      rank [B, Nq]                                              key ranks of the coded tokens (-1 = empty)
      k_tail, v_tail [B, H, Nt, D] in q.dtype, tail rank [B, Nt] the full-precision residual (Nt = 0 for streaming)
    and its rule: quant_retrieval[i] (keys per channel over kv_group tokens, else per token),
    quant_bits[i] (8 or 4), quant_sink[i], quant_window[i] (streaming parts only).
    KV-head order (that of policies/plan.py): [k_full | quantised retrieval parts | groups |
    quantised streaming parts]. Returns [B, Hq, 1, D] in q.dtype.
    """
    n = len(quant_bits)
    if len(quant) != QUANT_TENSORS * n or not (len(quant_retrieval) == len(quant_sink) == len(quant_window) == n):
        raise ValueError(
            f"decode_attention_quantized: {n} quantised parts need {QUANT_TENSORS * n} tensors and {n} rules, "
            f"got {len(quant)} tensors, retrieval={len(quant_retrieval)}, sink={len(quant_sink)}, "
            f"window={len(quant_window)}"
        )
    if list(quant_retrieval) != sorted(quant_retrieval, reverse=True):
        raise ValueError("decode_attention_quantized: quantised retrieval parts must come before streaming ones")
    args = (q, q_rank, k_full, v_full, full_rank, group_k, group_v, group_rank, group_sink, group_window,
            quant, quant_retrieval, quant_bits, quant_sink, quant_window, kv_group, scale)  # fmt: skip
    if use_kernels(q):
        from headpolicy.codegen.kernels import decode_quantized_triton

        return decode_quantized_triton(*args)
    return decode_quantized_reference(*args)


@decode_attention_quantized.register_fake
def _decode_quantized_fake(q, *args):
    torch._check(q.shape[2] == 1, lambda: "decode_attention_quantized takes one query per row")
    return torch.empty_like(q)
