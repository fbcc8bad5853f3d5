#!/bin/sh
# on_cuda.sh GEMMAFORGE COMMAND [ARGS...] - runs COMMAND with GF_DEVICE=cuda
# and GF_PRECISION=fp32 (unless set), so every model it opens runs on the first GPU in the
# parity mode, when GEMMAFORGE lists a CUDA device; otherwise exits 77, which
# ctest reports as skipped (CI has no GPU).
bin=$1
shift
if ! "$bin" devices 2>/dev/null | grep -q '^cuda0 '; then
    echo "no CUDA device here: skipped"
    exit 77
fi
# fp32 unless the test asks for bf16: the golden and CPU comparisons hold to
# fp32 tolerances
GF_DEVICE=cuda GF_PRECISION=${GF_PRECISION:-fp32} exec "$@"
