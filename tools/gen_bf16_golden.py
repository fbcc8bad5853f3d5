#!/usr/bin/env python3
"""The golden text forward of the BF16 precision, for tests/fixtures/<variant>/.

The golden files (forward_text.safetensors) are float32 math. The engine's
BF16 precision (kernels/ops.h KnPrecision, CUDA's production mode) rounds the
operands of its matmuls to bfloat16 (round to nearest even) and sums in
float32, so its logits miss the float32 golden by the rounding itself: on the
ple model 2.3e-2 relative L2, on the moe model far more where a token's two
best router scores nearly tie and rounding sends it to another expert
(GEMMA4.md section 13). A bound on that distance says little about the
engine. This script computes what the precision defines, with the numpy
re-implementation of GEMMA4.md (../shared/spec/gemma4_numpy_ref.py), so that a
test holds the engine to it at the float32 summation order's distance:

  - every linear of the text stack (q/k/v/o, the MLP, PLE's projections) and
    the tied head: x and W rounded to bf16, float32 sums;
  - the MoE experts likewise (their input, and the down projection's input
    gelu(gate) * up, rounded); the router's matmul exact (float32 operands:
    the engine keeps it so in every precision);
  - a prefill's attention exact (the engine's prefill kernel sums in float32
    whatever the precision), norms, RoPE, softmax and softcap in float32.

It writes forward_text_bf16.safetensors beside forward_text.safetensors:
logits [B, T, V] and hidden_states [L + 1, B, T, H] (the last one normed, as
HF gives it), float32, for the same rows.

Run with Debian's python3 and python3-numpy:
    python3 tools/gen_bf16_golden.py tests/fixtures [path/to/gemma4_numpy_ref.py]
"""
import importlib.util
import json
import os
import struct
import sys

import numpy as np

VARIANTS = ("dense", "ple", "moe")


def load_reference(path):
    spec = importlib.util.spec_from_file_location("gemma4_numpy_ref", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def bf16_precision(R):
    """Patches R's linears and MoE block to the BF16 precision's rounding."""
    F, b = np.float32, R.to_bf16

    def linear(W, x, name):
        y = b(x) @ b(W[name + ".weight"]).T
        if name in R.LORA:
            raise ValueError("adapters are not part of this golden file")
        return y.astype(F)

    def moe_block(t, W, lp, residual, eps):
        H, K = t["hidden_size"], t["top_k_experts"]
        z = R.rms_norm(residual, None, eps) * W[lp + "router.scale"] * F(H ** -0.5)
        probs = R.softmax((z @ W[lp + "router.proj.weight"].T).astype(F))  # exact router
        top = np.argsort(-probs, axis=-1, kind="stable")[:, :K]
        w = np.take_along_axis(probs, top, -1)
        w = w / w.sum(-1, keepdims=True) * W[lp + "router.per_expert_scale"][top]
        xin = b(R.rms_norm(residual, W[lp + "pre_feedforward_layernorm_2.weight"], eps))
        gate_up, down = b(W[lp + "experts.gate_up_proj"]), b(W[lp + "experts.down_proj"])
        inter = gate_up.shape[1] // 2
        out = np.zeros_like(xin)
        for s in range(xin.shape[0]):
            for j in range(K):
                e = top[s, j]
                gu = (gate_up[e] @ xin[s]).astype(F)
                act = b(R.gelu_tanh(gu[:inter]) * gu[inter:])
                out[s] += (down[e] @ act).astype(F) * w[s, j]
        return R.rms_norm(out, W[lp + "post_feedforward_layernorm_2.weight"], eps)

    R.linear = linear
    R.moe_block = moe_block  # attend stays exact: the prefill kernel's float32 sums


def write_safetensors(path, tensors):
    header, offset, blobs = {}, 0, []
    for name, arr in tensors.items():
        data = np.ascontiguousarray(arr, dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    header["__metadata__"] = {"what": "the BF16 precision's text forward (tools/gen_bf16_golden.py)"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for blob in blobs:
            f.write(blob)


def generate(R, d):
    cfg = json.load(open(os.path.join(d, "config.json")))
    t = cfg["text_config"]
    W = R.load_safetensors(os.path.join(d, "model.safetensors"))
    ft = R.load_safetensors(os.path.join(d, "forward_text.safetensors"))
    ids, mask = ft["input_ids"], ft["attention_mask"]
    B, T = ids.shape
    head = R.to_bf16(W["model.language_model.embed_tokens.weight"])
    logits, hidden = [], []
    for row in range(B):
        hs = []
        R.text_forward(cfg, W, ids[row], mask[row], hidden_out=hs)
        lg = (R.to_bf16(hs[-1]) @ head.T).astype(np.float32)  # the tied head, rounded like the linears
        cap = t.get("final_logit_softcapping")
        if cap:
            lg = (np.tanh(lg / np.float32(cap)) * np.float32(cap)).astype(np.float32)
        logits.append(lg)
        hidden.append(np.stack(hs))
    out = {"logits": np.stack(logits), "hidden_states": np.stack(hidden, axis=1)}
    assert out["logits"].shape == ft["logits"].shape and out["hidden_states"].shape == ft["hidden_states"].shape
    path = os.path.join(d, "forward_text_bf16.safetensors")
    write_safetensors(path, out)
    keep = mask.astype(bool)
    a, r = out["logits"][keep], ft["logits"][keep]
    print("%s: %s, relative L2 to the float32 golden %.2e" % (
        os.path.basename(d), path, np.linalg.norm(a - r) / np.linalg.norm(r)))


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    here = os.path.dirname(os.path.abspath(__file__))
    ref = sys.argv[2] if len(sys.argv) > 2 else os.path.join(here, "..", "..", "shared", "spec", "gemma4_numpy_ref.py")
    R = load_reference(ref)
    bf16_precision(R)
    for v in VARIANTS:
        generate(R, os.path.join(sys.argv[1], v))


if __name__ == "__main__":
    main()
