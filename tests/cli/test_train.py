"""`gemmaforge train` and `gemmaforge preflight` on the bundled tiny model:
the step plan and its loss normalization, checkpoints that resume bit for
bit (and refuse to resume when damaged), validation, and clear errors.

usage: test_train.py PATH/TO/gemmaforge
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "api"))
sys.path.insert(0, os.path.join(HERE, "..", "data"))
from harness import FIXTURES, Runner  # noqa: E402
import shapes  # noqa: E402

BIN = sys.argv[1]
MODEL = os.path.join(FIXTURES, "dense")
TMP = tempfile.mkdtemp(prefix="gf-train-")


def write_dataset(name, n, seed, prefix="img"):
    j, t, _ = shapes.dataset(n, seed, prefix)
    jp, tp = os.path.join(TMP, name + ".jsonl"), os.path.join(TMP, name + ".tar")
    open(jp, "wb").write(j)
    open(tp, "wb").write(t)
    return jp, tp


DATA, IMAGES = write_dataset("train", 12, 21)
BASE = {"epochs": 1, "gradient_accumulation_steps": 1, "learning_rate": 2e-3, "lora_rank": 4, "lora_alpha": 8, "seed": 3, "warmup_ratio": 0.0,
        "save_every": 100}


def train(out, hp=None, extra=(), dataset=(DATA, IMAGES), expect_rc=0):
    args = [BIN, "train", "--model", MODEL, "--dataset", dataset[0], "--images", dataset[1], "--out", out]
    for k, v in dict(BASE, **(hp or {})).items():
        args += ["--" + k.replace("_", "-"), str(v)]
    r = subprocess.run(args + list(extra), capture_output=True, timeout=3600)  # a hang guard, not a deadline
    assert r.returncode == expect_rc, (r.returncode, r.stderr.decode()[-2000:])
    return r


def metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def adapter_bytes(out):
    return open(os.path.join(out, "adapter", "adapter_model.safetensors"), "rb").read()


def t_accumulation_equals_one_batch(_):
    """batch_size x gradient_accumulation_steps is one batch whatever the split."""
    runs = {}
    for bs, acc in ((4, 1), (1, 4), (2, 2)):
        out = os.path.join(TMP, "acc-%d-%d" % (bs, acc))
        train(out, {"batch_size": bs, "gradient_accumulation_steps": acc})
        runs[(bs, acc)] = (adapter_bytes(out), [m["loss"] for m in metrics(out)])
    ref = runs[(4, 1)]
    assert len(ref[1]) == 3, ref[1]  # 12 examples, 4 per step
    for k, v in runs.items():
        assert v == ref, "batch %s differs from batch (4, 1)" % (k,)


def t_step_loss_is_the_token_mean(_):
    """A step's loss is the mean over every trained token of its sequences,
    not the mean of per-sequence means (sequences train different counts)."""
    one = os.path.join(TMP, "mean-one")
    each = os.path.join(TMP, "mean-each")
    # a learning rate too small to move the adapter: every step sees the initial one
    train(one, {"batch_size": 12, "learning_rate": 1e-12})
    train(each, {"batch_size": 1, "learning_rate": 1e-12})
    per = metrics(each)
    assert len(per) == 12 and len({m["targets"] for m in per}) > 1, per
    want = sum(m["loss"] * m["targets"] for m in per) / sum(m["targets"] for m in per)
    got = metrics(one)[0]
    assert got["targets"] == sum(m["targets"] for m in per)
    assert abs(got["loss"] - want) <= 1e-6 * want, (got["loss"], want)
    naive = sum(m["loss"] for m in per) / 12
    assert abs(naive - want) > 1e-4, "the check cannot tell the two means apart"


def t_resume_is_bit_exact_and_checked(_):
    hp = {"epochs": 2, "batch_size": 2, "gradient_accumulation_steps": 1, "save_every": 2, "warmup_ratio": 0.1}
    full = os.path.join(TMP, "full")
    part = os.path.join(TMP, "part")
    train(full, hp)
    r = train(part, hp, ["--stop-after-step", "5"], expect_rc=3)
    assert b"stopped after step 5" in r.stderr, r.stderr
    ckpts = sorted(os.listdir(os.path.join(part, "checkpoints")))
    assert ckpts == ["step-00000002", "step-00000004"], ckpts
    state = json.load(open(os.path.join(part, "checkpoints", ckpts[-1], "trainer_state.json")))
    assert state["step"] == 4 and state["plan"]["total_steps"] == 12, state
    # a damaged newest checkpoint is refused, not trained from
    broken = os.path.join(TMP, "broken")
    shutil.copytree(part, broken)
    opt = os.path.join(broken, "checkpoints", ckpts[-1], "optimizer.safetensors")
    data = bytearray(open(opt, "rb").read())
    data[-3] ^= 0x40
    open(opt, "wb").write(bytes(data))
    r = train(broken, hp, ["--resume"], expect_rc=1)
    assert b"damaged" in r.stderr, r.stderr
    # other hyperparameters are refused too
    r = train(part, dict(hp, learning_rate=1e-3), ["--resume"], expect_rc=1)
    assert b"other hyperparameters" in r.stderr, r.stderr
    train(part, hp, ["--resume"])
    assert adapter_bytes(part) == adapter_bytes(full)
    kept = sorted(os.listdir(os.path.join(part, "checkpoints")))
    assert kept == ["step-00000008", "step-00000010", "step-00000012"], kept  # the newest three
    resumed = {m["step"]: m["loss"] for m in metrics(part)}  # the resumed run's lines come last
    assert [resumed[s] for s in range(5, 13)] == [m["loss"] for m in metrics(full) if m["step"] > 4]


def t_quantization_none_and_nf4(_):
    """The same run on the stored weights and on NF4: both train, their
    losses agree to NF4's error, and the adapters differ (the base differs)."""
    runs = {}
    for q in ("none", "nf4"):
        out = os.path.join(TMP, "q-" + q)
        train(out, {"batch_size": 6, "quantization": q})
        runs[q] = ([m["loss"] for m in metrics(out)], adapter_bytes(out))
    (l0, a0), (l1, a1) = runs["none"], runs["nf4"]
    assert len(l0) == len(l1) == 2 and all(abs(x - y) <= 0.05 * x for x, y in zip(l0, l1)), (l0, l1)
    assert l0 != l1 and a0 != a1


