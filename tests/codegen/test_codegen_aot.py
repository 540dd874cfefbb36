"""The generated sources go through the real Triton compiler (to cubin for sm_80), no GPU needed.

The interpreter checks what the kernels compute; this catches what only the compiler rejects.
"""

import os
import subprocess
import sys

import pytest
from codegen_helpers import has_triton


@pytest.mark.skipif(not has_triton(), reason="triton is not installed")
def test_kernels_compile_for_sm80(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["HEADPOLICY_KERNEL_CACHE"] = str(tmp_path / "kernels")
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton")
    cmd = [
        sys.executable,
        "-m",
        "headpolicy.codegen.aot",
        "--arch",
        "80",
        "--dtype",
        "bf16",
        "--head-dim",
        "96",
        "--quick",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("sm_80")]
    assert len(lines) == 3, proc.stdout  # prefill, decode: one streaming part + combine
    for line in lines:
        shared = int(line.split("shared=")[1].split()[0])
        assert shared <= 160 * 1024, line  # fits an A100's shared memory
