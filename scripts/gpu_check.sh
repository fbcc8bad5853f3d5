#!/usr/bin/env bash
# gpu_check.sh [quick|api|e2e|bench|profile|all] - the GPU check, one command
# on a machine with an NVIDIA GPU (see ../shared/device/README.md for the lent
# one, which has no apt: carry .devdeps, made here by scripts/devdeps.sh, and
# .devtools holding hf_anchor.py for `bench`).
#
#   quick  build with -DGF_CUDA=ON, list the devices, run `ctest -L gpu` but
#          the API suites: test_ops (every op of the table on CUDA against its
#          references; again with GF_CUBLASLT=0), the golden, engine and CLI
#          tests with every model on the GPU: about two minutes on an H200
#   api    quick's build, then the serving and training API suites on the GPU
#          (`ctest -L gpu -R gpu_api_`), the longest part
#   e2e    quick's build, then the API suite's shapes QLoRA job alone (upload,
#          train, serve the adapter) on the GPU in its production precision
#          (bf16): a minute or two
#   profile  quick's build, then Nsight Compute's time per kernel (ncu, the
#          clocks left alone, graphs off) over the first GF_PROFILE_LAUNCHES
#          (default 1500) kernels of GF_PROFILE_SHAPE (default e4b) cut to 4
#          layers decoding an NF4 base at batch 1: where a decode step's time
#          goes, kernel by kernel (the load's and prefill's kernels listed too);
#          with GF_PROFILE_WHAT=train, a QLoRA training step of the stack cut
#          to 2 layers at B1 x T1024 instead (GF_PROFILE_SKIP kernels of the
#          load skipped, default 400; GF_PROFILE_LAUNCHES default 3000)
#   bench  quick's build, then the benchmarks with GF_DEVICE=cuda: bench_shapes
#          at the real shapes named by GF_SHAPES (default "e4b"; "31b:20"
#          cuts 31B to 20 layers), MFU against GF_PEAK_TFLOPS (default 989,
#          an H100/H200's dense bf16), bench_serve over an NF4 base of the
#          shape GF_SERVE_SHAPE (default e4b; 1-64 adapters, then beside a
#          training job), the first shape's decode again with
#          GF_CUDA_GRAPHS=0, bench_memory (the jobs' memory estimate at the
#          full E2B, E4B and 31B shapes, beside what bench_shapes measured),
#          bench_matmul (one linear layer at E4B's MLP shape, bf16 and NF4,
#          over 4,096 tokens and over one row from memory),
#          and the Hugging Face anchor when .devtools/hf_anchor.py is there
#   all    all three (the default)
#
# Full logs go to $OUT (the device tool's folder) or ./gpu-check; a short
# table is printed last, and each step's row as it ends. Exit status: 0 when
# every step passed.
#
# Seen on the lent H200 (2026-12-04), to plan a lease: the build 32-38 s,
# quick's ctest 67-70 s, e2e 23 s, profile 28 s, bench_shapes e4b 158 s,
# the anchor's e4b:4:1024 and decode-e4b 140 s (its peak 20 s more),
# bench_serve e4b 60 s; a fresh machine took about 35 s to start.
#
# For a lease of minutes (the lent machine's time is counted):
#   GF_CHECK_UNTIL=EPOCH  no step starts after this time (date +%s), and a
#                         running step is stopped at it (its log is kept)
#   GF_CHECK_COMMIT=REV   the commit the summary names (git's HEAD otherwise)
#   GF_CHECK_TAR=FILE     the logs, tarred again after every step, for a
#                         device tool that returns a few files (and returns
#                         them when the command is cut short)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
mode=${1:-all}
case "$mode" in quick|api|e2e|bench|profile|all) ;; *) echo "usage: gpu_check.sh [quick|api|e2e|bench|profile|all]" >&2; exit 2 ;; esac
logs=${OUT:-$PWD/gpu-check}
mkdir -p "$logs"
jobs=$(nproc 2>/dev/null || echo 8)
declare -a rows=()
failed=0

