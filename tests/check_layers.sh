#!/usr/bin/env bash
# Enforces the include rules of ARCHITECTURE.md: server -> api -> engine ->
# kernels, libmicrohttpd / SQLite only in server/, and no include cycle
# between modules (tests/check_includes.py).
set -u
cd "$(dirname "$0")/.."
fail=0
check() { # folder, forbidden regex, why
  local hits
  hits=$(grep -nE "^#include [<\"]($2)" -r "$1" --include='*.c' --include='*.h' --include='*.cu' --include='*.cuh' 2>/dev/null)
  if [ -n "$hits" ]; then echo "$1 must not include $3:"; echo "$hits"; fail=1; fi
}
check kernels 'cjson/|microhttpd|sqlite3|png\.h|turbojpeg|jpeglib|(\.\./)?(engine|api|server)/|jsoncheck|safetensors|dataset|router|store' "Gemma, JSON, image, HTTP or storage headers"
check engine 'microhttpd|sqlite3|(\.\./)?(api|server)/|api\.h|http\.h|router\.h|store\.h|reply\.h|httpd\.h' "HTTP, SQLite, api or server headers"
check api 'microhttpd|sqlite3|(\.\./)?server/|httpd\.h|store_open\.h|fsutil\.h|migrate\.h|kernels_impl\.h' "libmicrohttpd, SQLite, server headers or kernel internals"
grep -rln "GF_HAVE_CUDA" --include='*.c' --include='*.h' kernels engine api server | grep -v '^kernels/backend.c$' && { echo "GF_HAVE_CUDA outside kernels/backend.c"; fail=1; }
# inside engine/: formats <- model <- {train, serve}
check engine/formats '(\.\./)?(model|train|serve)/|model\.h|model_impl\.h|weights\.h|weights_impl\.h|kvcache\.h|lora\.h|pipeline\.h|backward\.h|optim\.h|trainset\.h|trainer\.h|serve\.h' "the model, training or serving"
check engine/model 'backward\.h|optim\.h|trainset\.h|trainer\.h|serve\.h' "training or serving"
check engine/train 'serve\.h' "serving"
check engine/serve 'backward\.h|optim\.h|trainset\.h|trainer\.h' "training"
check engine/export 'backward\.h|optim\.h|trainset\.h|trainer\.h|serve\.h' "training or serving"
check engine/formats 'merge\.h' "export"
check engine/model 'merge\.h' "export"
python3 tests/check_includes.py || fail=1
if [ $fail -eq 0 ]; then echo "layers: 1 passed, 0 failed"; else echo "layers: 0 passed, 1 failed"; fi
exit $fail