def t_validation_every_n_steps(_):
    vj, vt = write_dataset("val", 6, 22, prefix="val")
    out = os.path.join(TMP, "val")
    train(out, {"batch_size": 2, "eval_every": 2}, ["--validation", vj, "--validation-images", vt])
    evals = [m for m in metrics(out) if "eval_loss" in m]
    assert [m["step"] for m in evals] == [2, 4, 6], evals
    assert all(m["eval_loss"] > 0 for m in evals)


def t_preflight(_):
    out = os.path.join(TMP, "pre-train")
    train(out, {"target_modules": "q_proj,down_proj", "batch_size": 12})
    modules = json.load(open(os.path.join(out, "adapter", "adapter_config.json")))["target_modules"]
    r = subprocess.run([BIN, "preflight", "--model", MODEL, "--dataset", DATA, "--images", IMAGES, "--lora-rank", "4",
                        "--target-modules", "q_proj,down_proj"], capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    text = r.stdout.decode()
    listed = re.findall(r"^  (model\.\S+)\s+\d+ -> \d+$", text, re.M)
    assert sorted(listed) == sorted(modules), (listed, modules)
    assert "%d modules" % len(modules) in text
    sizes = {k: v for k, v in re.findall(r"^  (base weights|adapter training state|activations|vision tower.*?|total)\s+"
                                         r"([\d.]+ \w+)", text, re.M)}
    assert set(sizes) >= {"base weights", "adapter training state", "activations", "total"}, text
    assert re.search(r"^device (cpu|guarded|cuda:0) \(.*, fp32\): [\d.]+ MiB free now", text, re.M), text
    first = json.loads(open(DATA).readline())
    answer = first["messages"][-1]["content"]
    assert "[[%s<turn|>]]" % answer in text, text
    assert re.search(r"<\|image\|> x \d+", text) and text.count("[[") == 2, text  # the legend and the answer


def t_train_errors(_):
    r = subprocess.run([BIN, "train", "--model", MODEL, "--dataset", DATA, "--out", os.path.join(TMP, "e1"),
                        "--lora-rnak", "8"], capture_output=True)
    assert r.returncode == 2 and b"lora_rnak" in r.stderr, r.stderr
    r = subprocess.run([BIN, "train", "--model", MODEL, "--dataset", DATA, "--out", os.path.join(TMP, "e2"),
                        "--lora-rank", "0"], capture_output=True)
    assert r.returncode == 2 and b"lora_rank" in r.stderr, r.stderr
    bad = os.path.join(TMP, "bad.jsonl")
    lines = open(DATA).read().splitlines()
    lines[1] = lines[1][:-2]
    open(bad, "w").write("\n".join(lines) + "\n")
    r = train(os.path.join(TMP, "e3"), dataset=(bad, IMAGES), expect_rc=1)
    assert r.stderr.count(b"line 2") == 1, r.stderr
    assert not os.path.exists(os.path.join(TMP, "e3", "adapter"))
    # an error wrapped with its context keeps its own words whole (the
    # context was once formatted into the buffer it read from)
    two = json.loads(lines[0])
    two["messages"].append(dict(two["messages"][-1]))
    open(bad, "w").write(json.dumps(two) + "\n")
    r = train(os.path.join(TMP, "e4"), dataset=(bad, IMAGES), expect_rc=1)
    msg = r.stderr.decode().strip().splitlines()[-1]
    assert msg == "gemmaforge train: line 1: two assistant messages in a row: roles must alternate (merge them into one)", msg
    # an image the archive lacks, on the third line: the load fails naming
    # it (the image was once freed before it was ever read: a crash)
    lines = open(DATA).read().splitlines()
    third = json.loads(lines[2])
    for part in third["messages"][0]["content"]:
        if part.get("type") == "image":
            part["image"] = "not-in-the-archive.png"
    lines[2] = json.dumps(third)
    open(bad, "w").write("\n".join(lines) + "\n")
    r = train(os.path.join(TMP, "e6"), dataset=(bad, IMAGES), expect_rc=1)
    msg = r.stderr.decode().strip().splitlines()[-1]
    assert msg == "gemmaforge train: line 3: image 'not-in-the-archive.png' is not in the images archive", msg
    nocfg = os.path.join(TMP, "nocfg")
    os.makedirs(nocfg)
    for f in ("tokenizer.json", "model.safetensors"):
        shutil.copy(os.path.join(MODEL, f), nocfg)
    args = [BIN, "train", "--model", nocfg, "--dataset", DATA, "--images", IMAGES, "--out", os.path.join(TMP, "e5")]
    r = subprocess.run(args, capture_output=True, timeout=3600)  # a hang guard, not a deadline
    msg = r.stderr.decode().strip().splitlines()[-1]
    assert r.returncode == 1 and msg == "gemmaforge train: the model: the model's config.json does not exist", (r.returncode, msg)


def main():
    runner = Runner()
    try:
        for name, fn in [(n, f) for n, f in globals().items() if n.startswith("t_")]:
            runner.run(name, fn, None)
    finally:
        shutil.rmtree(TMP, ignore_errors=True)
    return runner.finish()


if __name__ == "__main__":
    sys.exit(main())
