#!/usr/bin/env bash
# devdeps.sh [DIR] - the libraries that the lent GPU machine (no apt, no
# network) lacks, as Debian packages in DIR (default .devdeps, which
# .git/info/exclude should list), for scripts/gpu_check.sh to unpack there:
# ../shared/device/sysroot.sh's packages, and what their libgnutls30 needs
# in turn (without libunistring2 the server binary did not start there).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.devdeps}
../shared/device/sysroot.sh fetch "$dir"
(cd "$dir" && apt-get download libunistring2 libidn2-0 libtasn1-6 libnettle8 libhogweed6 libp11-kit0 libgmp10 libffi8 \
    2>&1 | grep -v '^W: Download is performed unsandboxed' >&2 || true)
echo "$(ls "$dir"/*.deb | wc -l) packages in $dir; carry it (and .devtools) in the device run" >&2
