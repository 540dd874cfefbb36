"""CPU kernels for quantised KV parts: C source specialised per shape, built once.

A quantised part (policies/precision.py, runtime/quant_cache.py) decodes one query per row and
head over its codes plus a full-precision tail. The PyTorch path dequantises the whole part
into a transient float buffer every step and runs SDPA over it, so an int8 head costs more
than a float32 one. cpu_kernels.c reads the codes a row at a time instead, with the scales
folded into the query and the probabilities (its header says how). On SmolLM2 shapes (3 KV
heads x 3 queries, 4K tokens, 1 thread) it takes ~0.24 ms a layer in int8 and ~0.21 ms in
int4, where SDPA over the same heads in float32 takes ~0.4 and dequantise + SDPA ~1.1-2.
Each decode step also quantises its new token into every quantised ring; precision.quantize's
~20 small tensor ops took ~0.5 ms a layer for that, the C function a few microseconds, with
the same bits. The runtime prepares each preallocated buffer once per allocation (`prepare`:
layout checked, pointers taken) and then calls with the slots in use only.

    out = decode_quantized(q, k, v, k_tail, v_tail, scale)     # None: not built here, use PyTorch
    prepared = prepare(k_buffer, v_buffer, queries_per_kv)      # once per allocation, then:
    out = decode_prepared(q, prepared, n, k_tail, v_tail, scale)
    done = put_token(prepared, slot, k_token, v_token)          # False: not built here, use PyTorch
    step = LayerStep.build(parts, batch, kv_heads, per_kv)      # a layer's parts of one library, then
    step.set(i, n, slot, n_tail); step(q, k_new, v_new, out, scale)  # ring writes + attention, one call a step

Build: the system C compiler ($CC, else cc) with -O3 -march=native and OpenMP, into the kernel
cache (emitter.cache_dir()), one library per (head_dim, bits, group, queries per KV head),
named by a hash of the source, the flags and this CPU; loaded with ctypes once per process.
No -ffast-math: it would link crtfastmath and flush denormals for the whole process; the
kernel's exp is its own. Without a compiler, or if the build fails, a warning is logged once
and the caller keeps the PyTorch path; HEADPOLICY_DISABLE_CODEGEN=1 turns it off like the
Triton kernels. The runtime calls it only where no mask is needed (runtime/attention.decode).
The library links libgomp.so.1, which resolves to the copy torch has already loaded: one OpenMP
thread pool, sized per call by torch.get_num_threads().
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from headpolicy.codegen.emitter import cache_dir, codegen_enabled
from headpolicy.policies.precision import Quantized

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-fno-math-errno", "-fno-trapping-math", "-fassociative-math",
         "-fno-signed-zeros")  # fmt: skip
OPENMP = "-fopenmp"
LIBS = ("-lm",)  # after the source: nearbyintf where the target has no rounding instruction

_libraries: dict[tuple[int, int, int, int], ctypes.CDLL | None] = {}
_lock = threading.Lock()


class _Quantized(ctypes.Structure):
    """cpu_kernels.c's `quantized`: one Quantized's pointers and its batch/head strides."""

    _fields_ = [
        ("codes", ctypes.c_void_p),
        ("scale", ctypes.c_void_p),
        ("zero", ctypes.c_void_p),
        ("codes_batch", ctypes.c_int64),
        ("codes_head", ctypes.c_int64),
        ("scale_batch", ctypes.c_int64),
        ("scale_head", ctypes.c_int64),
    ]

    @classmethod
    def of(cls, x: Quantized) -> _Quantized:
        return cls(x.codes.data_ptr(), x.scale.data_ptr(), x.zero.data_ptr(),
                   x.codes.stride(0), x.codes.stride(1), x.scale.stride(0), x.scale.stride(1))  # fmt: skip


class _StepPart(ctypes.Structure):
    """cpu_kernels.c's `step_part`: one quantised part of a layer's decode step."""

    _fields_ = [
        ("k", _Quantized),
        ("v", _Quantized),
        ("heads", ctypes.c_int64),
        ("kv_first", ctypes.c_int64),
        ("keys_per_channel", ctypes.c_int64),
        ("n", ctypes.c_int64),
        ("slot", ctypes.c_int64),
        ("n_tail", ctypes.c_int64),
        ("k_tail", ctypes.c_void_p),
        ("v_tail", ctypes.c_void_p),
        ("tail_batch", ctypes.c_int64),
        ("tail_head", ctypes.c_int64),
    ]


_ARGTYPES = [
    ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, _Quantized, ctypes.c_int,
    _Quantized, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p,
    ctypes.c_int,
]  # fmt: skip


def _cpu_id() -> str:
    """What -march=native depends on: the CPU model and flags where Linux says, else the platform."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({x for x in lines if x.startswith(("model name", "flags", "Features"))}))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def library_path(head_dim: int, bits: int, group: int, per_kv: int, flags: tuple[str, ...]) -> Path:
    """Where the library for this specialisation lives; `flags` (compiler and options) and the
    source and CPU name it too."""
    digest = hashlib.sha256("\0".join([SOURCE.read_text(), *flags, _cpu_id()]).encode()).hexdigest()[:16]
    return cache_dir() / f"cpu_kernels_d{head_dim}_b{bits}_g{group}_q{per_kv}_{digest}.so"


