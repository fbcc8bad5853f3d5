"""`gemmaforge merge` on the golden adapters: the merged directory has the
base's tensor names, shapes, dtypes and files; every merged weight is
W + scale * B A computed in float32 (checked against a recomputation here)
and rounded once; untouched tensors are byte for byte the base's; the merged
model, loaded as a plain base, gives the logits of base + adapter (text and
image); it trains as the base of a new fine-tune; bad requests fail clearly
and leave nothing behind.

usage: test_merge.py PATH/TO/gemmaforge
"""
import json
import math
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "api"))
sys.path.insert(0, os.path.join(HERE, "..", "data"))
from harness import FIXTURES, Runner, bf16_floats, safetensors_raw, write_st  # noqa: E402
import shapes  # noqa: E402

BIN = sys.argv[1]
TMP = tempfile.mkdtemp(prefix="gf-merge-")


def header(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        h = json.loads(f.read(n))
    return h, 8 + n


def tensors(model_dir):
    """name -> (dtype, shape, raw bytes) over the directory's shards."""
    idx = os.path.join(model_dir, "model.safetensors.index.json")
    files = sorted(set(json.load(open(idx))["weight_map"].values())) if os.path.exists(idx) else ["model.safetensors"]
    out = {}
    for f in files:
        path = os.path.join(model_dir, f)
        h, start = header(path)
        data = open(path, "rb").read()
        for name, m in h.items():
            if name != "__metadata__":
                lo, hi = m["data_offsets"]
                out[name] = (m["dtype"], m["shape"], data[start + lo:start + hi])
    return out


def floats(dtype, raw):
    if dtype == "F32":
        return list(struct.unpack("<%df" % (len(raw) // 4), raw))
    if dtype == "BF16":
        return list(bf16_floats(raw))
    return list(struct.unpack("<%de" % (len(raw) // 2), raw))


def bf16_rne(x):
    u = struct.unpack("<I", struct.pack("<f", x))[0]
    u += 0x7FFF + ((u >> 16) & 1)
    return (u >> 16) & 0xFFFF


def merge(model, adapter, out, *extra, expect_rc=0, **kw):
    r = subprocess.run([BIN, "merge", "--model", model, "--adapter", adapter, "--out", out] + list(extra),
                       capture_output=True, timeout=3600, **kw)  # a hang guard, not a deadline
    assert r.returncode == expect_rc, (r.returncode, r.stderr.decode()[-2000:])
    return r


def forward(model, inputs, adapter=None):
    """The logits of the positions that attention_mask keeps."""
    out = os.path.join(TMP, "fwd.safetensors")
    args = [BIN, "forward", "--model", model, "--inputs", inputs, "--out", out] + (["--adapter", adapter] if adapter else [])
    r = subprocess.run(args, capture_output=True, timeout=3600)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    d, (B, T, V), raw = safetensors_raw(out)["logits"]
    logits = floats(d, raw)
    mask = safetensors_raw(inputs).get("attention_mask")
    keep = struct.unpack("<%dq" % (B * T), mask[2]) if mask else [1] * (B * T)
    return [x for p in range(B * T) if keep[p] for x in logits[p * V:(p + 1) * V]]


def forward_nf4(model, inputs, adapter):
    """forward()'s logits with the base quantized to NF4 at load, as QLoRA trains it."""
    out = os.path.join(TMP, "fwd-nf4.safetensors")
    r = subprocess.run([BIN, "forward", "--model", model, "--inputs", inputs, "--out", out, "--adapter", adapter,
                        "--quantize", "nf4"], capture_output=True, timeout=3600)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    d, _, raw = safetensors_raw(out)["logits"]
    return floats(d, raw)


def rel_l2(got, ref):
    num = math.sqrt(sum((a - b) ** 2 for a, b in zip(got, ref)))
    return num / math.sqrt(sum(b * b for b in ref))


def adapter_pairs(adapter_dir):
    cfg = json.load(open(os.path.join(adapter_dir, "adapter_config.json")))
    scale = cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg.get("use_rslora") else cfg["r"])
    t = safetensors_raw(os.path.join(adapter_dir, "adapter_model.safetensors"))
    pairs = {}
    for name, (dt, shape, raw) in t.items():
        if ".lora_A." in name:
            module = name[len("base_model.model."):name.index(".lora_A.")]
            bname = name.replace(".lora_A.", ".lora_B.")
            pairs[module + ".weight"] = (shape, floats(dt, raw), t[bname][1], floats(t[bname][0], t[bname][2]))
    return scale, pairs


def check_structure(base, out, cap=None, dtype=None):
    """Names, shapes, dtypes (or dtype for every float tensor) and files as the base's."""
    b, o = tensors(base), tensors(out)
    assert list(b) == list(o), "tensor names or order differ"
    for name, (dt, shape, _) in b.items():
        want = dtype if dtype and dt in ("F32", "BF16", "F16") else dt
        assert o[name][:2] == (want, shape), (name, o[name][:2], (want, shape))
    idx = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert set(idx["weight_map"]) == set(b)
    assert idx["metadata"]["total_size"] == sum(len(v[2]) for v in o.values())
    shards = sorted(set(idx["weight_map"].values()))
    assert shards == ["model-%05d-of-%05d.safetensors" % (i + 1, len(shards)) for i in range(len(shards))], shards
    for s in shards:
        h, _ = header(os.path.join(out, s))
        assert h["__metadata__"] == {"format": "pt"}
        sizes = [m["data_offsets"][1] - m["data_offsets"][0] for n, m in h.items() if n != "__metadata__"]
        assert cap is None or sum(sizes) <= cap or len(sizes) == 1, (s, sum(sizes), cap)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
              "processor_config.json"):
        assert open(os.path.join(out, f), "rb").read() == open(os.path.join(base, f), "rb").read(), f
    cfg, bcfg = json.load(open(os.path.join(out, "config.json"))), json.load(open(os.path.join(base, "config.json")))
    if dtype:
        assert cfg.pop("dtype") == {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}[dtype]
        bcfg.pop("dtype")
    assert cfg == bcfg
    assert not [f for f in os.listdir(out) if f.endswith(".json") and f not in os.listdir(base)
                and f != "model.safetensors.index.json"]
    assert oct(os.stat(out).st_mode & 0o777) == "0o755"
    assert not [f for f in os.listdir(os.path.dirname(out)) if ".partial-" in f], "a temporary directory was left"
    return b, o


def t_merge_matches_adapter(case):
    variant, kind = case
    base = os.path.join(FIXTURES, variant)
    adapter = os.path.join(base, kind, "adapter_final")
    d = tempfile.mkdtemp(dir=TMP)
    out16, out32 = os.path.join(d, "bf16"), os.path.join(d, "f32")
    rep = json.loads(merge(base, adapter, out16).stdout)
    merge(base, adapter, out32, "--dtype", "F32".lower(), "--max-shard-bytes", "200000")
    b, o16 = check_structure(base, out16)
    _, o32 = check_structure(base, out32, cap=200000, dtype="F32")
    scale, pairs = adapter_pairs(adapter)
    assert rep["merged"] == len(pairs) and rep["tensors"] == len(b) and rep["shards"] == 1, rep
    for name, (dt, shape, raw) in b.items():
        if name not in pairs:
            assert o16[name][2] == raw, "%s is not the base's bytes" % name
            continue
        # f32: W + scale * B A, recomputed here
        (r, n_in), A, (n_out, _), B = pairs[name][0], pairs[name][1], pairs[name][2], pairs[name][3]
        W, got = floats(dt, raw), floats("F32", o32[name][2])
        err = 0.0
        for i in range(n_out):
            for j in range(n_in):
                want = W[i * n_in + j] + scale * sum(B[i * r + k] * A[k * n_in + j] for k in range(r))
                err = max(err, abs(got[i * n_in + j] - want))
        assert err <= 1e-5, "%s: merged weight off by %g" % (name, err)
        # bf16: that value rounded once
        h16 = struct.unpack("<%dH" % (len(o16[name][2]) // 2), o16[name][2])
        assert list(h16) == [bf16_rne(x) for x in got], "%s: bf16 weights are not the f32 merge rounded once" % name
        assert o16[name][2] != raw, "%s: the adapter changed nothing" % name
    for inputs in ("forward_text", "forward_image"):
        path = os.path.join(base, inputs + ".safetensors")
        ref = forward(base, path, adapter)
        e32, e16, eb = (rel_l2(forward(m, path), ref) for m in (out32, out16, base))
        print("    %s/%s %s: logits rel L2 to base + adapter: %.2e (f32 export), %.2e (bf16 export), %.2e (base)"
              % (variant, kind, inputs, e32, e16, eb))
        assert e32 <= 1e-5, "f32 export: logits rel L2 %g" % e32
        # The bf16 export is the f32 one rounded once (checked above, bit for
        # bit); what that rounding does to the logits depends on the model
        # (2^-9 relative per weight through random layers; on the MoE model
        # it flips a few routing choices), so it is only bounded against the
        # adapter's own effect here.
        assert e16 <= 0.2 * eb, "bf16 export: logits rel L2 %g, the base's %g" % (e16, eb)


def t_merge_all_linear_trained(_):
    """An adapter trained here on every linear of the PLE model (PLE
    projections, clipped vision linears, patch embedder, embed_vision)."""
    j, t, _ = shapes.dataset(8, 5, "img")
    jp, tp = os.path.join(TMP, "ple.jsonl"), os.path.join(TMP, "ple.tar")
    open(jp, "wb").write(j)
    open(tp, "wb").write(t)
    base = os.path.join(FIXTURES, "ple")
    run = os.path.join(TMP, "ple-run")
    r = subprocess.run([BIN, "train", "--model", base, "--dataset", jp, "--images", tp, "--out", run, "--epochs", "1",
                        "--batch-size", "4", "--learning-rate", "5e-2", "--target-modules", "all-linear", "--lora-rank", "4",
                        "--lora-alpha", "8", "--warmup-ratio", "0"], capture_output=True, timeout=3600)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    adapter = os.path.join(run, "adapter")
    out = os.path.join(TMP, "ple-merged")
    rep = json.loads(merge(base, adapter, out, "--dtype", "f32").stdout)
    _, pairs = adapter_pairs(adapter)
    assert any("per_layer" in p for p in pairs) and any("vision_tower.encoder" in p for p in pairs)
    assert any("patch_embedder" in p for p in pairs) and any("embed_vision" in p for p in pairs)
    assert rep["merged"] == len(pairs), rep
    check_structure(base, out, dtype="F32")
    for inputs in ("forward_text", "forward_image"):
        path = os.path.join(base, inputs + ".safetensors")
        ref = forward(base, path, adapter)
        e = rel_l2(forward(out, path), ref)
        assert e <= 1e-5, "%s: logits rel L2 %g" % (inputs, e)
        assert rel_l2(forward(base, path), ref) > 1e-3, "the trained adapter changed nothing"


def t_merged_base_fine_tunes(_):
    """A merged export is a base like any other: a new fine-tune runs on it
    and its loss is finite and falls."""
    base = os.path.join(FIXTURES, "dense")
    out = os.path.join(TMP, "dense-as-base")
    merge(base, os.path.join(base, "lora_lm", "adapter_final"), out)
    j, t, _ = shapes.dataset(8, 9, "img")
    jp, tp = os.path.join(TMP, "d.jsonl"), os.path.join(TMP, "d.tar")
    open(jp, "wb").write(j)
    open(tp, "wb").write(t)
    run = os.path.join(TMP, "dense-again")
    r = subprocess.run([BIN, "train", "--model", out, "--dataset", jp, "--images", tp, "--out", run, "--epochs", "3",
                        "--batch-size", "4", "--learning-rate", "2e-2", "--warmup-ratio", "0"], capture_output=True,
                       timeout=3600)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    losses = [json.loads(line)["loss"] for line in open(os.path.join(run, "metrics.jsonl")) if '"loss"' in line]
    assert losses and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
    assert os.path.getsize(os.path.join(run, "adapter", "adapter_model.safetensors")) > 0


def t_merge_qlora_gap(_):
    """--qlora-check: the merged model against the NF4 base + adapter a QLoRA
    run trained, on the dataset's shortest example; the report's figures are
    recomputed here from `forward` of both models on that example's ids."""
    base = os.path.join(FIXTURES, "dense")
    lines = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]},
             {"messages": [{"role": "user", "content": "Name a colour, any colour you like"},
                           {"role": "assistant", "content": "Blue, like the sea on a clear day"}]},
             {"messages": [{"role": "user", "content": "Count to three"}, {"role": "assistant", "content": "one two three"}]}]
    jp = os.path.join(TMP, "qlora.jsonl")
    open(jp, "w").write("".join(json.dumps(x) + "\n" for x in lines))
    run = os.path.join(TMP, "qlora-run")
    r = subprocess.run([BIN, "train", "--model", base, "--dataset", jp, "--out", run, "--epochs", "3", "--batch-size", "1",
                        "--gradient-accumulation-steps", "1", "--learning-rate", "5e-2", "--quantization", "nf4",
                        "--lora-rank", "4", "--lora-alpha", "8", "--warmup-ratio", "0"], capture_output=True, timeout=3600)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    adapter, out = os.path.join(run, "adapter"), os.path.join(TMP, "qlora-merged")
    gap = json.loads(merge(base, adapter, out, "--dtype", "f32", "--qlora-check", jp, "--qlora-examples", "1").stdout)["qlora_gap"]
    # the shortest example is line 1: its ids as the trainer encodes them (preflight shows its rendering)
    r = subprocess.run([BIN, "preflight", "--model", base, "--dataset", jp], capture_output=True, timeout=600)
    shown = r.stdout.decode().split("shown [[trained]]:\n", 1)[1]
    text = shown.replace("[[", "").replace("]]", "").rstrip("\n") + "\n"
    r = subprocess.run([BIN, "tokenize", "--model", base, text], capture_output=True, timeout=600)
    ids = json.loads(r.stdout)["ids"]
    assert gap["examples"] == 1 and gap["rows"] == len(ids), (gap, len(ids))
    inputs = os.path.join(TMP, "qlora-ids.safetensors")
    write_st(inputs, [("input_ids", "I64", [1, len(ids)], struct.pack("<%dq" % len(ids), *ids))])
    trained = forward_nf4(base, inputs, adapter)
    merged = forward(out, inputs)
    V = len(trained) // len(ids)
    top1 = sum(max(range(V), key=lambda v: trained[p * V + v]) == max(range(V), key=lambda v: merged[p * V + v])
               for p in range(len(ids))) / len(ids)
    assert abs(gap["rel_l2"] - rel_l2(merged, trained)) <= 1e-6 * rel_l2(merged, trained), (gap, rel_l2(merged, trained))
    assert abs(gap["max_abs"] - max(abs(a - b) for a, b in zip(merged, trained))) <= 1e-5, gap
    assert abs(gap["top1_agreement"] - top1) < 1e-8, (gap, top1)
    # NF4 rounding is real: the merged model is near the trained one, not equal to it
    assert 0 < gap["rel_l2"] < 0.5, gap
    merge(base, adapter, os.path.join(TMP, "qlora-bad"), "--qlora-check", os.path.join(TMP, "missing.jsonl"), expect_rc=1)


def t_merge_errors(_):
    dense, ple = os.path.join(FIXTURES, "dense"), os.path.join(FIXTURES, "ple")
    d = tempfile.mkdtemp(dir=TMP)
    out = os.path.join(d, "out")

    def refused(model, adapter, target, rc, words, *extra, **kw):
        r = merge(model, adapter, target, *extra, expect_rc=rc, **kw)
        for w in words:
            assert w.encode() in r.stderr, (w, r.stderr)
        assert sorted(os.listdir(d)) == sorted(keep), (os.listdir(d), keep)

    keep = []
    refused(dense, os.path.join(d, "nope"), out, 1, ["adapter_config.json"])
    # an adapter of another base: the PLE model's (its layer 4 has no k_proj)
    refused(dense, os.path.join(ple, "lora_lm", "adapter_final"), out, 1, ["the base weight is [32, 64]"])
    refused(dense, os.path.join(dense, "lora_lm", "adapter_final"), os.path.join(d, "missing", "out"), 1, ["parent"])
    refused(dense, os.path.join(dense, "lora_lm", "adapter_final"), out, 2, ["usage"], "--dtype", "f8")
    refused(os.path.join(d, "nomodel"), os.path.join(dense, "lora_lm", "adapter_final"), out, 1, ["config.json"])
    os.mkdir(out)
    keep = ["out"]
    refused(dense, os.path.join(dense, "lora_lm", "adapter_final"), out, 1, ["already exists"])
    os.rmdir(out)
    keep = []
    # a write that fails midway (the file-size limit stands in for a full
    # disk): the error says so and no output or temporary directory remains
    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100000, 100000))
    refused(dense, os.path.join(dense, "lora_lm", "adapter_final"), out, 1, ["cannot write", "too large"],
            preexec_fn=small_files)
    # what a killed merge leaves behind is cleared by the next one
    stale = os.path.join(d, ".out.partial-abc123")
    os.mkdir(stale)
    open(os.path.join(stale, "model-00001-of-00001.safetensors"), "wb").write(b"half")
    merge(dense, os.path.join(dense, "lora_lm", "adapter_final"), out)
    assert sorted(os.listdir(d)) == ["out"], os.listdir(d)


def main():
    runner = Runner()
    for case in (("dense", "lora_lm"), ("dense", "lora_all"), ("ple", "lora_lm"), ("moe", "lora_lm")):
        runner.run("merge_matches_adapter[%s/%s]" % case, t_merge_matches_adapter, case)
    runner.run("merge_all_linear_trained[ple]", t_merge_all_linear_trained, None)
    runner.run("merge_qlora_gap[dense]", t_merge_qlora_gap, None)
    runner.run("merged_base_fine_tunes[dense]", t_merged_base_fine_tunes, None)
    runner.run("merge_errors", t_merge_errors, None)
    code = runner.finish()
    if code == 0:
        shutil.rmtree(TMP, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
