"""Shared pieces of the codegen tests (conftest.py has already set TRITON_INTERPRET)."""

import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def kernel_devices():
    """Device params for kernel tests, each skipping with its reason."""
    cpu_skip = None if INTERPRET else "CPU kernel runs need TRITON_INTERPRET=1 (off: a GPU is present)"
    if torch.cuda.is_available():
        cuda_skip = "TRITON_INTERPRET=1 is set: kernels run in the interpreter, not on the GPU" if INTERPRET else None
    else:
        cuda_skip = "no CUDA device: the GPU variant of this test needs one"
    return [
        pytest.param("cpu", marks=pytest.mark.skipif(cpu_skip is not None, reason=cpu_skip or "")),
        pytest.param(
            "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(cuda_skip is not None, reason=cuda_skip or "")]
        ),
    ]


TOL = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=3e-3, rtol=3e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=2e-2),
}