@functools.cache
def _compiler_id(compiler: tuple[str, ...]) -> str:
    """The compiler's own first line of --version (part of the library's name)."""
    done = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=60)
    return " ".join(compiler) + " " + (done.stdout.splitlines() or [""])[0]


def _build(compiler: tuple[str, ...], flags: tuple[str, ...], path: Path) -> str | None:
    """Compile SOURCE into `path` (atomically: another process may build the same file); None, or
    the compiler's last error line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        done = subprocess.run([*compiler, *flags, str(SOURCE), "-o", tmp, *LIBS], capture_output=True, text=True)
        if done.returncode:
            return (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o755 & ~umask)  # mkstemp's 0600 would keep a shared cache's library from others
        os.replace(tmp, path)
        tmp = None
        log.info("headpolicy codegen: built %s", path)
        return None
    finally:
        if tmp is not None:
            os.unlink(tmp)


def _compile(spec: tuple[int, int, int, int]) -> ctypes.CDLL:
    """Build (unless cached) and load the library for `spec`; raises OSError / SubprocessError."""
    head_dim, bits, group, per_kv = spec
    compiler = tuple(shlex.split(os.environ.get("CC") or "cc"))
    if not shutil.which(compiler[0]):
        raise OSError(f"no C compiler {compiler[0]!r} on PATH (set CC)")
    defines = (f"-DHEAD_DIM={head_dim}", f"-DBITS={bits}", f"-DGROUP={group}", f"-DQPK={per_kv}")
    errors = []
    for extra in ((OPENMP,), ()):  # a compiler without OpenMP still builds it, single-threaded
        flags = (*FLAGS, *extra, *defines)
        path = library_path(*spec, (_compiler_id(compiler), *flags, *LIBS))
        if not path.exists() and (error := _build(compiler, flags, path)) is not None:
            errors.append(error)
            continue
        library = ctypes.CDLL(str(path))
        library.headpolicy_decode_quantized.argtypes = _ARGTYPES
        library.headpolicy_decode_quantized.restype = ctypes.c_int
        library.headpolicy_quantize_tokens.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, _Quantized]
        library.headpolicy_quantize_tokens.restype = None
        library.headpolicy_put_token.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_void_p,
                                                 ctypes.c_void_p, ctypes.POINTER(_Quantized),
                                                 ctypes.POINTER(_Quantized)]  # fmt: skip
        library.headpolicy_put_token.restype = None
        library.headpolicy_decode_step.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.POINTER(_StepPart),
                                                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float,
                                                   ctypes.c_void_p, ctypes.c_int]  # fmt: skip
        library.headpolicy_decode_step.restype = ctypes.c_int
        return library
    raise OSError(f"{compiler[0]} could not build {SOURCE.name}: {errors}")


def library(head_dim: int, bits: int, group: int, per_kv: int) -> ctypes.CDLL | None:
    """The loaded kernel for this specialisation, or None where it cannot be built (logged once)."""
    spec = (head_dim, bits, group, per_kv)
    with _lock:
        if spec not in _libraries:
            try:
                _libraries[spec] = _compile(spec)
            except (OSError, subprocess.SubprocessError) as e:
                log.warning("headpolicy: CPU decode kernel unavailable (%s); quantised heads use PyTorch", e)
                _libraries[spec] = None
        return _libraries[spec]


def _rows_contiguous(x: Tensor) -> bool:
    """Each head's rows are one block: [..., N, C] with unit stride along C and C along N."""
    return x.stride(-1) == 1 and (x.shape[-2] <= 1 or x.stride(-2) == x.shape[-1])


