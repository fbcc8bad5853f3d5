#!/usr/bin/env bash
# Builds gemmaforge and runs every test: the normal build (ctest, all
# labels); the golden, CLI and API suites again on the guarded CPU backend
# (GF_DEVICE=guarded: device memory is inaccessible outside op calls, so any
# engine code that touches it directly crashes); a Release build (-O3: the C
# unit, kernel and golden tests); then every test built with ASan+UBSan.
# Warnings are errors in all builds (GF_WERROR); a user's own build leaves
# them warnings.
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=$(nproc 2>/dev/null || echo 2)

cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo -DGF_WERROR=ON >/dev/null
cmake --build build -j"$jobs"
(cd build && ctest --output-on-failure -j"$jobs")
(cd build && GF_DEVICE=guarded ctest --output-on-failure -j"$jobs" -LE 'browser|fuzz')

cmake -S . -B build-release -DCMAKE_BUILD_TYPE=Release -DGF_WERROR=ON >/dev/null
cmake --build build-release -j"$jobs"
(cd build-release && ctest --output-on-failure -j"$jobs" -L 'unit|golden' -E 'cli_|fuzz_')

cmake -S . -B build-asan -DGF_SANITIZE=ON -DGF_CUDA=OFF -DCMAKE_BUILD_TYPE=Debug -DGF_WERROR=ON >/dev/null
cmake --build build-asan -j"$jobs"
(cd build-asan && ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
   ctest --output-on-failure -j"$jobs")
