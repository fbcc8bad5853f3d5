#!/usr/bin/env bash
# The container files hold together without a Docker daemon: the compose
# file validates (Debian's docker-compose, or the docker compose plugin) with
# the example env file, and renders the health check on /healthz, the model
# mounted read-only, the data volume and no install step at start; every
# package the Dockerfile's runtime stage installs exists in Debian 12, and
# (given the built binary) every library it links comes from one of them.
# usage: check_containers.sh [PATH/TO/gemmaforge]
# Exit 77 (skipped) when no compose tool is installed.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
if command -v docker-compose >/dev/null 2>&1; then compose=(docker-compose)
elif docker compose version >/dev/null 2>&1; then compose=(docker compose)
else echo "SKIPPED: no docker-compose or docker compose plugin"; exit 77; fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cp "$root/docker-compose.yml" "$tmp/"
cp "$root/gemmaforge.env.example" "$tmp/gemmaforge.env"
out="$(cd "$tmp" && "${compose[@]}" config)"
fail=0
need() { grep -qE -- "$1" <<<"$out" || { echo "FAIL: the compose config lacks $2"; fail=1; }; }
need '/healthz' 'a health check on /healthz'
need ':/model:ro|read_only: true' 'the model mounted read-only'
need 'gemmaforge-data' 'the data volume'
need 'GF_API_KEYS' 'the API keys from the env file'
if grep -qE 'apt-get|setup\.sh|cmake' <<<"$out"; then echo "FAIL: the container installs or builds at start"; fail=1; fi

if command -v apt-cache >/dev/null 2>&1; then
  # the words of the runtime stage's apt-get install, up to its "&&"
  pkgs="$(sed -n '/^FROM .* AS runtime/,$p' "$root/Dockerfile" | tr '\\\n' '  ' |
          sed -n 's/.*--no-install-recommends \([^&]*\)&&.*/\1/p')"
  [ -n "$pkgs" ] || { echo "FAIL: no apt-get install in the Dockerfile's runtime stage"; fail=1; }
  for p in $pkgs; do
    apt-cache show "$p" >/dev/null 2>&1 || { echo "FAIL: the runtime stage installs '$p', which Debian does not have"; fail=1; }
  done
  if [ -n "${1:-}" ] && command -v dpkg >/dev/null 2>&1 && command -v readelf >/dev/null 2>&1; then
    # (the image builds with GF_CUDA=OFF: CUDA's own libraries are not its, nor
    # the C++ runtime that only the CUDA backend's objects bring)
    libs="$(readelf -d "$1" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p')"
    not_image='^lib(cudart|cublas|cublasLt)\.so'
    if grep -qE "$not_image" <<<"$libs"; then not_image='^lib(cudart|cublas|cublasLt|stdc\+\+|gcc_s)\.so'; fi
    for so in $(grep -vE "$not_image" <<<"$libs"); do
      # (awk reads to the end: an early exit would SIGPIPE ldconfig, which pipefail reports)
      path="$(ldconfig -p | awk -v so="$so" '$1 == so && /x86-64|64bit/ && !found {print $NF; found = 1}')"
      # dpkg knows a library by the path its package installed (usrmerge: /lib or /usr/lib)
      pkg="$( { dpkg -S "${path:-/nonexistent}" || dpkg -S "$(readlink -f "${path:-/nonexistent}")" || dpkg -S "/usr${path:-}"; } \
              2>/dev/null | sed -n '1s/:.*//p' || true)"
      case " libc6 $(echo $pkgs) " in
        *" $pkg "*) ;;
        *) echo "FAIL: the binary links $so (package '${pkg:-unknown}'), which the runtime stage does not install"; fail=1 ;;
      esac
    done
  fi
fi
[ "$fail" -eq 0 ] && echo "container files: ok"
exit "$fail"
