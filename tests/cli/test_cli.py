"""The engine's command-line tools against the golden data: `forward` writes
logits (and hidden states) that match transformers at every unpadded
position, `generate` reproduces generate.json, `infer` answers image
questions as transformers does end to end, and bad input fails clearly.

usage: test_cli.py PATH/TO/gemmaforge
"""
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "api"))
from harness import FIXTURES, Runner, read_st, write_st  # noqa: E402

BIN = sys.argv[1]


def rel_err(got, ref, row_len, use):
    err = mx = 0.0
    for r, ok in enumerate(use):
        if not ok:
            continue
        for i in range(r * row_len, (r + 1) * row_len):
            err = max(err, abs(got[i] - ref[i]))
            mx = max(mx, abs(ref[i]))
    return err / mx


def t_forward_matches_golden(variant):
    gold = os.path.join(FIXTURES, variant, "forward_text.safetensors")
    out = os.path.join(tempfile.mkdtemp(), "out.safetensors")
    r = subprocess.run([BIN, "forward", "--model", os.path.join(FIXTURES, variant), "--inputs", gold, "--out", out, "--hidden"],
                       capture_output=True)
    assert r.returncode == 0, r.stderr
    g, o = read_st(gold), read_st(out)
    (B, T, V), ref = g["logits"]
    shape, got = o["logits"]
    assert shape == [B, T, V], shape
    mask = g["attention_mask"][1]
    e = rel_err(got, ref, V, mask)
    assert e <= 1e-3, "logits rel err %g" % e
    hs, href = g["hidden_states"]
    assert o["hidden_states"][0] == hs
    e = rel_err(o["hidden_states"][1], href, hs[-1], mask * hs[0])
    assert e <= 1e-3, "hidden rel err %g" % e


