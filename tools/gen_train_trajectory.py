#!/usr/bin/env python3
"""Reference LoRA training trajectories for tests/fixtures/<variant>/<kind>/.

Re-runs the golden experiment (PEFT LoRA from adapter_init on the image sample
of forward_image.safetensors, five torch.optim.AdamW steps with the settings of
train.json) and records what the golden set only gives for step 0: the
gradient of every LoRA weight before each step (trajectory.safetensors, keys
"step<k>.<PEFT key>") and the losses (trajectory.json). A test rebuilds the
adapter before step k from adapter_init and these gradients with AdamW, and
checks the engine's loss and gradients at that point ("teacher forcing"),
which stays meaningful where the free-running five-step trajectory does not.

The free-running trajectory is ill-conditioned: AdamW's first update is about
lr * sign(g), so a weight whose gradient lies within float32 rounding noise of
zero moves by +-lr at random. To show the size of that effect the same run is
repeated in float64 and its losses are written beside the float32 ones.

The float32 run is also repeated with a single CPU thread: torch's float32
reductions sum in a thread-count-dependent order, so the spread between the two
float32 runs is the reproducibility of the golden adapter_final itself.

Run on a machine with torch, transformers 5.17 and peft 0.21:
    python3 tools/gen_train_trajectory.py tests/fixtures [OUT_DIR]
OUT_DIR (default: the fixture directories) receives, per case,
<variant>_<kind>_trajectory.{json,safetensors} and the final adapters of every
run (<variant>_<kind>_final_{f32,f32_1thread,f64}.safetensors).
"""
import json
import os
import struct
import sys

import torch
import peft
import transformers
from transformers import AutoModelForImageTextToText

CASES = [("dense", "lora_lm"), ("dense", "lora_all"), ("ple", "lora_lm"), ("moe", "lora_lm")]


def read_st(path):
    with open(path, "rb") as f:
        data = f.read()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    out = {}
    kinds = {"F32": torch.float32, "I64": torch.int64, "U8": torch.uint8, "BF16": torch.bfloat16}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        lo, hi = meta["data_offsets"]
        raw = bytearray(data[8 + n + lo:8 + n + hi])
        out[name] = torch.frombuffer(raw, dtype=kinds[meta["dtype"]]).reshape(meta["shape"]).clone()
    return out


def write_st(path, tensors):
    header, blobs, off = {}, [], 0
    for name, t in tensors.items():
        b = t.detach().to(torch.float32).contiguous().numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def run(d, kind, dtype, train):
    torch.manual_seed(0)
    # torch's grouped_mm has no float64 kernel; the eager expert loop computes the same sums
    extra = {"experts_implementation": "eager"} if dtype == torch.float64 else {}
    base = AutoModelForImageTextToText.from_pretrained(d, dtype=dtype, **extra)
    model = peft.PeftModel.from_pretrained(base, os.path.join(d, kind, "adapter_init"), is_trainable=True)
    model.to(dtype)
    model.train()
    fi = read_st(os.path.join(d, "forward_image.safetensors"))
    inputs = {"input_ids": fi["input_ids"], "labels": fi["labels"], "mm_token_type_ids": fi["mm_token_type_ids"],
              "pixel_values": fi["pixel_values_u8"].to(dtype) / 255.0, "image_position_ids": fi["image_position_ids"]}
    import inspect
    accepted = inspect.signature(model.get_base_model().forward).parameters
    if "image_position_ids" not in accepted:  # the processor's name for the patch positions
        alt = [k for k in accepted if "position" in k and k != "position_ids"]
        inputs[alt[0]] = inputs.pop("image_position_ids")
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW([p for _, p in params], lr=train["lr"], betas=tuple(train["betas"]), eps=train["eps"],
                            weight_decay=train["weight_decay"])
    losses, grads = [], {}
    for step in range(train["steps"]):
        opt.zero_grad()
        loss = model(**inputs).loss
        loss.backward()
        losses.append(loss.item())
        for n, p in params:
            grads["step%d.%s" % (step, n)] = p.grad.detach().clone()
        opt.step()
    final = {n: p.detach().clone() for n, p in params}
    return losses, grads, final


def final_rel(final, ref_final):
    """Worst max-abs error over tensors, relative to each reference tensor's max |value|."""
    return max(((final[k.replace(".weight", ".default.weight")].double() - v.double()).abs().max()
                / v.double().abs().max()).item() for k, v in ref_final.items())


def main(root, out):
    threads = torch.get_num_threads()
    for variant, kind in CASES:
        d = os.path.join(root, variant)
        g = os.path.join(d, kind)
        dest = out or g
        prefix = "%s_%s_" % (variant, kind) if out else ""
        train = json.load(open(os.path.join(g, "train.json")))
        torch.set_num_threads(threads)
        losses, grads, final = run(d, kind, torch.float32, train)
        losses64, _, final64 = run(d, kind, torch.float64, train)
        torch.set_num_threads(1)
        losses1, _, final1 = run(d, kind, torch.float32, train)
        ref0 = read_st(os.path.join(g, "grads_step0.safetensors"))
        worst = max(((grads["step0." + k] - v).norm() / v.norm()).item() for k, v in ref0.items())
        ref_final = read_st(os.path.join(g, "adapter_final", "adapter_model.safetensors"))
        check = {"step0_grads_vs_golden_rel_l2": worst,
                 "final_f32_vs_golden": final_rel(final, ref_final),
                 "final_f32_1thread_vs_golden": final_rel(final1, ref_final),
                 "final_f64_vs_golden": final_rel(final64, ref_final),
                 "loss0_golden": train["losses_before_each_step"][0], "threads": threads}
        write_st(os.path.join(dest, prefix + "trajectory.safetensors"), grads)
        for tag, f in (("f32", final), ("f32_1thread", final1), ("f64", final64)):
            write_st(os.path.join(dest, prefix + "final_%s.safetensors" % tag), f)
        with open(os.path.join(dest, prefix + "trajectory.json"), "w") as f:
            json.dump({"transformers": transformers.__version__, "peft": peft.__version__, "torch": torch.__version__,
                       "losses_float32": losses, "losses_float32_1thread": losses1, "losses_float64": losses64,
                       "losses_golden": train["losses_before_each_step"], "check": check}, f, indent=1)
        print(variant, kind, json.dumps(check), "\n  f32", losses, "\n  f32/1", losses1, "\n  f64", losses64,
              "\n  golden", train["losses_before_each_step"], flush=True)


if __name__ == "__main__":
    fixtures = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")
    main(fixtures, sys.argv[2] if len(sys.argv) > 2 else None)
