#!/usr/bin/env bash
# The long fuzzing mode. Builds the fuzz targets as libFuzzer binaries
# (clang, -DGF_FUZZ=ON: every library instrumented, ASan+UBSan) in
# build-fuzz/ and runs each for SECONDS (default 600) from the committed
# corpus. Inputs that reach new code are merged into tests/fuzz/corpus/<target>/
# (commit them: every test run replays the corpus; inputs are at most 16 KiB,
# enough for every header and image the targets parse); a crash, leak or
# timeout is copied to tests/fuzz/regressions/<target>/ (replayed by every
# test run once committed, after the fix) and fails the run.
#   scripts/fuzz.sh [SECONDS] [TARGET...]     targets: fuzz_json fuzz_files fuzz_safetensors_header
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-600}
[ $# -gt 0 ] && shift
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(fuzz_json fuzz_files fuzz_safetensors_header)
command -v clang >/dev/null || { echo "fuzz: needs clang (apt-get install clang)" >&2; exit 2; }
CC=clang cmake -S . -B build-fuzz -DGF_FUZZ=ON -DGF_CUDA=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build-fuzz -j"$(nproc)" --target "${targets[@]}"
status=0
for t in "${targets[@]}"; do
  corpus=tests/fuzz/corpus/$t
  regress=tests/fuzz/regressions/$t
  work=$(mktemp -d)
  mkdir -p "$work/new" "$work/crashes" "$corpus"
  mkdir -p "$work/seeds"
  awk -v t="$t" '$1 == t { print $2 }' tests/fuzz/fixture_seeds.txt | while read -r f; do cp "tests/fixtures/$f" "$work/seeds/"; done
  dirs=("$corpus" "$work/seeds")
  [ -d "$regress" ] && dirs+=("$regress")
  echo "fuzz: $t for ${secs}s from $(ls "$corpus" | wc -l) corpus inputs"
  rc=0
  ASAN_OPTIONS=detect_leaks=1 build-fuzz/tests/"$t" -max_total_time="$secs" -max_len=16384 -timeout=10 -rss_limit_mb=2048 \
    -artifact_prefix="$work/crashes/" -print_final_stats=1 "$work/new" "${dirs[@]}" > "$work/log" 2>&1 || rc=$?
  tail -n 12 "$work/log"
  if ls "$work/crashes"/* >/dev/null 2>&1; then
    mkdir -p "$regress"
    cp "$work/crashes"/* "$regress/"
    echo "fuzz: $t FOUND $(ls "$work/crashes" | wc -l) failing input(s), copied to $regress/ (log: $work/log)" >&2
    status=1
    continue
  fi
  [ "$rc" -eq 0 ] || { echo "fuzz: $t exited $rc (log: $work/log)" >&2; status=1; continue; }
  before=$(ls "$corpus" | wc -l)
  build-fuzz/tests/"$t" -merge=1 -max_len=16384 "$corpus" "$work/new" > "$work/merge.log" 2>&1
  echo "fuzz: $t corpus $before -> $(ls "$corpus" | wc -l) inputs, $(du -sk "$corpus" | cut -f1) KiB"
  rm -rf "$work"
done
exit $status
