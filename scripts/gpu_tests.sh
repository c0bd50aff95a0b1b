#!/usr/bin/env bash
# The whole test suite on a CUDA machine (kernels compiled, CUDA-only tests enabled), summarised in
# benchmarks/results/gpu_tests.json by scripts/gpu_tests.py. Works on a CPU machine too (interpreter, CUDA tests
# skipped). A copied checkout's .git may be stale: pass the commit as PATCHATTN_COMMIT=<sha>.
#   scripts/gpu_tests.sh [--output PATH] [-- extra pytest arguments]
set -uo pipefail
cd "$(dirname "$0")/.."
if python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    unset TRITON_INTERPRET  # compiled kernels; tests/conftest.py only sets it where CUDA is absent
else
    echo "gpu_tests.sh: no CUDA device; running on the CPU (Triton interpreter, CUDA tests skipped)" >&2
fi
[ -e patchattn/kernels ] || ln -s ../kernels patchattn/kernels  # the source layout the tests import
exec python scripts/gpu_tests.py "$@"
