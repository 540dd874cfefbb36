"""Launchers for the generated kernels: check shapes and strides, pick a spec, launch.

These run the Triton kernels directly (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1).
The runtime should call the custom ops in ops.py instead, which choose between these and the
PyTorch reference.
"""

from __future__ import annotations

import functools
import math
import os

import torch

from headpolicy.codegen.emitter import load_kernels
from headpolicy.codegen.spec import DecodeSpec, PrefillSpec, as_list, dtype_tag, head_runs, next_pow2

LOG2E = math.log2(math.e)
MAX_SPLITS = 128


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


_interpreter_checked = False


def _interpreter_stdlib() -> None:
    """Make triton.language's own @jit helpers (tl.zeros, tl.max, ...) interpretable.

    They are wrapped when triton.language is imported, which torch/transformers often do before
    TRITON_INTERPRET=1 is set; the interpreter then cannot call them. Re-import them once.
    """
    global _interpreter_checked
    if _interpreter_checked or not interpreting():
        return
    import importlib

    import triton.language as tl
    from triton.runtime.jit import JITFunction

    if isinstance(tl.zeros, JITFunction):
        importlib.reload(tl.standard)
        importlib.reload(tl)
    _interpreter_checked = True


def _upcast_matmul(dtype: torch.dtype) -> bool:
    """The interpreter multiplies bf16 tiles as raw uint16 (no numpy bf16): build those in fp32."""
    return interpreting() and dtype == torch.bfloat16


def _check_device(*tensors: torch.Tensor) -> None:
    dev = tensors[0].device
    for t in tensors:
        if t.device != dev:
            raise ValueError(f"all tensors must be on one device, got {t.device} and {dev}")
    if dev.type != "cuda" and not interpreting():
        raise RuntimeError(
            f"headpolicy Triton kernels need CUDA tensors (got {dev}); on CPU set TRITON_INTERPRET=1 "
            "before importing triton, or use the reference backend"
        )
    _interpreter_stdlib()


def _last_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _nonempty(t: torch.Tensor) -> torch.Tensor:
    """A zero-size tensor's pointer may be null; hand the kernel a real (never read) element instead."""
    return t if t.numel() else t.new_zeros((1,) * t.dim())


def default_blocks(head_dim: int, device, dtype: str = "f16") -> dict:
    """Block sizes and launch settings (shared memory stays under ~100 KB, which every sm_80+ has).

    The interpreter gets the smallest tiles tl.dot allows.
    """
    if torch.device(device).type != "cuda":
        return dict(block_m=16, block_n=16, num_warps=1, num_stages=1)
    block_d = max(16, next_pow2(head_dim))
    if dtype == "f32":
        big = block_d > 64  # fp32 tiles are twice as large: fewer rows and a single stage
        return dict(
            block_m=32 if big else 64, block_n=16 if block_d > 128 else 32, num_warps=4, num_stages=1 if big else 2
        )
    if block_d <= 64:
        return dict(block_m=64, block_n=64, num_warps=4, num_stages=3)
    if block_d <= 128:
        return dict(block_m=128, block_n=64, num_warps=8, num_stages=2)
    return dict(block_m=64, block_n=32, num_warps=8, num_stages=2)


