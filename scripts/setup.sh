#!/usr/bin/env bash
# Installs what gemmaforge needs to build and test on Debian 12, with apt,
# skipping what is already there. Safe to run again. Needs root (or sudo).
#   scripts/setup.sh               everything: build, tests (CI runs this)
#   scripts/setup.sh --build-only  the compiler and libraries only (the Dockerfile's build stage)
set -euo pipefail

build_only=0
[ "${1:-}" = "--build-only" ] && build_only=1

packages=(
  build-essential cmake pkg-config
  libmicrohttpd-dev libcjson-dev libjpeg62-turbo-dev libturbojpeg0-dev libpng-dev libsqlite3-dev
)
if [ "$build_only" -eq 0 ]; then
  # the tests: Python suites, the browser test (Debian's chromium driven by
  # playwright-core), the npm clients, the compose file's validation, and
  # libfiu's fault injection
  packages+=(python3 curl chromium docker-compose fiu-utils)
  command -v node >/dev/null 2>&1 || packages+=(nodejs)
  command -v npm >/dev/null 2>&1 || packages+=(npm)
fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "setup: all packages present"
fi

[ "$build_only" -eq 1 ] && exit 0

# playwright-core for the browser test, at the version package-lock.json pins
browser_dir="$(dirname "$0")/../tests/browser"
if [ ! -d "$browser_dir/node_modules/playwright-core" ]; then
  echo "setup: installing the browser test's npm packages"
  (cd "$browser_dir" && npm ci --no-audit --no-fund --loglevel=error)
fi

# node-llama-cpp (llama.cpp's CPU build) for the GGUF export test, at the
# version package-lock.json pins; the GPU variants are optional and skipped
gguf_dir="$(dirname "$0")/../tests/gguf"
if [ ! -d "$gguf_dir/node_modules/node-llama-cpp" ]; then
  echo "setup: installing the GGUF test's npm packages"
  (cd "$gguf_dir" && npm ci --omit=optional --no-audit --no-fund --loglevel=error)
fi

# the official OpenAI Node SDK for the client test, at the version package-lock.json pins
clients_dir="$(dirname "$0")/../tests/clients"
if [ ! -d "$clients_dir/node_modules/openai" ]; then
  echo "setup: installing the client test's npm packages"
  (cd "$clients_dir" && npm ci --no-audit --no-fund --loglevel=error)
fi
