"""Kernel specialisations: every constant a generated kernel is built for, and its file name.

A spec is a small frozen dataclass. Its `name` is filename-safe and spells out every
parameter (plus the template's hash), so two specs share a generated file iff they would
generate the same source.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import torch

DTYPES = {torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32"}
TL_DTYPES = {"f16": "tl.float16", "bf16": "tl.bfloat16", "f32": "tl.float32"}


def dtype_tag(dtype: torch.dtype) -> str:
    try:
        return DTYPES[dtype]
    except KeyError:
        raise TypeError(f"headpolicy kernels support float16, bfloat16 and float32, got {dtype}") from None


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@dataclass(frozen=True)
class HeadRun:
    """KV heads [start, stop) that follow one rule: retrieval, or streaming with (sink, window);
    bits: how their cache is stored (16 = the model's dtype, 8/4 = policies/precision.py codes)."""

    start: int
    stop: int
    retrieval: bool
    sink: int
    window: int
    bits: int = 16

    @property
    def tag(self) -> str:
        n = self.stop - self.start
        tag = f"r{n}" if self.retrieval else f"s{self.sink}w{self.window}x{n}"
        return tag + (f"q{self.bits}" if self.bits != 16 else "")

    def describe(self) -> str:
        rule = "retrieval (causal, every key)" if self.retrieval else f"streaming sink={self.sink} window={self.window}"
        store = f", int{self.bits} codes" if self.bits != 16 else ""
        return f"KV heads [{self.start}, {self.stop}): {rule}{store}"


def head_runs(retrieval, sink, window) -> tuple[HeadRun, ...]:
    """Run-length encode a per-KV-head table (lists or 1-D tensors of equal length)."""
    retrieval = [bool(x) for x in as_list(retrieval)]
    sink, window = [int(x) for x in as_list(sink)], [int(x) for x in as_list(window)]
    if not (len(retrieval) == len(sink) == len(window)) or not retrieval:
        raise ValueError(
            f"per-KV-head table needs equal, non-zero lengths, got retrieval={len(retrieval)}, "
            f"sink={len(sink)}, window={len(window)}"
        )
    runs: list[HeadRun] = []
    for h, (r, s, w) in enumerate(zip(retrieval, sink, window, strict=True)):
        if not r and (s < 0 or w < 1):
            raise ValueError(f"KV head {h}: streaming heads need sink >= 0 and window >= 1, got sink={s} window={w}")
        key = (r, 0, 0) if r else (r, s, w)
        if runs and (runs[-1].retrieval, runs[-1].sink, runs[-1].window) == key:
            runs[-1] = HeadRun(runs[-1].start, h + 1, *key)
        else:
            runs.append(HeadRun(h, h + 1, *key))
    return tuple(runs)


def as_list(x):
    return x.tolist() if isinstance(x, torch.Tensor) else list(x)


@functools.lru_cache(maxsize=16)
def template_hash(template: str) -> str:
    return hashlib.sha256(template.encode()).hexdigest()[:10]


def _table_tag(runs: tuple[HeadRun, ...]) -> str:
    tag = "-".join(r.tag for r in runs)
    if len(tag) > 80:  # very irregular tables: keep the name short, the header still lists them all
        tag = f"t{len(runs)}runs{hashlib.sha256(tag.encode()).hexdigest()[:12]}"
    return tag


class _SpecParts:
    """What the prefill and decode specs derive alike from their fields."""

    head_dim: int
    upcast_matmul: bool

    @property
    def _mm_tag(self) -> str:
        return "_mmf32" if self.upcast_matmul else ""

    @property
    def block_d(self) -> int:
        return max(16, next_pow2(self.head_dim))


@dataclass(frozen=True)
class PrefillSpec(_SpecParts):
    """Prefill attention for one layer's KV-head table (any head order)."""

    head_dim: int
    group_size: int
    runs: tuple[HeadRun, ...]
    dtype: str  # f16 | bf16 | f32
    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2
    # the Triton interpreter has no bf16 matmul: it multiplies bf16 tiles in fp32 instead
    upcast_matmul: bool = False

    kind = "prefill"

    @property
    def num_kv_heads(self) -> int:
        return self.runs[-1].stop

    def name(self, template_sha: str) -> str:
        name = (
            f"prefill_d{self.head_dim}_g{self.group_size}_{_table_tag(self.runs)}_{self.dtype}"
            f"_bm{self.block_m}_bn{self.block_n}_w{self.num_warps}_st{self.num_stages}{self._mm_tag}_{template_sha}"
        )
        return name


@dataclass(frozen=True)
class DecodeSpec(_SpecParts):
    """Decode attention over the split cache: `num_retrieval` full heads, then streaming groups.

    groups: ((num_heads, sink, window), ...) in cache order.
    quant: ((num_heads, retrieval, bits, sink, window), ...) the quantised parts (retrieval ones
    first), read by decode_quant_split_kernel; kv_group: their values per scale (0: none).
    Cache order with quantised parts: [full heads | quantised retrieval | groups | quantised streaming].
    """

    head_dim: int
    group_size: int
    num_retrieval: int
    groups: tuple[tuple[int, int, int], ...]
    dtype: str
    block_n: int
    num_warps: int = 4
    num_stages: int = 2
    # the Triton interpreter has no bf16 matmul: it multiplies bf16 tiles in fp32 instead
    upcast_matmul: bool = False
    quant: tuple[tuple[int, bool, int, int, int], ...] = ()
    kv_group: int = 0

    kind = "decode"

    @property
    def runs(self) -> tuple[HeadRun, ...]:
        """Every part in cache order (quantised ones with their bits)."""
        rules = [(True, 0, 0, 16, self.num_retrieval)] if self.num_retrieval else []
        quant = [(r, 0 if r else s, 0 if r else w, bits, n) for n, r, bits, s, w in self.quant]
        rules += [q for q in quant if q[0]] + [(False, s, w, 16, n) for n, s, w in self.groups]
        rules += [q for q in quant if not q[0]]
        runs, pos = [], 0
        for retrieval, sink, window, bits, n in rules:
            runs.append(HeadRun(pos, pos + n, retrieval, sink, window, bits))
            pos += n
        return tuple(runs)

    @property
    def block_g(self) -> int:  # query heads per KV head, padded for tl.dot
        return max(16, next_pow2(self.group_size))

    def name(self, template_sha: str) -> str:
        quant = f"_kg{self.kv_group}" if self.quant else ""
        name = (
            f"decode_d{self.head_dim}_g{self.group_size}_{_table_tag(self.runs)}_{self.dtype}{quant}"
            f"_bn{self.block_n}_w{self.num_warps}_st{self.num_stages}{self._mm_tag}_{template_sha}"
        )
        return name