def prefill_spec(q: torch.Tensor, k: torch.Tensor, retrieval, sink, window, **blocks) -> PrefillSpec:
    """The PrefillSpec of a layer's head table for these tensors (built once per table and shape)."""
    blocks = tuple(sorted((k_, v_) for k_, v_ in blocks.items() if v_ is not None))
    table = (tuple(bool(x) for x in as_list(retrieval)), tuple(int(x) for x in as_list(sink)),
             tuple(int(x) for x in as_list(window)))  # fmt: skip
    upcast = _upcast_matmul(q.dtype)
    return _prefill_spec(q.shape[-1], q.shape[1] // k.shape[1], table, q.dtype, q.device.type, blocks, upcast)


@functools.lru_cache(maxsize=256)
def _prefill_spec(
    head_dim: int, group: int, table: tuple, dtype: torch.dtype, device_type: str, blocks: tuple, upcast: bool
):
    cfg = default_blocks(head_dim, device_type, dtype_tag(dtype)) | dict(blocks)
    return PrefillSpec(
        head_dim=head_dim,
        group_size=group,
        runs=head_runs(*table),
        dtype=dtype_tag(dtype),
        upcast_matmul=upcast,
        **cfg,
    )


def _on_tensor_device(fn):
    """Launch on the GPU that holds q (Triton launches on the current device)."""

    @functools.wraps(fn)
    def launch(q, *args, **kwargs):
        if not q.is_cuda:
            return fn(q, *args, **kwargs)
        with torch.cuda.device(q.device):
            return fn(q, *args, **kwargs)

    return launch


@_on_tensor_device
def prefill_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pad: torch.Tensor | None,
    retrieval,
    sink,
    window,
    scale: float,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    trace: torch.Tensor | None = None,
) -> torch.Tensor:
    """Generated prefill kernel. q: [B, Hq, S, D]; k, v: [B, Hkv, T, D] (queries = last S slots);
    pad: [B] left-padding counts or None; retrieval/sink/window: per-KV-head table [Hkv].

    trace (tests only): int32 [B * Hq, cdiv(S, block_m), cdiv(T, block_n)] zeros; counts key-block loads.
    Returns [B, Hq, S, D] in q.dtype.
    """
    B, Hq, S, D = q.shape
    _, Hkv, T, _ = k.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"prefill: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not agree")
    if Hq % Hkv or S > T:
        raise ValueError(f"prefill: need Hq % Hkv == 0 and S <= T, got Hq={Hq} Hkv={Hkv} S={S} T={T}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"prefill: q/k/v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    _check_device(q, k, v)
    spec = prefill_spec(q, k, retrieval, sink, window, block_m=block_m, block_n=block_n)
    if spec.num_kv_heads != Hkv:
        raise ValueError(f"prefill: the head table has {spec.num_kv_heads} KV heads, k has {Hkv}")
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # dense: the kernel stores D contiguously
    if B * Hq * S == 0:
        return out
    q, k, v = _last_contiguous(q), _last_contiguous(k), _last_contiguous(v)
    pad32 = (torch.zeros(B, device=q.device) if pad is None else pad).to(device=q.device, dtype=torch.int32)
    pad32 = pad32.reshape(B).contiguous()  # read as PAD + b
    grid = (triton_cdiv(S, spec.block_m), B * Hq)
    if trace is not None:
        want = (B * Hq, grid[0], triton_cdiv(T, spec.block_n))
        if tuple(trace.shape) != want or trace.dtype != torch.int32:
            raise ValueError(f"prefill: trace must be int32 {want}, got {trace.dtype} {tuple(trace.shape)}")
    mod = load_kernels(spec)
    mod.prefill_kernel[grid](
        q, k, v, out, pad32, trace if trace is not None else pad32,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        S, T, Hq, scale * LOG2E,
        TRACE=trace is not None, num_warps=mod.NUM_WARPS, num_stages=mod.NUM_STAGES,
    )  # fmt: skip
    return out


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_splits(n_blocks: int, programs: int, device: torch.device) -> int:
    """Split-K factor: enough programs to fill the GPU, at least 4 key blocks per split."""
    if device.type != "cuda" or n_blocks <= 4:
        return 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    want = triton_cdiv(2 * sms, max(1, programs))
    return max(1, min(want, triton_cdiv(n_blocks, 4), MAX_SPLITS))


@functools.lru_cache(maxsize=256)
def decode_spec(
    head_dim: int, group_size: int, num_retrieval: int, groups: tuple, dtype: torch.dtype, device_type: str,
    block_n: int | None = None,
    upcast: bool = False,
    quant: tuple = (),
    kv_group: int = 0,
) -> DecodeSpec:
    """The DecodeSpec of one layer's cache layout, built once per layout (cached)."""
    cfg = default_blocks(head_dim, device_type, dtype_tag(dtype))
    return DecodeSpec(
        head_dim=head_dim,
        group_size=group_size,
        num_retrieval=num_retrieval,
        groups=groups,
        dtype=dtype_tag(dtype),
        block_n=block_n or cfg["block_n"],
        num_warps=min(4, cfg["num_warps"]),  # a [BLOCK_G, BLOCK_N] tile: 4 warps are plenty
        num_stages=cfg["num_stages"],
        upcast_matmul=upcast,
        quant=quant,
        kv_group=kv_group if quant else 0,
    )


def _check_decode(q, k_full, v_full, group_k, group_v, lists) -> tuple[int, int, int, int]:
    """Shapes shared by both decode launchers; returns (B, Hq, D, R)."""
    B, Hq, S, D = q.shape
    if S != 1:
        raise ValueError(f"decode: expects one query per row, got q {tuple(q.shape)}")
    if any(len(x) != len(lists[0]) for x in lists):
        sizes = [len(x) for x in lists]
        raise ValueError(f"decode: per-group lists must all have {len(lists[0])} entries, got {sizes}")
    for name, t in [("k_full", k_full), ("v_full", v_full), *[("group_k", t) for t in group_k],
                    *[("group_v", t) for t in group_v]]:  # fmt: skip
        if t.dim() != 4 or t.shape[0] != B or t.shape[3] != D or t.dtype != q.dtype:
            raise ValueError(f"decode: {name} must be [B={B}, H, N, D={D}] {q.dtype}, got {tuple(t.shape)} {t.dtype}")
    return B, Hq, D, k_full.shape[1]


@_on_tensor_device
def decode_triton(
    q: torch.Tensor,
    q_rank: torch.Tensor,
    k_full: torch.Tensor,
    v_full: torch.Tensor,
    full_rank: torch.Tensor | None,
    group_k: list[torch.Tensor],
    group_v: list[torch.Tensor],
    group_rank: list[torch.Tensor],
    group_sink: list[int],
    group_window: list[int],
    scale: float,
    *,
    block_n: int | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Generated decode kernels over the split cache (argument meanings: ops.decode_attention).

    num_splits forces the split-K factor of every part (capped by its key blocks). Returns [B, Hq, 1, D].
    """
    B, Hq, D, R = _check_decode(q, k_full, v_full, group_k, group_v, (group_sink, group_k, group_v, group_rank,
                                                                       group_window))  # fmt: skip
    kv_heads = R + sum(t.shape[1] for t in group_k)
    if kv_heads == 0 or Hq % kv_heads:
        raise ValueError(f"decode: {Hq} query heads do not divide over {kv_heads} KV heads")
    _check_device(q, q_rank, k_full, v_full, *group_k)
    groups = tuple((t.shape[1], int(s), int(w)) for t, s, w in zip(group_k, group_sink, group_window, strict=True))
    spec = decode_spec(D, Hq // kv_heads, R, groups, q.dtype, q.device.type, block_n, _upcast_matmul(q.dtype))
    # parts in cache order: (k, v, rank | None); a retrieval part without padding has no ranks
    parts = [_Plain(k_full, v_full, full_rank)] if R else []
    parts += [_Plain(k, v, rank) for k, v, rank in zip(group_k, group_v, group_rank, strict=True)]
    return _decode(q, q_rank, spec, parts, num_splits, scale)


@_on_tensor_device
def decode_quantized_triton(
    q, q_rank, k_full, v_full, full_rank, group_k, group_v, group_rank, group_sink, group_window,
    quant, quant_retrieval, quant_bits, quant_sink, quant_window, kv_group: int, scale: float,
    *,
    block_n: int | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """Generated decode kernels over a split cache with quantised parts (arguments:
    ops.decode_attention_quantized): plain parts as decode_triton, quantised ones read as codes.
    Returns [B, Hq, 1, D]."""
    from headpolicy.codegen.reference import quantized_parts

    B, Hq, D, R = _check_decode(q, k_full, v_full, group_k, group_v, (group_sink, group_k, group_v, group_rank,
                                                                       group_window))  # fmt: skip
    coded = quantized_parts(quant, quant_retrieval, quant_bits, kv_group)
    for i, (k, v, rank, k_tail, v_tail, tail_rank) in enumerate(coded):
        _check_quantized_part(i, k, v, rank, k_tail, v_tail, tail_rank, q)
    kv_heads = R + sum(t.shape[1] for t in group_k) + sum(c[0].codes.shape[1] for c in coded)
    if kv_heads == 0 or Hq % kv_heads:
        raise ValueError(f"decode: {Hq} query heads do not divide over {kv_heads} KV heads")
    _check_device(q, q_rank, k_full, v_full, *group_k, *quant)
    groups = tuple((t.shape[1], int(s), int(w)) for t, s, w in zip(group_k, group_sink, group_window, strict=True))
    table = zip(coded, quant_retrieval, quant_bits, quant_sink, quant_window, strict=True)
    rules = tuple((c[0].codes.shape[1], bool(r), int(b), int(s), int(w)) for c, r, b, s, w in table)
    spec = decode_spec(D, Hq // kv_heads, R, groups, q.dtype, q.device.type, block_n, _upcast_matmul(q.dtype),
                       rules, int(kv_group))  # fmt: skip
    n_r = sum(1 for r in quant_retrieval if r)
    quantised = [_Coded(*c) for c in coded]
    parts = ([_Plain(k_full, v_full, full_rank)] if R else []) + quantised[:n_r]
    parts += [_Plain(k, v, rank) for k, v, rank in zip(group_k, group_v, group_rank, strict=True)]
    parts += quantised[n_r:]
    return _decode(q, q_rank, spec, parts, num_splits, scale)


def _check_quantized_part(i, k, v, rank, k_tail, v_tail, tail_rank, q) -> None:
    B, D = q.shape[0], q.shape[3]
    H, n = k.codes.shape[1], k.codes.shape[2]
    for name, x in (("k", k), ("v", v)):
        if x.codes.dtype != torch.uint8 or x.codes.dim() != 4 or x.codes.shape[:3] != (B, H, n) or x.head_dim != D:
            raise ValueError(f"decode: quantised part {i} {name} codes must be uint8 [B={B}, H, N, D*bits/8] for "
                             f"D={D}, got {x.codes.dtype} {tuple(x.codes.shape)}")  # fmt: skip
        if x.scale.dtype != torch.float16 or x.zero.shape != x.scale.shape or x.zero.stride() != x.scale.stride():
            raise ValueError(f"decode: quantised part {i} {name} scales/zeros must be float16 of one shape and layout")
        if any(t.stride(-1) != 1 for t in x.tensors()):
            raise ValueError(f"decode: quantised part {i} {name} tensors must be contiguous in their last dimension")
    if tuple(rank.shape) != (B, n):
        raise ValueError(f"decode: quantised part {i} ranks must be [B={B}, N={n}], got {tuple(rank.shape)}")
    if k_tail.shape != v_tail.shape or k_tail.dtype != q.dtype or tuple(tail_rank.shape) != (B, k_tail.shape[2]):
        raise ValueError(f"decode: quantised part {i} residual k/v must be [B, H, Nt, D] {q.dtype} with ranks [B, Nt]")


class _Plain:
    """A part in the model's dtype: k, v [B, H, N, D], ranks [B, N] or None (slot = rank)."""

    def __init__(self, k, v, rank):
        self.k, self.v, self.rank = k, v, rank
        self.heads, self.blocks_of = k.shape[1], lambda bn: triton_cdiv(k.shape[2], bn)

    def launch(self, mod, grid, common, run, q_rank):
        k, v = _nonempty(_last_contiguous(self.k)), _nonempty(_last_contiguous(self.v))
        r = _nonempty(_last_contiguous(self.rank)) if self.rank is not None else q_rank
        q3, o_part, lse_part, h0, Hq, per, max_splits, qk_scale = common
        mod.decode_split_kernel[grid](
            q3, q_rank, k, v, r, o_part, lse_part,
            q3.stride(0), q3.stride(1), *k.stride()[:3], *v.stride()[:3], r.stride(0) if self.rank is not None else 0,
            self.k.shape[2], self.heads, h0, Hq, per, max_splits, qk_scale,
            HAS_RANK=self.rank is not None, IS_RETRIEVAL=run.retrieval, SINK=run.sink,
            WINDOW=max(1, run.window), num_warps=mod.NUM_WARPS, num_stages=mod.NUM_STAGES,
        )  # fmt: skip


class _Coded:
    """A quantised part: k, v precision.Quantized [B, H, NQ], ranks [B, NQ], then a full-precision tail."""

    def __init__(self, k, v, rank, k_tail, v_tail, tail_rank):
        self.k, self.v, self.rank, self.k_tail, self.v_tail, self.tail_rank = k, v, rank, k_tail, v_tail, tail_rank
        self.heads = k.codes.shape[1]
        self.blocks_of = lambda bn: triton_cdiv(k.codes.shape[2], bn) + triton_cdiv(k_tail.shape[2], bn)

    def launch(self, mod, grid, common, run, q_rank):
        q3, o_part, lse_part, h0, Hq, per, max_splits, qk_scale = common
        kc, ks, kz = (_nonempty(t) for t in self.k.tensors())
        vc, vs, vz = (_nonempty(t) for t in self.v.tensors())
        r, rt = _nonempty(self.rank.contiguous()), _nonempty(self.tail_rank.contiguous())
        kt, vt = _nonempty(self.k_tail.contiguous()), _nonempty(self.v_tail.contiguous())
        mod.decode_quant_split_kernel[grid](
            q3, q_rank, kc, ks, kz, vc, vs, vz, r, kt, vt, rt, o_part, lse_part,
            q3.stride(0), q3.stride(1), *kc.stride()[:3], *ks.stride()[:3], *vc.stride()[:3], *vs.stride()[:3],
            r.stride(0), *kt.stride()[:3], rt.stride(0),
            self.k.codes.shape[2], self.k_tail.shape[2], self.heads, h0, Hq, per, max_splits, qk_scale,
            BITS=run.bits, IS_RETRIEVAL=run.retrieval, SINK=run.sink, WINDOW=max(1, run.window),
            num_warps=mod.NUM_WARPS, num_stages=mod.NUM_STAGES,
        )  # fmt: skip


def _decode(q, q_rank, spec: DecodeSpec, parts: list, num_splits: int | None, scale: float) -> torch.Tensor:
    """Launch one split-K kernel per part (in cache order, matching spec.runs), then the combine kernel."""
    B, Hq, _, D = q.shape
    mod = load_kernels(spec)
    bn = spec.block_n
    q3 = _last_contiguous(q[:, :, 0])  # [B, Hq, D]
    q_rank = q_rank.reshape(B).to(device=q.device, dtype=torch.int64).contiguous()  # read as QRANK + b
    launches, h0 = [], 0
    for part, run in zip(parts, spec.runs, strict=True):
        n_blocks = part.blocks_of(bn)
        splits = num_splits if num_splits is not None else _num_splits(n_blocks, B * part.heads, q.device)
        per = max(1, triton_cdiv(n_blocks, max(1, splits)))
        launches.append((part, run, h0, per, max(1, triton_cdiv(n_blocks, per))))
        h0 += part.heads
    max_splits = max(x[4] for x in launches)
    o_part = torch.empty(B * Hq, max_splits, D, dtype=torch.float32, device=q.device)
    lse_part = torch.full((B * Hq, max_splits), float("-inf"), dtype=torch.float32, device=q.device)
    for part, run, h0, per, splits in launches:
        if part.heads == 0:
            continue
        common = (q3, o_part, lse_part, h0, Hq, per, max_splits, scale * LOG2E)
        part.launch(mod, (B * part.heads, splits), common, run, q_rank)
    out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
    mod.decode_combine_kernel[(B * Hq,)](
        o_part, lse_part, out, out.stride(0), out.stride(1), Hq, max_splits,
        BLOCK_S=max(2, next_pow2(max_splits)), num_warps=1,
    )  # fmt: skip
    return out[:, :, None, :]
