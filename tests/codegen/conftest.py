"""Kernel tests run on CPU under the Triton interpreter, and compiled on CUDA when a GPU exists.

TRITON_INTERPRET must be set before the first kernel is defined, so it is set here: on a
machine without CUDA the interpreter is on (CI); with a GPU the kernels are compiled and the
CPU variants skip (set TRITON_INTERPRET=1 yourself to run them on CPU there instead).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def triton_backend():
    """The custom ops run the generated kernels (CPU tensors go through the interpreter)."""
    from codegen_helpers import has_triton

    if not has_triton():
        pytest.skip("triton is not installed (pip install headpolicy[kernels])")
    from headpolicy.codegen import ops

    with ops.backend("triton"):
        yield