# step NAME LOG CMD...: runs CMD with its output in LOG, and records a row.
# A shell function (build) runs whole; other commands stop at GF_CHECK_UNTIL.
step() {
    local name=$1 log=$2 t0 rc left=0 cut=()
    shift 2
    t0=$(date +%s)
    if [ -n "${GF_CHECK_UNTIL:-}" ]; then
        left=$(( GF_CHECK_UNTIL - t0 ))
        if [ "$left" -lt 10 ]; then
            rows+=("$(printf '%-28s %-7s %5ss  %s' "$name" "SKIPPED" 0 "no time left (GF_CHECK_UNTIL)")")
            echo "${rows[-1]}"
            failed=1
            return 1
        fi
        declare -F "$1" >/dev/null || cut=(timeout -k 5 "$left")
    fi
    "${cut[@]}" "$@" >"$logs/$log" 2>&1
    rc=$?
    local s=$(( $(date +%s) - t0 )) verdict=ok
    [ $rc -eq 0 ] || verdict=FAILED
    [ $rc -eq 124 ] && [ ${#cut[@]} -gt 0 ] && verdict=CUT
    rows+=("$(printf '%-28s %-7s %5ss  %s' "$name" "$verdict" "$s" "$log")")
    echo "${rows[-1]}"
    [ $rc -eq 0 ] || failed=1
    if [ -n "${GF_CHECK_TAR:-}" ]; then
        tar czf "$GF_CHECK_TAR.part" -C "$logs" . && mv "$GF_CHECK_TAR.part" "$GF_CHECK_TAR"
    fi
    return $rc
}

if [ -d .devdeps ]; then
    eval "$(bash .devdeps/sysroot.sh unpack .devdeps /tmp/sysroot)"
fi

build() {
    cmake -S . -B build-gpu -DGF_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_BUILD_TYPE=Release -DGF_WERROR=ON &&
        cmake --build build-gpu -j"$jobs"
}
step build build.log build || { printf '%s\n' "${rows[@]}"; exit 1; }
step devices devices.log build-gpu/server/gemmaforge devices
cat "$logs/devices.log"
if ! grep -q '^cuda0 ' "$logs/devices.log"; then
    echo "no CUDA device: nothing to check on a GPU here" >&2
    printf '%s\n' "${rows[@]}"
    exit 1
fi

if [ "$mode" = quick ] || [ "$mode" = all ]; then
    step "ctest -L gpu (engine, CLI)" ctest_gpu.log bash -c "cd build-gpu && ctest -L gpu -E gpu_api_ --output-on-failure -j6"
    grep -E 'tests passed|Test +#' "$logs/ctest_gpu.log" | tail -16
fi

if [ "$mode" = api ] || [ "$mode" = all ]; then
    step "ctest -L gpu (API suites)" ctest_gpu_api.log bash -c "cd build-gpu && ctest -L gpu -R gpu_api_ --output-on-failure -j2"
    grep -E 'tests passed|Test +#' "$logs/ctest_gpu_api.log" | tail -4
fi

if [ "$mode" = e2e ]; then
    step "API shapes QLoRA job (bf16)" e2e.log env GF_PRECISION=bf16 tests/gpu/on_cuda.sh build-gpu/server/gemmaforge \
        python3 -c "import sys; sys.path.insert(0, 'tests/api'); sys.argv = ['test_training', sys.argv[1]]
import test_training as t
t.t_shapes_qlora_end_to_end(t.BIN)
print('t_shapes_qlora_end_to_end passed')" build-gpu/server/gemmaforge
    tail -3 "$logs/e2e.log"
fi

if [ "$mode" = profile ]; then
    if ! command -v ncu >/dev/null; then
        rows+=("$(printf '%-28s %-7s' "ncu" "absent: no Nsight Compute on this machine")")
    else
        if [ "${GF_PROFILE_WHAT:-decode}" = train ]; then
            # a training step of the stack cut to 2 layers, B1 x T1024: the
            # load's kernels skipped, then the warm-up step's and the next's
            step "ncu train ${GF_PROFILE_SHAPE:-e4b}:2 (nf4, B1xT1024)" profile.log env GF_DEVICE=cuda \
                ncu --clock-control none --metrics gpu__time_duration.sum --print-summary per-kernel \
                --launch-skip "${GF_PROFILE_SKIP:-400}" --launch-count "${GF_PROFILE_LAUNCHES:-3000}" \
                build-gpu/bench_shapes "${GF_PROFILE_SHAPE:-e4b}" --layers 2 --only train --batch 1 --seq 1024 \
                --steps 1 --no-bf16
        else
            step "ncu decode ${GF_PROFILE_SHAPE:-e4b}:4 (nf4, b1)" profile.log env GF_DEVICE=cuda GF_CUDA_GRAPHS=0 \
                ncu --clock-control none --metrics gpu__time_duration.sum --print-summary per-kernel \
                --launch-count "${GF_PROFILE_LAUNCHES:-1500}" build-gpu/bench_shapes "${GF_PROFILE_SHAPE:-e4b}" \
                --layers 4 --only decode --no-bf16 --new 16
        fi
        grep -E "^ +[a-zA-Z_].*\(|gpu__time_duration.sum|Invocations" "$logs/profile.log" | tail -120 >"$logs/profile_summary.txt"
        tail -60 "$logs/profile_summary.txt"
    fi
fi

if [ "$mode" = bench ] || [ "$mode" = all ]; then
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv >"$logs/gpu.txt" 2>&1 || true
    # Real shapes from random weights (GEMMA4.md §10): SHAPE or SHAPE:LAYERS,
    # e.g. GF_SHAPES="e4b 31b:20" (a cut stack says so in its JSON lines).
    for sh in ${GF_SHAPES:-e4b}; do
        name=${sh%%:*} layers=()
        [ "$sh" != "$name" ] && layers=(--layers "${sh#*:}")
        step "bench_shapes $sh (cuda)" "bench_shapes_$name.log" env GF_DEVICE=cuda build-gpu/bench_shapes "$name" \
            "${layers[@]}" --steps 3 --peak-tflops "${GF_PEAK_TFLOPS:-989}"
    done
    # transformers + PEFT at the same shape, next, so that the two stand side
    # by side even when the lease ends before the steps below
    if [ -f .devtools/hf_anchor.py ]; then
        step "hf_anchor (transformers)" hf_anchor.log python3 .devtools/hf_anchor.py peak ${GF_HF_WHICH:-e4b:4:1024 decode-e4b}
    else
        rows+=("$(printf '%-28s %-7s' "hf_anchor" "absent: copy ../shared/bench/hf_anchor.py into .devtools/")")
    fi
    # one linear layer at E4B's MLP shape over B4 x T1024 tokens, bf16 and
    # NF4 weights: the matmul and its input gradient alone, in TFLOP/s terms
    # and over one row, as a decode step's GEMV, from 16 copies of the
    # weights (0.4-0.8 GB: no cache holds them): weight_gbs beside the copy bandwidth
    for dt in bf16 nf4; do
        step "bench_matmul 10240x2560x4096 $dt" "bench_matmul_$dt.log" build-gpu/bench_matmul 10240 2560 4096 \
            --device cuda --dtype "$dt" --reps 5
        step "bench_matmul 10240x2560x1 $dt" "bench_matmul_${dt}_row.log" build-gpu/bench_matmul 10240 2560 1 \
            --device cuda --dtype "$dt" --reps 20 --copies 16
    done
    # the first shape's decode again with its steps run op by op, to set
    # beside the recorded graphs' figures above
    first=${GF_SHAPES:-e4b}
    first=${first%% *}
    fname=${first%%:*} flayers=()
    [ "$first" != "$fname" ] && flayers=(--layers "${first#*:}")
    step "bench_shapes $first decode, no graphs" "bench_shapes_${fname}_nographs.log" env GF_DEVICE=cuda \
        GF_CUDA_GRAPHS=0 build-gpu/bench_shapes "$fname" "${flayers[@]}" --only decode
    # and with the per-layer embedding table on the GPU rather than read
    # from pinned host memory (the default), for its cost in decode and training
    step "bench_shapes $first, per-layer table on the device" "bench_shapes_${fname}_pledevice.log" env GF_DEVICE=cuda \
        GF_PLE=device build-gpu/bench_shapes "$fname" "${flayers[@]}" --steps 3 --no-bf16
    # and the loads with NF4 quantized on the host's cores, to set beside
    # the first run's, quantized on the GPU as the weights were copied
    step "bench_shapes $first load, NF4 on the host" "bench_shapes_${fname}_hostnf4.log" env GF_DEVICE=cuda \
        GF_QUANTIZE_ON=host build-gpu/bench_shapes "$fname" "${flayers[@]}" --only load
    # the jobs' own estimate of a training step's device memory at the full
    # shapes, to set beside the memory bench_shapes measured above
    step "bench_memory e2b e4b 31b (estimate)" bench_memory.log build-gpu/bench_memory e2b e4b 31b
    step "bench_serve ${GF_SERVE_SHAPE:-e4b} nf4 (cuda)" bench_serve.log env GF_DEVICE=cuda build-gpu/bench_serve \
        --shape "${GF_SERVE_SHAPE:-e4b}" --quantize nf4
    for f in "$logs"/bench_shapes_*.log "$logs"/bench_memory.log "$logs"/bench_matmul_*.log "$logs"/bench_serve.log "$logs"/hf_anchor.log; do
        [ -f "$f" ] && { echo "== $(basename "$f" .log)"; tail -24 "$f"; }
    done
fi

echo
# the commit: GF_CHECK_COMMIT when the caller names it (a tree copied to
# the device may carry a .git older than its files), else git's
echo "gpu_check $mode, ${GF_CHECK_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo '?')}, $(date -u +%Y-%m-%dT%H:%MZ), logs in $logs"
printf '%s\n' "${rows[@]}"
exit $failed