def _fits(x: Quantized, B: int, H: int, N: int, D: int) -> bool:
    """x is codes [B, H, N, *] of head dim D with its scales' shape, and what the C `quantized`
    struct assumes: rows contiguous, zeros laid out like scales (their strides are not passed)."""
    rows = N // x.group if x.per_channel else N
    cols = D if x.per_channel else -(-D // x.group)
    return (
        x.codes.dim() == 4 and tuple(x.codes.shape[:3]) == (B, H, N) and x.head_dim == D
        and tuple(x.scale.shape) == (B, H, rows, cols) and x.zero.shape == x.scale.shape
        and x.zero.stride() == x.scale.stride() and all(_rows_contiguous(t) for t in x.tensors())
    )  # fmt: skip


@dataclass(frozen=True)
class Prepared:
    """A quantised K/V buffer pair, checked once for the C kernels: the runtime prepares each
    preallocated buffer when it is (re)allocated and then calls with pointers only, so a decode
    step does not re-validate or re-slice what has not changed (~40 calls a token).

    k, v: the C structs of the whole buffers [B, H, capacity, *] (slots past those in use are
    never read); `lib` the library for (head_dim, bits, group, per_kv)."""

    lib: ctypes.CDLL
    k: _Quantized
    v: _Quantized
    keys_per_channel: bool
    batch: int
    heads: int
    head_dim: int
    group: int
    capacity: int
    per_kv: int
    buffers: tuple[Quantized, Quantized]  # what the pointers point into, kept alive with them

    @property
    def token_shape(self) -> tuple[int, int, int]:
        """One token per row and head: [B, H, D] (what put_token takes)."""
        return self.batch, self.heads, self.head_dim


def prepare(k: Quantized, v: Quantized, per_kv: int) -> Prepared | None:
    """k, v: codes [B, H, N, *] (keys per channel in whole groups, or per token; values per token)
    laid out as the C struct assumes; None where the kernels do not apply or cannot be built here."""
    if k.codes.dim() != 4 or per_kv < 1:
        return None
    B, H, N = k.codes.shape[:3]
    D = k.head_dim
    if (
        not codegen_enabled() or k.codes.device.type != "cpu" or (k.per_channel and N % k.group) or v.per_channel
        or k.group != v.group or k.bits != v.bits or not (_fits(k, B, H, N, D) and _fits(v, B, H, N, D))
    ):  # fmt: skip
        return None
    lib = library(D, k.bits, k.group, per_kv)
    if lib is None:
        return None
    return Prepared(lib, _Quantized.of(k), _Quantized.of(v), k.per_channel, B, H, D, k.group, N, per_kv, (k, v))


def decode_prepared(
    q: Tensor, p: Prepared, n: int, k_tail: Tensor | None, v_tail: Tensor | None, scale: float
) -> Tensor | None:
    """Attention of one query per row and head over the first n coded tokens of `p` and the tail.

    q: [B, H * per_kv, 1, D] float32 on the CPU; k_tail, v_tail: [B, H, Nt, D] float32 tokens
    after them, or None. Every token is visible to every row. Returns [B, Hq, 1, D], or None
    when the kernel does not apply (dtype, shape, layout). A decode step calls it for each
    quantised part of each layer, so it checks only what can change after `prepare`."""
    B, Hq, S, D = q.shape
    tail = k_tail is not None and k_tail.shape[2] > 0
    if (
        not q.is_cpu or q.dtype != torch.float32 or S != 1
        or (B, Hq, D) != (p.batch, p.heads * p.per_kv, p.head_dim) or not 0 <= n <= p.capacity
        or (p.keys_per_channel and n % p.group) or n + (k_tail.shape[2] if tail else 0) == 0
    ):  # fmt: skip
        return None
    if tail:  # the C code reads both tails with k_tail's strides
        if not (
            tuple(k_tail.shape) == (B, p.heads, k_tail.shape[2], D) and v_tail.shape == k_tail.shape
            and v_tail.stride() == k_tail.stride() and k_tail.dtype == v_tail.dtype == torch.float32
            and _rows_contiguous(k_tail)
        ):  # fmt: skip
            return None
        tail_args = (k_tail.shape[2], k_tail.data_ptr(), v_tail.data_ptr(), k_tail.stride(0), k_tail.stride(1))
    else:
        tail_args = (0, None, None, 0, 0)
    n_tail, *tail_pointers = tail_args
    query = q.reshape(B, Hq, D).contiguous()
    out = torch.empty(B, Hq, 1, D, dtype=torch.float32)
    status = p.lib.headpolicy_decode_quantized(
        B, p.heads, n, n_tail, query.data_ptr(), p.k, int(p.keys_per_channel), p.v, *tail_pointers, scale,
        out.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    if status:
        raise MemoryError("headpolicy CPU decode kernel: could not allocate its score rows")
    return out


def decode_quantized(
    q: Tensor, k: Quantized, v: Quantized, k_tail: Tensor | None, v_tail: Tensor | None, scale: float
) -> Tensor | None:
    """`decode_prepared` over every token of k, v (codes [B, H, N, *]): prepared for this call."""
    H = k.codes.shape[1] if k.codes.dim() == 4 else 0
    if not H or q.dim() != 4 or q.shape[1] % H:
        return None
    p = prepare(k, v, q.shape[1] // H)
    return None if p is None else decode_prepared(q, p, k.tokens, k_tail, v_tail, scale)


def put_token(p: Prepared, slot: int, k: Tensor, v: Tensor) -> bool:
    """Quantise one token per row and head, k, v [B, H, D] float32, per token into slot `slot` of
    p's buffers (per-token keys only: a ring), with exactly the bits precision.quantize gives.
    False (nothing written) where the kernel does not apply."""
    shape = p.token_shape
    if (
        p.keys_per_channel or not 0 <= slot < p.capacity or k.dtype != torch.float32 or v.dtype != torch.float32
        or not (k.is_cpu and v.is_cpu) or k.shape != shape or v.shape != shape
    ):  # fmt: skip
        return False
    k, v = k.contiguous(), v.contiguous()  # held while C reads them
    p.lib.headpolicy_put_token(p.batch, p.heads, slot, k.data_ptr(), v.data_ptr(), p.k, p.v)
    return True


@dataclass(frozen=True)
class StepPart:
    """One quantised part of a layer for LayerStep: its prepared buffers, its first KV head in
    the layer, and its full-precision tail buffers [B, H, capacity, D] (a retrieval part's
    residual, whole allocations: the step says how many of their slots are in use) or None."""

    prepared: Prepared
    kv_first: int
    k_tail: Tensor | None = None
    v_tail: Tensor | None = None


class LayerStep:
    """A layer's quantised parts of one specialisation (bits), decoded in one C call a step.

    headpolicy_decode_step first quantises the step's token into each ring part's slot, then
    lets each part's query heads attend its coded tokens and its tail: what put_token and one
    decode_prepared per part do, without a Python round trip per part (a decode step of a
    12.5% SmolLM2 policy has ~50 parts). Built once per allocation, from raw pointers; the
    caller says per step how many tokens each part holds (`set`) and calls it."""

    def __init__(self, lib: ctypes.CDLL, batch: int, kv_heads: int, per_kv: int, head_dim: int, parts: ctypes.Array,
                 keep: tuple):  # fmt: skip
        self.lib, self.parts, self.keep = lib, parts, keep  # keep: what the pointers point into
        self.batch, self.kv_heads, self.head_dim = batch, kv_heads, head_dim
        self.q_shape = (batch, kv_heads * per_kv, 1, head_dim)
        self.token_shape = (batch, kv_heads, 1, head_dim)
        self.limits = tuple((p.capacity, p.group if p.keys_per_channel else 0, k_tail) for p, k_tail, _ in keep)

    @classmethod
    def build(cls, parts: list[StepPart], batch: int, kv_heads: int, per_kv: int) -> LayerStep | None:
        """None where the parts do not share one library, batch and head dim, or a tail is not
        float32 rows [B, H, capacity, D] with the same strides for keys and values."""
        if not parts:
            return None
        first = parts[0].prepared
        D = first.head_dim
        array = (_StepPart * len(parts))()
        for entry, part in zip(array, parts, strict=True):
            p = part.prepared
            if (p.lib is not first.lib or p.batch != batch or p.head_dim != D or p.per_kv != per_kv
                    or not 0 <= part.kv_first <= kv_heads - p.heads):  # fmt: skip
                return None
            entry.k, entry.v = p.k, p.v
            entry.heads, entry.kv_first, entry.keys_per_channel = p.heads, part.kv_first, int(p.keys_per_channel)
            entry.slot = -1
            if part.k_tail is not None:
                k, v = part.k_tail, part.v_tail
                if not (
                    k.dim() == 4 and tuple(k.shape[:2]) == (batch, p.heads) and k.shape[3] == D
                    and v.shape == k.shape and v.stride() == k.stride() and k.dtype == v.dtype == torch.float32
                    and k.is_cpu and v.is_cpu and _rows_contiguous(k)
                ):  # fmt: skip
                    return None
                entry.k_tail, entry.v_tail = k.data_ptr(), v.data_ptr()
                entry.tail_batch, entry.tail_head = k.stride(0), k.stride(1)
        keep = tuple((part.prepared, part.k_tail, part.v_tail) for part in parts)
        return cls(first.lib, batch, kv_heads, per_kv, D, array, keep)

    def set(self, i: int, n: int, slot: int = -1, n_tail: int = 0) -> None:
        """Part i attends its first n coded tokens (whole groups where keys are per channel) and
        n_tail tail tokens this step, after the step's token is quantised into its slot `slot`
        (-1: none; a ring part's). Checked: the C code indexes with them."""
        capacity, key_group, tail = self.limits[i]  # key_group: 0 for per-token keys (a ring)
        if not (0 <= n <= capacity and -1 <= slot < capacity and not (key_group and (slot >= 0 or n % key_group))
                and 0 <= n_tail <= (0 if tail is None else tail.shape[2])):  # fmt: skip
            raise ValueError(f"LayerStep part {i}: n={n}, slot={slot}, n_tail={n_tail} out of its buffers")
        entry = self.parts[i]
        entry.n, entry.slot, entry.n_tail = n, slot, n_tail

    def __call__(self, q: Tensor, k_new: Tensor, v_new: Tensor, out: Tensor, scale: float) -> bool:
        """q, out [B, Hq, 1, D] and the step's k_new, v_new [B, Hkv, 1, D], float32 CPU, contiguous:
        writes the parts' query heads of `out`; False (nothing written) where they do not fit."""
        for t, shape in ((q, self.q_shape), (out, self.q_shape), (k_new, self.token_shape), (v_new, self.token_shape)):
            if t.shape != shape or t.dtype != torch.float32 or not t.is_cpu or not t.is_contiguous():
                return False
        status = self.lib.headpolicy_decode_step(
            self.batch, self.kv_heads, len(self.parts), self.parts, q.data_ptr(), k_new.data_ptr(), v_new.data_ptr(),
            scale, out.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        if status:
            raise MemoryError("headpolicy CPU decode kernel: could not allocate its score rows")
        return True
