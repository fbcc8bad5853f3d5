#!/usr/bin/env bash
# bitcompare.sh OLD_BIN NEW_BIN: runs both gemmaforge binaries on the bundled
# golden inputs (forward text/image with hidden states, the same with an
# adapter and with --quantize nf4, greedy generate, lora-step for 5 steps,
# a short train run) and compares every output byte for byte. For
# refactors that must change no result. Prints one line per case and
# "N passed, N failed" last; exit 1 when any output differs.
set -u
OLD=$(realpath "$1") NEW=$(realpath "$2")
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
FX="$ROOT/tests/fixtures"
T=$(mktemp -d)
[ -n "${KEEP:-}" ] || trap 'rm -rf "$T"' EXIT
pass=0 fail=0
same() { # name, files...
  local name=$1; shift
  local ok=1
  for f in "$@"; do [ -s "$T/old/$f" ] && cmp -s "$T/old/$f" "$T/new/$f" || ok=0; done
  if [ $ok = 1 ]; then pass=$((pass + 1)); echo "same  $name"; else fail=$((fail + 1)); echo "DIFF  $name ($*)"; fi
}
run() { # side, args...
  local side=$1; shift
  local bin=$OLD; [ "$side" = new ] && bin=$NEW
  (cd "$T/$side" && "$bin" "$@" >stdout 2>/dev/null)
}
for side in old new; do mkdir -p "$T/$side"; done
for v in dense ple moe; do
  for inp in forward_text forward_image; do
    for side in old new; do run $side forward --model "$FX/$v" --inputs "$FX/$v/$inp.safetensors" --out "$T/$side/$v-$inp.st" --hidden; done
    same "$v forward $inp (logits, hidden states, soft tokens)" "$v-$inp.st"
    for side in old new; do run $side forward --model "$FX/$v" --quantize nf4 --inputs "$FX/$v/$inp.safetensors" --out "$T/$side/$v-$inp-nf4.st"; done
    same "$v forward $inp nf4" "$v-$inp-nf4.st"
  done
  for side in old new; do
    run $side generate --model "$FX/$v" --ids 2,498,996,998,960,588,370,976 --max-new 12; cp "$T/$side/stdout" "$T/$side/$v-gen"
  done
  same "$v generate" "$v-gen"
  for a in lora_lm lora_all; do
    [ -d "$FX/$v/$a" ] || continue
    for side in old new; do
      run $side forward --model "$FX/$v" --adapter "$FX/$v/$a/adapter_final" --inputs "$FX/$v/forward_image.safetensors" --out "$T/$side/$v-$a-fwd.st"
      run $side lora-step --model "$FX/$v" --adapter "$FX/$v/$a/adapter_init" --inputs "$FX/$v/forward_image.safetensors" \
        --steps 5 --lr 0.001 --weight-decay 0.01 --out "$T/$side/$v-$a-step"
    done
    same "$v $a forward with adapter" "$v-$a-fwd.st"
    same "$v $a lora-step (losses, step-0 gradients, final adapter)" "$v-$a-step/losses.json" \
      "$v-$a-step/grads_step0.safetensors" "$v-$a-step/adapter_final/adapter_model.safetensors"
  done
done
python3 - "$T" "$ROOT" <<'PY'
import sys, os
sys.path.insert(0, os.path.join(sys.argv[2], "tests", "data"))
import shapes
j, t, _ = shapes.dataset(6, 5, "img")
open(os.path.join(sys.argv[1], "d.jsonl"), "wb").write(j)
open(os.path.join(sys.argv[1], "d.tar"), "wb").write(t)
PY
for side in old new; do
  run $side train --model "$FX/dense" --dataset "$T/d.jsonl" --images "$T/d.tar" --out "$T/$side/train" --epochs 1 \
    --learning-rate 0.002 --lora-rank 4 --seed 3 --gradient-accumulation-steps 2
done
same "dense train (NF4, 3 steps): adapter bytes" "train/adapter/adapter_model.safetensors"
echo "bitcompare: $pass passed, $fail failed"
[ $fail = 0 ]