def t_generate_matches_golden(variant):
    want = json.load(open(os.path.join(FIXTURES, variant, "generate.json")))["text"]
    r = subprocess.run([BIN, "generate", "--model", os.path.join(FIXTURES, variant), "--ids", ",".join(map(str, want["prompt"])),
                        "--max-new", str(len(want["output"]))], capture_output=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == want["output"], r.stdout


def t_forward_image_matches_golden(variant):
    gold = os.path.join(FIXTURES, variant, "forward_image.safetensors")
    out = os.path.join(tempfile.mkdtemp(), "out.safetensors")
    r = subprocess.run([BIN, "forward", "--model", os.path.join(FIXTURES, variant), "--inputs", gold, "--out", out],
                       capture_output=True)
    assert r.returncode == 0, r.stderr
    g, o = read_st(gold), read_st(out)
    (B, T, V), ref = g["logits"]
    e = rel_err(o["logits"][1], ref, V, [1] * T)
    assert e <= 1e-3, "image logits rel err %g" % e
    (n, H), soft = g["vision_soft_tokens"]
    assert o["vision_soft_tokens"][0] == [n, H]
    e = rel_err(o["vision_soft_tokens"][1], soft, H, [1] * n)
    assert e <= 1e-3, "soft tokens rel err %g" % e


def t_preprocess_then_forward(variant):
    """preprocess writes what the golden image inputs hold; forward on it gives the golden soft tokens."""
    tmp = tempfile.mkdtemp()
    pre = os.path.join(tmp, "pre.safetensors")
    r = subprocess.run([BIN, "preprocess", "--image", os.path.join(FIXTURES, "images", "wide.png"), "--max-soft-tokens", "70",
                        "--out", pre], capture_output=True)
    assert r.returncode == 0 and json.loads(r.stdout)["soft_tokens"] == 60, (r.stdout, r.stderr)
    p = read_st(pre)
    g = read_st(os.path.join(FIXTURES, variant, "forward_image.safetensors"))
    assert p["image_position_ids"][1] == g["image_position_ids"][1]
    assert [round(v * 255) for v in p["pixel_values"][1]] == list(g["pixel_values_u8"][1])
    inputs = os.path.join(tmp, "in.safetensors")
    ids = g["input_ids"][1]
    write_st(inputs, [("input_ids", "I64", g["input_ids"][0], struct.pack("<%dq" % len(ids), *ids)),
                      ("pixel_values", "F32", p["pixel_values"][0], struct.pack("<%df" % len(p["pixel_values"][1]), *p["pixel_values"][1])),
                      ("image_position_ids", "I64", p["image_position_ids"][0],
                       struct.pack("<%dq" % len(p["image_position_ids"][1]), *p["image_position_ids"][1]))])
    out = os.path.join(tmp, "out.safetensors")
    r = subprocess.run([BIN, "forward", "--model", os.path.join(FIXTURES, variant), "--inputs", inputs, "--out", out], capture_output=True)
    assert r.returncode == 0, r.stderr
    (n, H), soft = g["vision_soft_tokens"]
    assert rel_err(read_st(out)["vision_soft_tokens"][1], soft, H, [1] * n) <= 1e-3
    for bad, msg in ((["--max-soft-tokens", "100"], b"budget"), (["--image", "/nonexistent.png"], b"cannot open")):
        args = [BIN, "preprocess", "--image", os.path.join(FIXTURES, "images", "wide.png"), "--out", pre] + bad
        r = subprocess.run(args, capture_output=True)
        assert r.returncode == 1 and msg in r.stderr, r.stderr


def t_tokenize_matches_golden(_):
    cases = [json.loads(l) for l in open(os.path.join(FIXTURES, "tokenizer_cases.jsonl"))]
    model = os.path.join(FIXTURES, "dense")
    r = subprocess.run([BIN, "tokenize", "--model", model, "--jsonl"], input="".join(json.dumps({"text": c["text"]}) + "\n" for c in cases).encode(),
                       capture_output=True)
    assert r.returncode == 0, r.stderr
    got = [json.loads(l)["ids"] for l in r.stdout.decode().splitlines()]
    assert got == [c["ids"] for c in cases], got
    r = subprocess.run([BIN, "tokenize", "--model", model, cases[0]["text"]], capture_output=True)
    assert json.loads(r.stdout)["ids"] == cases[0]["ids"]
    r = subprocess.run([BIN, "tokenize", "--model", model, "--jsonl"], input=b'{"txt": 1}\n', capture_output=True)
    assert r.returncode == 1 and b"line 1" in r.stderr


def raw_tensors(path):
    with open(path, "rb") as f:
        data = f.read()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    return [(k, v["dtype"], v["shape"], data[8 + n + v["data_offsets"][0]:8 + n + v["data_offsets"][1]])
            for k, v in header.items() if k != "__metadata__"]


def bf16_to(raw, dtype):
    """Exact widening of bf16 values to F32, or to F16 when representable (small weights are)."""
    vals = struct.unpack("<%dH" % (len(raw) // 2), raw)
    f32 = [struct.unpack("<f", struct.pack("<I", v << 16))[0] for v in vals]
    return struct.pack("<%d%s" % (len(f32), "f" if dtype == "F32" else "e"), *f32)


def t_sharded_and_dtypes(variant):
    """The same model as two shards with an index, with weights in F32 and F16: same logits."""
    src = os.path.join(FIXTURES, variant)
    tmp = tempfile.mkdtemp()
    for f in ("config.json", "generation_config.json"):
        shutil.copy(os.path.join(src, f), tmp)
    tensors = raw_tensors(os.path.join(src, "model.safetensors"))
    half = len(tensors) // 2
    conv = []
    for i, (name, dtype, shape, raw) in enumerate(tensors):
        if dtype == "BF16" and i % 3 == 1:
            conv.append((name, "F32", shape, bf16_to(raw, "F32")))
        elif dtype == "BF16" and i % 3 == 2:
            conv.append((name, "F16", shape, bf16_to(raw, "F16")))
        else:
            conv.append((name, dtype, shape, raw))
    write_st(os.path.join(tmp, "model-00001-of-00002.safetensors"), conv[:half])
    write_st(os.path.join(tmp, "model-00002-of-00002.safetensors"), conv[half:])
    index = {"metadata": {}, "weight_map": {t[0]: "model-0000%d-of-00002.safetensors" % (1 if i < half else 2)
                                            for i, t in enumerate(conv)}}
    json.dump(index, open(os.path.join(tmp, "model.safetensors.index.json"), "w"))
    gold = os.path.join(src, "forward_text.safetensors")
    out = os.path.join(tmp, "out.safetensors")
    r = subprocess.run([BIN, "forward", "--model", tmp, "--inputs", gold, "--out", out], capture_output=True)
    assert r.returncode == 0, r.stderr
    g = read_st(gold)
    (B, T, V), ref = g["logits"]
    e = rel_err(read_st(out)["logits"][1], ref, V, g["attention_mask"][1])
    assert e <= 1e-3, e
    # an index that points a tensor at the wrong shard is refused, naming it
    name = conv[0][0]
    index["weight_map"][name] = "model-00002-of-00002.safetensors"
    json.dump(index, open(os.path.join(tmp, "model.safetensors.index.json"), "w"))
    r = subprocess.run([BIN, "forward", "--model", tmp, "--inputs", gold, "--out", out], capture_output=True)
    assert r.returncode == 1 and name.encode() in r.stderr, r.stderr
    # an unexpected tensor is refused, not ignored
    index["weight_map"][name] = "model-00001-of-00002.safetensors"
    write_st(os.path.join(tmp, "model-00001-of-00002.safetensors"), conv[:half] + [("model.language_model.extra.weight", "F32", [1], b"\0" * 4)])
    index["weight_map"]["model.language_model.extra.weight"] = "model-00001-of-00002.safetensors"
    json.dump(index, open(os.path.join(tmp, "model.safetensors.index.json"), "w"))
    r = subprocess.run([BIN, "forward", "--model", tmp, "--inputs", gold, "--out", out], capture_output=True)
    assert r.returncode == 1 and b"model.language_model.extra.weight" in r.stderr, r.stderr


def t_errors_are_clear(_):
    tmp = tempfile.mkdtemp()
    bad_model = os.path.join(tmp, "m")
    shutil.copytree(os.path.join(FIXTURES, "dense"), bad_model)
    os.remove(os.path.join(bad_model, "model.safetensors"))
    r = subprocess.run([BIN, "generate", "--model", bad_model, "--ids", "2,3"], capture_output=True)
    assert r.returncode == 1 and b"model.safetensors" in r.stderr, r.stderr
    # a weight with the wrong shape is named with both shapes
    cfg = json.load(open(os.path.join(bad_model, "config.json")))
    cfg["text_config"]["intermediate_size"] = 96
    shutil.copy(os.path.join(FIXTURES, "dense", "model.safetensors"), bad_model)
    json.dump(cfg, open(os.path.join(bad_model, "config.json"), "w"))
    r = subprocess.run([BIN, "generate", "--model", bad_model, "--ids", "2,3"], capture_output=True)
    assert r.returncode == 1 and b"gate_proj.weight' has wrong shape" in r.stderr and b"[96, 64]" in r.stderr, r.stderr
    r = subprocess.run([BIN, "generate", "--model", os.path.join(FIXTURES, "dense"), "--ids", "2,x"], capture_output=True)
    assert r.returncode == 2, r
    r = subprocess.run([BIN, "generate", "--model", os.path.join(FIXTURES, "dense"), "--ids", "2,5000"], capture_output=True)
    assert r.returncode == 1 and b"outside the vocabulary" in r.stderr, r.stderr
    r = subprocess.run([BIN, "forward", "--model", os.path.join(FIXTURES, "dense")], capture_output=True)
    assert r.returncode == 2 and b"usage" in r.stderr
    # asked for help, serve prints the usage on stdout and succeeds
    r = subprocess.run([BIN, "serve", "--help"], capture_output=True)
    assert r.returncode == 0 and r.stdout.startswith(b"usage: gemmaforge") and not r.stderr, r
    r = subprocess.run([BIN, "serve", "--port"], capture_output=True)
    assert r.returncode == 2 and b"--port needs a value" in r.stderr, r


def infer_args(variant, case, *extra):
    args = [BIN, "infer", "--model", os.path.join(FIXTURES, variant), "--prompt", case["prompt"],
            "--max-tokens", str(case["max_new_tokens"])]
    if case["image"]:
        args += ["--image", os.path.join(FIXTURES, "images", case["image"])]
    if case["system"]:
        args += ["--system", case["system"]]
    return args + list(extra)


def t_infer_matches_transformers(variant):
    """`infer` end to end against transformers' processor + generate + decode
    (tools/gen_infer_golden.py): the prompt ids, the answer ids, the text;
    with the base model and with each golden adapter (PEFT)."""
    gen = json.load(open(os.path.join(FIXTURES, variant, "generation_config.json")))
    eos = set(gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]])
    gold = json.load(open(os.path.join(FIXTURES, variant, "infer.json")))
    runs = [(case, []) for case in gold["cases"]]
    for kind, cases in gold["adapters"].items():
        runs += [(case, ["--adapter", os.path.join(FIXTURES, variant, kind, "adapter_final")]) for case in cases]
    assert len(runs) > len(gold["cases"])
    for case, extra in runs:
        r = subprocess.run(infer_args(variant, case, "--json", *extra), capture_output=True)
        assert r.returncode == 0, r.stderr
        got = json.loads(r.stdout)
        assert got["prompt_ids"] == case["input_ids"], (case["image"], got["prompt_ids"], case["input_ids"])
        want = case["output_ids"]
        stopped = bool(want) and want[-1] in eos
        assert got["output_ids"] == (want[:-1] if stopped else want), (got["output_ids"], want)
        assert got["finish_reason"] == ("stop" if stopped else "length")
        assert got["text"] == case["text"], (got["text"], case["text"])
        # the streaming form prints the same text, then a newline
        r = subprocess.run(infer_args(variant, case, *extra), capture_output=True)
        assert r.returncode == 0 and r.stdout.decode() == case["text"] + "\n", (r.stdout, case["text"])


def png_with_header(w, h):
    import zlib
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def t_infer_errors(_):
    tmp = tempfile.mkdtemp()
    dense = os.path.join(FIXTURES, "dense")

    def infer(image, model=dense):
        return subprocess.run([BIN, "infer", "--model", model, "--image", image, "--prompt", "hi"], capture_output=True)
    r = infer(os.path.join(tmp, "missing.png"))
    assert r.returncode == 1 and b"missing.png" in r.stderr and b"No such file" in r.stderr, r.stderr
    text = os.path.join(tmp, "notes.txt")
    open(text, "w").write("not an image")
    r = infer(text)
    assert r.returncode == 1 and b"neither PNG nor JPEG" in r.stderr, r.stderr
    bomb = os.path.join(tmp, "bomb.png")
    open(bomb, "wb").write(png_with_header(100000, 100000))
    r = infer(bomb)
    assert r.returncode == 1 and b"100000x100000 pixels, over the cap" in r.stderr, r.stderr
    truncated = os.path.join(tmp, "cut.jpg")
    open(truncated, "wb").write(open(os.path.join(FIXTURES, "images", "photo.jpg"), "rb").read()[:3000])
    r = infer(truncated)
    assert r.returncode == 1 and b"invalid JPEG" in r.stderr, r.stderr
    # a model directory without its tokenizer is named as such
    no_tok = os.path.join(tmp, "m")
    shutil.copytree(dense, no_tok)
    os.remove(os.path.join(no_tok, "tokenizer.json"))
    r = infer(os.path.join(FIXTURES, "images", "wide.png"), no_tok)
    assert r.returncode == 1 and b"tokenizer.json does not exist" in r.stderr, r.stderr
    # an unsupported processor setting is refused, naming it
    shutil.copy(os.path.join(dense, "tokenizer.json"), no_tok)
    pc = json.load(open(os.path.join(dense, "processor_config.json")))
    pc["image_processor"]["do_normalize"] = True
    json.dump(pc, open(os.path.join(no_tok, "processor_config.json"), "w"))
    r = infer(os.path.join(FIXTURES, "images", "wide.png"), no_tok)
    assert r.returncode == 1 and b"do_normalize" in r.stderr, r.stderr
    r = subprocess.run([BIN, "infer", "--model", dense], capture_output=True)
    assert r.returncode == 2 and b"usage" in r.stderr


def t_forward_with_adapter(case):
    """logits_final of the golden LoRA runs: the trained PEFT adapter applied
    to the language model (and, for lora_all, the vision tower)."""
    variant, kind = case
    d = os.path.join(FIXTURES, variant)
    out = os.path.join(tempfile.mkdtemp(), "out.safetensors")
    r = subprocess.run([BIN, "forward", "--model", d, "--adapter", os.path.join(d, kind, "adapter_final"), "--inputs",
                        os.path.join(d, "forward_image.safetensors"), "--out", out], capture_output=True)
    assert r.returncode == 0, r.stderr
    (_, T, V), ref = read_st(os.path.join(d, kind, "logits_final.safetensors"))["logits"]
    e = rel_err(read_st(out)["logits"][1], ref, V, [1] * T)
    assert e <= 1e-3, "logits with adapter: rel err %g" % e
    # and the adapter matters: the base model's logits are far from these
    base = read_st(os.path.join(d, "forward_image.safetensors"))["logits"][1]
    assert rel_err(base, ref, V, [1] * T) > 1e-2


def t_forward_mixed_adapters(_):
    """gemmaforge forward --adapters: one batch whose rows use the golden
    lora_all adapter (with the image), the base model, lora_lm and lora_all
    (text) gives each row the logits it gets alone with --adapter."""
    d = os.path.join(FIXTURES, "dense")
    tmp = tempfile.mkdtemp()
    fi = read_st(os.path.join(d, "forward_image.safetensors"))
    (_, T), ids = fi["input_ids"]
    mm = fi["mm_token_type_ids"][1]
    text = [300 + (i * 37) % 600 if m else x for i, (x, m) in enumerate(zip(ids, mm))]
    rows = [(list(ids), list(mm))] + [(text, [0] * T)] * 3
    adapters = [os.path.join(d, "lora_all", "adapter_final"), "-", os.path.join(d, "lora_lm", "adapter_final"),
                os.path.join(d, "lora_all", "adapter_final")]
    image = [(k, "U8" if k == "pixel_values_u8" else "I64", fi[k][0],
              struct.pack("<%d%s" % (len(fi[k][1]), "B" if k == "pixel_values_u8" else "q"), *fi[k][1]))
             for k in ("pixel_values_u8", "image_position_ids")]

    def inputs(path, rs, with_image):
        flat_ids = [x for r in rs for x in r[0]]
        flat_mm = [x for r in rs for x in r[1]]
        write_st(path, [("input_ids", "I64", [len(rs), T], struct.pack("<%dq" % len(flat_ids), *flat_ids)),
                        ("mm_token_type_ids", "I64", [len(rs), T], struct.pack("<%dq" % len(flat_mm), *flat_mm))]
                 + (image if with_image else []))

    batch_in, batch_out = os.path.join(tmp, "batch.safetensors"), os.path.join(tmp, "batch_out.safetensors")
    inputs(batch_in, rows, True)
    r = subprocess.run([BIN, "forward", "--model", d, "--adapters", ",".join(adapters), "--inputs", batch_in,
                        "--out", batch_out], capture_output=True)
    assert r.returncode == 0, r.stderr
    (B, _, V), mixed = read_st(batch_out)["logits"]
    assert B == 4
    for b, (row, adapter) in enumerate(zip(rows, adapters)):
        one_in, one_out = os.path.join(tmp, "row%d.safetensors" % b), os.path.join(tmp, "row%d_out.safetensors" % b)
        inputs(one_in, [row], b == 0)
        args = [BIN, "forward", "--model", d, "--inputs", one_in, "--out", one_out]
        r = subprocess.run(args + (["--adapter", adapter] if adapter != "-" else []), capture_output=True)
        assert r.returncode == 0, r.stderr
        alone = read_st(one_out)["logits"][1]
        e = rel_err(mixed[b * T * V:(b + 1) * T * V], alone, V, [1] * T)
        assert e <= 1e-4, "row %d (%s): mixed batch vs alone rel err %g" % (b, adapter, e)
    # the rows differ: the adapters matter inside the batch
    assert rel_err(mixed[1 * T * V:2 * T * V], mixed[2 * T * V:3 * T * V], V, [1] * T) > 1e-2
    r = subprocess.run([BIN, "forward", "--model", d, "--adapters", "-,-", "--inputs", batch_in, "--out", batch_out],
                       capture_output=True)
    assert r.returncode == 1 and b"--adapters names 2 rows" in r.stderr, r.stderr


def rel_l2(got, ref):
    num = sum((g - r) ** 2 for g, r in zip(got, ref))
    den = sum(r * r for r in ref)
    return (num / den) ** 0.5 if den else num ** 0.5


def lora_step(d, adapter, out, steps, train):
    return subprocess.run([BIN, "lora-step", "--model", d, "--adapter", adapter, "--inputs",
                           os.path.join(d, "forward_image.safetensors"), "--steps", str(steps), "--lr", repr(train["lr"]),
                           "--weight-decay", repr(train["weight_decay"]), "--out", out], capture_output=True)


def check_grads(got_path, ref_path, n_trainable):
    grads, ref_grads = read_st(got_path), read_st(ref_path)
    assert sorted(grads) == sorted(ref_grads), set(grads) ^ set(ref_grads)
    n = 0
    for name, (shape, ref) in ref_grads.items():
        assert grads[name][0] == shape, name
        e = rel_l2(grads[name][1], ref)
        assert e <= 1e-3, "gradient %s: relative L2 error %g" % (name, e)
        n += len(ref)
    assert n == n_trainable, (n, n_trainable)


def adamw_steps(p, grads, lr, wd, betas, eps):
    """torch.optim.AdamW applied to one tensor for len(grads) steps, in float64."""
    m, v = [0.0] * len(p), [0.0] * len(p)
    p = list(p)
    for t, g in enumerate(grads, 1):
        c1, c2 = 1 - betas[0] ** t, (1 - betas[1] ** t) ** 0.5
        for i, gi in enumerate(g):
            m[i] = betas[0] * m[i] + (1 - betas[0]) * gi
            v[i] = betas[1] * v[i] + (1 - betas[1]) * gi * gi
            p[i] = p[i] * (1 - lr * wd) - lr / c1 * m[i] / (v[i] ** 0.5 / c2 + eps)
    return p


def stepped_adapter(g, train, history):
    """A directory with adapter_init after torch's AdamW applied the
    gradients history(peft_key) -> [step 0 grads, step 1 grads, ...]."""
    init = read_st(os.path.join(g, "adapter_init", "adapter_model.safetensors"))
    tensors = []
    for name, (shape, p) in init.items():
        new = adamw_steps(p, history(name.replace(".weight", ".default.weight")), train["lr"], train["weight_decay"],
                          train["betas"], train["eps"])
        tensors.append((name, "F32", shape, struct.pack("<%df" % len(new), *new)))
    a = tempfile.mkdtemp()
    shutil.copy(os.path.join(g, "adapter_init", "adapter_config.json"), a)
    write_st(os.path.join(a, "adapter_model.safetensors"), tensors)
    return a


def loss_at(d, adapter, train):
    """gemmaforge lora-step's loss at an adapter, and its output directory."""
    out = tempfile.mkdtemp()
    r = lora_step(d, adapter, out, 1, train)
    assert r.returncode == 0, r.stderr
    return json.load(open(os.path.join(out, "losses.json")))["losses_before_each_step"][0], out


def t_lora_step_gradients(case):
    """gemmaforge lora-step from adapter_init on the image sample: the loss and
    the gradient of every LoRA weight against PEFT's; then, teacher-forced,
    the loss after torch's own first AdamW step (the adapter rebuilt here from
    adapter_init and PEFT's gradients) against PEFT's second loss."""
    variant, kind = case
    d = os.path.join(FIXTURES, variant)
    g = os.path.join(d, kind)
    train = json.load(open(os.path.join(g, "train.json")))
    ref = train["losses_before_each_step"]
    loss, out = loss_at(d, os.path.join(g, "adapter_init"), train)
    assert abs(loss - ref[0]) <= 1e-3 * ref[0], (loss, ref[0])
    check_grads(os.path.join(out, "grads_step0.safetensors"), os.path.join(g, "grads_step0.safetensors"), train["n_trainable"])
    ref_grads = read_st(os.path.join(g, "grads_step0.safetensors"))
    loss1, _ = loss_at(d, stepped_adapter(g, train, lambda key: [ref_grads[key][1]]), train)
    assert abs(loss1 - ref[1]) <= 1e-3 * ref[1], "loss after one torch step: %g, PEFT %g" % (loss1, ref[1])


def t_lora_step_teacher_forced(case):
    """Every step of PEFT's five-step run, teacher-forced: the adapter before
    step k is rebuilt from adapter_init and PEFT's own gradients of steps
    0..k-1 with torch's AdamW (trajectory.safetensors, recorded by
    tools/gen_train_trajectory.py), and the engine's loss and gradients there
    must equal PEFT's. This checks the gradients at every adapter the run
    passes through, where the free-running comparison cannot: see
    t_lora_step_trajectory."""
    variant, kind = case
    d = os.path.join(FIXTURES, variant)
    g = os.path.join(d, kind)
    train = json.load(open(os.path.join(g, "train.json")))
    traj = json.load(open(os.path.join(g, "trajectory.json")))
    grads = read_st(os.path.join(g, "trajectory.safetensors"))
    for k in range(1, train["steps"]):
        adapter = stepped_adapter(g, train, lambda key: [grads["step%d.%s" % (s, key)][1] for s in range(k)])
        loss, out = loss_at(d, adapter, train)
        ref = traj["losses_float32"][k]
        assert abs(loss - ref) <= 1e-3 * ref, "step %d: loss %g, PEFT %g" % (k, loss, ref)
        got = read_st(os.path.join(out, "grads_step0.safetensors"))
        for name, (shape, ref_g) in ((n[len("step%d." % k):], v) for n, v in grads.items()
                                     if n.startswith("step%d." % k)):
            e = rel_l2(got[name][1], ref_g)
            assert e <= 1e-3, "step %d gradient %s: relative L2 error %g" % (k, name, e)


def t_lora_step_trajectory(case):
    """Five free-running AdamW steps: the losses of PEFT's float64 rerun of the
    golden experiment (trajectory.json), the golden float32 losses of
    train.json where they are reproducible, and, for dense/lora_lm,
    adapter_final and the logits it gives (logits_final).

    The free-running trajectory is ill-conditioned: AdamW's first update is
    about lr * sign(g), so a weight whose gradient lies within float32 rounding
    noise of zero moves by +-lr whichever sign the noise gives, and the runs
    part from there. PEFT itself, rerun with the same versions on another CPU
    (tools/gen_train_trajectory.py), misses the golden moe losses by 5% at
    step 4 and the golden adapter_final of dense/lora_all, ple and moe by 6%,
    3% and 24%, while its float64 run and ours agree within 6e-4 on every
    loss. So the golden float32 values of those runs are set by PEFT's
    rounding on the machine that made them; the gradients along the whole
    trajectory are checked teacher-forced instead (t_lora_step_teacher_forced)."""
    variant, kind, check_golden, check_final = case
    d = os.path.join(FIXTURES, variant)
    g = os.path.join(d, kind)
    train = json.load(open(os.path.join(g, "train.json")))
    traj = json.load(open(os.path.join(g, "trajectory.json")))
    out = tempfile.mkdtemp()
    r = lora_step(d, os.path.join(g, "adapter_init"), out, train["steps"], train)
    assert r.returncode == 0, r.stderr
    losses = json.load(open(os.path.join(out, "losses.json")))["losses_before_each_step"]
    assert len(losses) == train["steps"]
    # On a GPU the float32 sums run in another order than the CPU's, and the
    # moe run's routing turns the parted weights into other experts for
    # some tokens (GEMMA4.md 13): there its first loss is held, the later
    # ones reported (a run on an H200 missed the float64 loss before step 2
    # by 1.9e-3 while every teacher-forced gradient held).
    loose = variant == "moe" and os.environ.get("GF_DEVICE", "").startswith("cuda")
    for i, (got, ref) in enumerate(zip(losses, traj["losses_float64"])):
        if loose and i > 0:
            print("  moe on %s: loss before step %d %.6g, PEFT float64 %.6g (not held)" % (
                os.environ["GF_DEVICE"], i, got, ref))
            continue
        assert abs(got - ref) <= 1e-3 * abs(ref), "loss before step %d: %g, PEFT float64 %g" % (i, got, ref)
    for i, (got, ref) in enumerate(zip(losses, train["losses_before_each_step"])):
        assert not check_golden or abs(got - ref) <= 1e-3 * abs(ref), "loss before step %d: %g, PEFT %g" % (i, got, ref)
    if not check_final:
        return
    final = read_st(os.path.join(out, "adapter_final", "adapter_model.safetensors"))
    ref_final = read_st(os.path.join(g, "adapter_final", "adapter_model.safetensors"))
    assert sorted(final) == sorted(ref_final)
    for name, (shape, ref) in ref_final.items():
        e = max(abs(a - b) for a, b in zip(final[name][1], ref)) / max(abs(v) for v in ref)
        assert e <= 1e-3, "adapter_final %s: rel err %g" % (name, e)
    logits = os.path.join(out, "logits.safetensors")
    r = subprocess.run([BIN, "forward", "--model", d, "--adapter", os.path.join(out, "adapter_final"), "--inputs",
                        os.path.join(d, "forward_image.safetensors"), "--out", logits], capture_output=True)
    assert r.returncode == 0, r.stderr
    (_, T, V), ref = read_st(os.path.join(g, "logits_final.safetensors"))["logits"]
    e = rel_err(read_st(logits)["logits"][1], ref, V, [1] * T)
    assert e <= 1e-3, "logits_final: rel err %g" % e


def t_qlora_step(_):
    """QLoRA: the same five steps on the dense model with its linears in NF4.
    The base really is quantized (the first loss moves away from the bf16
    one), and training on it still drives the loss down at every step."""
    d = os.path.join(FIXTURES, "dense")
    g = os.path.join(d, "lora_all")
    train = json.load(open(os.path.join(g, "train.json")))
    out = tempfile.mkdtemp()
    r = subprocess.run([BIN, "lora-step", "--quantize", "nf4", "--model", d, "--adapter", os.path.join(g, "adapter_init"),
                        "--inputs", os.path.join(d, "forward_image.safetensors"), "--steps", "5", "--lr", repr(train["lr"]),
                        "--weight-decay", repr(train["weight_decay"]), "--out", out], capture_output=True)
    assert r.returncode == 0, r.stderr
    losses = json.load(open(os.path.join(out, "losses.json")))["losses_before_each_step"]
    ref = train["losses_before_each_step"]
    assert abs(losses[0] - ref[0]) > 1e-2 * ref[0], (losses[0], ref[0])
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.5 * losses[0], losses
    r = subprocess.run([BIN, "lora-step", "--quantize", "int3", "--model", d], capture_output=True)
    assert r.returncode == 2 and b"--quantize" in r.stderr, r.stderr
    # the parity tool compares with PEFT, whose dropout masks cannot be reproduced: refused, never ignored
    drop = os.path.join(out, "dropout")
    shutil.copytree(os.path.join(g, "adapter_init"), drop)
    cfg = json.load(open(os.path.join(drop, "adapter_config.json")))
    cfg["lora_dropout"] = 0.1
    json.dump(cfg, open(os.path.join(drop, "adapter_config.json"), "w"))
    r = lora_step(d, drop, os.path.join(out, "o2"), 1, train)
    assert r.returncode == 1 and b"lora_dropout 0.1" in r.stderr, r.stderr


def t_adapter_refused(_):
    d = os.path.join(FIXTURES, "dense")
    src = os.path.join(d, "lora_lm", "adapter_final")
    tmp = tempfile.mkdtemp()

    def forward(adapter):
        return subprocess.run([BIN, "forward", "--model", d, "--adapter", adapter, "--inputs",
                               os.path.join(d, "forward_text.safetensors"), "--out", os.path.join(tmp, "o.safetensors")],
                              capture_output=True)
    tensors = raw_tensors(os.path.join(src, "adapter_model.safetensors"))
    # a module this model does not have
    bad = os.path.join(tmp, "wrong_keys")
    os.mkdir(bad)
    shutil.copy(os.path.join(src, "adapter_config.json"), bad)
    renamed = [(n.replace("layers.0.", "layers.40."), dt, sh, raw) for n, dt, sh, raw in tensors]
    write_st(os.path.join(bad, "adapter_model.safetensors"), renamed)
    r = forward(bad)
    assert r.returncode == 1 and b"layers.40" in r.stderr, r.stderr
    # every lora_B zero: it would change nothing
    empty = os.path.join(tmp, "zero_b")
    os.mkdir(empty)
    shutil.copy(os.path.join(src, "adapter_config.json"), empty)
    zeroed = [(n, dt, sh, b"\0" * len(raw) if ".lora_B." in n else raw) for n, dt, sh, raw in tensors]
    write_st(os.path.join(empty, "adapter_model.safetensors"), zeroed)
    r = forward(empty)
    assert r.returncode == 1 and b"change nothing" in r.stderr, r.stderr
    assert not os.path.exists(os.path.join(tmp, "o.safetensors"))


def main():
    runner = Runner()
    for v in ("dense", "ple", "moe"):
        runner.run("forward_matches_golden[%s]" % v, t_forward_matches_golden, v)
        runner.run("generate_matches_golden[%s]" % v, t_generate_matches_golden, v)
    for v in ("dense", "ple", "moe"):
        runner.run("forward_image_matches_golden[%s]" % v, t_forward_image_matches_golden, v)
    runner.run("preprocess_then_forward[dense]", t_preprocess_then_forward, "dense")
    runner.run("tokenize_matches_golden", t_tokenize_matches_golden, None)
    runner.run("sharded_and_dtypes[ple]", t_sharded_and_dtypes, "ple")
    runner.run("sharded_and_dtypes[moe]", t_sharded_and_dtypes, "moe")
    runner.run("errors_are_clear", t_errors_are_clear, None)
    for v in ("dense", "ple", "moe"):
        runner.run("infer_matches_transformers[%s]" % v, t_infer_matches_transformers, v)
    runner.run("infer_errors", t_infer_errors, None)
    for case in (("dense", "lora_lm"), ("dense", "lora_all"), ("ple", "lora_lm"), ("moe", "lora_lm")):
        runner.run("forward_with_adapter[%s/%s]" % case, t_forward_with_adapter, case)
    runner.run("adapter_refused", t_adapter_refused, None)
    runner.run("forward_mixed_adapters", t_forward_mixed_adapters, None)
    for case in (("dense", "lora_lm"), ("dense", "lora_all"), ("ple", "lora_lm"), ("moe", "lora_lm")):
        runner.run("lora_step_gradients[%s/%s]" % case, t_lora_step_gradients, case)
    for case in (("dense", "lora_lm", True, True), ("dense", "lora_all", True, False), ("ple", "lora_lm", True, False),
                 ("moe", "lora_lm", False, False)):
        runner.run("lora_step_trajectory[%s/%s]" % case[:2], t_lora_step_trajectory, case)
    for case in (("dense", "lora_lm"), ("dense", "lora_all"), ("ple", "lora_lm"), ("moe", "lora_lm")):
        runner.run("lora_step_teacher_forced[%s/%s]" % case, t_lora_step_teacher_forced, case)
    runner.run("qlora_step", t_qlora_step, None)
    return runner.finish()


if __name__ == "__main__":
    sys.exit(main())
