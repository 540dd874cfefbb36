#!/usr/bin/env bash
# Every check that needs a GPU, in one prepared run: the CUDA variants of the kernel tests
# (`pytest -m gpu`) and bench/kernels.py, then the CPU decode kernel's tests on that machine's
# CPU. Each step has its own time limit and writes its log, so a step that fails or runs out of
# time does not take the others' results with it.
#
#   bench/gpu.sh OUTDIR        # from the repository root, on a machine with CUDA, torch and triton
#
# Wheels in .whl/ (if any) are installed into /tmp/site first: the way to bring this project's
# transformers to a machine whose image has another one and no package index.
set -u
out=${1:?usage: bench/gpu.sh OUTDIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HEADPOLICY_KERNEL_CACHE=/tmp/headpolicy-kernels PYTHONPATH=$PWD
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && PYTHONPATH=$PWD:/tmp/site python3 -c "import transformers.modeling_utils" \
        && export PYTHONPATH=$PWD:/tmp/site || echo "carried wheels unusable: using the image's transformers"
fi
{
    python3 -c "import torch, triton, transformers as t; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', t.__version__, torch.cuda.get_device_name())"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
} 2>&1 | tee "$out/env.txt"
timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.log"
timeout "${BENCH_TIMEOUT:-300}" python3 bench/kernels.py --out "$out/kernels.json" 2>&1 | tee "$out/kernels.log"
# the CPU decode kernel (codegen/cpu.py) built by another machine's compiler for another CPU
timeout "${CPU_TIMEOUT:-90}" python3 -m pytest -q tests/codegen/test_cpu_kernels.py -p no:cacheprovider 2>&1 \
    | tee "$out/cpu_kernel_tests.log"
