"""Fine-tuning through the real server: jobs trained by the job worker on the
bundled tiny model (CPU), checked against what a user must be able to rely on:

- a QLoRA job on a synthetic image dataset (coloured shapes, the answer is the
  colour) yields a registered adapter whose answers on held-out images are
  right far above chance, while the base model's are not;
- kill -9 of the server at random moments, many times, then a restart, ends
  with the same adapter bytes as an uninterrupted `gemmaforge train` run with
  the same seed, and the job never stays running;
- a job on the served base's quantization shares its weights (one copy on
  /metrics while it runs); another quantization loads a second copy, said so;
- cancel stops a running job within a step; a job that cannot train fails
  with a reason naming what to change; the database agrees afterwards;
- an upload is measured in tokens: a line no job could train is refused at
  upload, a job whose max_seq_len is too short at its creation; an image
  damaged on disk after its upload fails its job naming the line;
- on a full disk (a small tmpfs as the data directory) a job says it waits
  for space, goes on when space is back, pauses saying why, and resumes to
  success once space is freed; deletes work with 0 bytes free.

usage: test_training.py PATH/TO/gemmaforge
"""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "data"))
from harness import FIXTURES, Runner, Server, default_device, expect, metric_lines, wait_export  # noqa: E402
import shapes  # noqa: E402

BIN = sys.argv[1]
MODEL = os.path.join(FIXTURES, "dense")


def upload_shapes(srv, n, seed, prefix="img"):
    j, t, items = shapes.dataset(n, seed, prefix)
    r = expect(srv.post_multipart("/v1/datasets", [("file", "data.jsonl", j), ("images", "images.tar", t)]), 201)
    return r.json()["id"], j, t


def create_job(srv, ds, hp, **extra):
    body = dict(dataset=ds, hyperparameters=hp, **extra)
    return expect(srv.post_json("/v1/fine_tuning/jobs", body), 201).json()["id"]


def wait_job(srv, job, until=("succeeded", "failed", "cancelled"), timeout=600, pred=None):
    """Waits for the job to reach a state; fails only when it made no progress
    (status, step, evaluation) for `timeout` seconds: a slow or busy machine
    (ASan on two cores) trains slower, never wrongly."""
    end, seen = time.time() + timeout, None
    while time.time() < end:
        j = expect(srv.get("/v1/fine_tuning/jobs/" + job), 200).json()
        if j["status"] in until or (pred and pred(j)):
            return j
        now = (j["status"], j["progress"]["step"], j["progress"]["eval_loss"])
        if now != seen:
            seen, end = now, time.time() + timeout
        time.sleep(0.1)
    raise AssertionError("job %s still %s, no progress for %ds" % (job, j["status"], timeout))


def events(srv, job):
    out, after = [], 0
    while True:
        r = expect(srv.get("/v1/fine_tuning/jobs/%s/events?after=%d&limit=100" % (job, after)), 200).json()
        out += r["data"]
        if not r["has_more"]:
            return out
        after = out[-1]["seq"]


def infer(image_path, adapter=None):
    args = [BIN, "infer", "--model", MODEL, "--quantize", "nf4", "--image", image_path,
            "--prompt", shapes.QUESTION, "--max-tokens", "4"]
    if adapter:
        args += ["--adapter", adapter]
    r = subprocess.run(args, capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    return r.stdout.decode().strip()


# ---- the end-to-end test ----------------------------------------------------------

SHAPES_HP = {"epochs": 4, "batch_size": 4, "gradient_accumulation_steps": 1, "learning_rate": 3e-3,
             "lora_rank": 8, "lora_alpha": 16, "warmup_ratio": 0.1, "save_every": 100, "eval_every": 15,
             "quantization": "nf4", "target_modules": "all-linear", "seed": 7, "lora_dropout": 0.05}


def serve_infer(srv, image, adapter=None):
    fields = [("image", "q.png", image), ("prompt", shapes.QUESTION), ("max_tokens", "4")]
    if adapter:
        fields.append(("adapter", adapter))
    r = expect(srv.post_multipart("/v1/infer", fields), 200)
    return r.json()["text"].strip()


def t_shapes_qlora_end_to_end(binary):
    srv = Server(binary, extra=["--quantize", "nf4"])  # served on the NF4 base it was trained on
    tmp = tempfile.mkdtemp(prefix="gf-shapes-")
    try:
        ds, _, _ = upload_shapes(srv, 60, 1)
        val, _, _ = upload_shapes(srv, 12, 2, prefix="val")
        job = create_job(srv, ds, SHAPES_HP, validation_dataset=val, suffix="shapes")
        j = wait_job(srv, job)
        assert j["status"] == "succeeded", j
        p = j["progress"]
        assert p["step"] == p["total_steps"] == 60 and p["epoch"] == 4, p
        assert p["eval_loss"] is not None and p["tokens_per_s"] > 0 and p["eta_s"] == 0, p
        name = j["adapter"]
        assert name and name.startswith("shapes-"), j
        # progress events: every step once, in order; the loss and the validation loss fell
        ev = events(srv, job)
        steps = [e["data"] for e in ev if e["type"] == "metrics" and e["data"] and "loss" in e["data"]]
        assert [s["step"] for s in steps] == list(range(1, 61)), [s["step"] for s in steps]
        first, last = sum(s["loss"] for s in steps[:5]) / 5, sum(s["loss"] for s in steps[-5:]) / 5
        assert last < first / 3, (first, last)
        evals = [e["data"]["eval_loss"] for e in ev if e["data"] and "eval_loss" in e["data"]]
        assert len(evals) == 4 and evals[-1] < evals[0], evals
        assert ev[-1]["type"] == "status" and name in ev[-1]["message"], ev[-1]
        # registered: listed as an adapter and as a model whose parent is the base
        a = expect(srv.get("/v1/adapters/" + name), 200).json()
        assert a["source"] == "trained" and a["job"] == job and a["rank"] == 8 and a["vision"] is True, a
        models = {m["id"]: m for m in expect(srv.get("/v1/models"), 200).json()["data"]}
        assert models[name]["parent"] == "dense", models
        adapter_dir = os.path.join(srv.data, "adapters", name)
        # answers on held-out pictures
        _, _, held = shapes.dataset(12, 99, prefix="held")
        right = base_right = changed = 0
        for i, (colour, data) in enumerate(held):
            path = os.path.join(tmp, "%02d.png" % i)
            open(path, "wb").write(data)
            tuned, base = infer(path, adapter_dir), infer(path)
            right += tuned.split()[:1] == [colour]
            base_right += base.split()[:1] == [colour]
            changed += tuned != base
            # the running server answers the same, with the adapter it took from memory
            assert serve_infer(srv, data, name) == tuned, (i, serve_infer(srv, data, name), tuned)
            assert serve_infer(srv, data) == base, (i, serve_infer(srv, data), base)
        assert right >= 9, "the adapter answered %d of 12 held-out images right (chance: 4)" % right
        assert base_right <= 2, "the base model answered %d of 12 right without training" % base_right
        assert changed >= 9, "the adapter changed only %d of 12 answers" % changed
        text = expect(srv.get("/metrics"), 200).body.decode()
        assert "\ngf_adapter_loads_total 0\n" in text, "the trained adapter was loaded from disk, not taken from memory"
        # trained on the served base, it went live from the trainer's own device slab
        assert "\ngf_adapters_adopted_total 1\n" in text, "the trained adapter was copied, not handed over"
        assert any("handed to serving on the device as trained, without a copy" in e["message"] for e in ev), ev[-5:]
        # merged for deployment, the export says how far it is from what QLoRA trained (NF4 base +
        # adapter), on the job's 4 shortest examples: the figures gemmaforge merge --qlora-check gives
        eid = expect(srv.post_json("/v1/adapters/%s/merge" % name, {"dtype": "f32"}), 202).json()["id"]
        e = wait_export(srv, eid)
        assert e["status"] == "succeeded", e
        gap = e["result"]["qlora_gap"]
        assert gap["examples"] == 4 and gap["rows"] > 0 and 0 < gap["rel_l2"] < 1 and 0 <= gap["top1_agreement"] <= 1, gap
        ds_dir = os.path.join(srv.data, "datasets", ds)
        r = subprocess.run([binary, "merge", "--model", MODEL, "--adapter", adapter_dir, "--out", os.path.join(tmp, "merged"),
                            "--dtype", "f32", "--qlora-check", os.path.join(ds_dir, "data.jsonl"), "--qlora-images",
                            os.path.join(ds_dir, "images.tar")], capture_output=True, timeout=3600)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
        cli = json.loads(r.stdout)["qlora_gap"]
        assert all(abs(cli[k] - gap[k]) <= 1e-6 * max(1.0, abs(gap[k])) for k in gap), (cli, gap)
        c = srv.db()
        row = c.execute("SELECT status, adapter_name, step FROM jobs WHERE id=?", (job,)).fetchone()
        assert row == ("succeeded", name, 60), row
        assert c.execute("SELECT COUNT(*) FROM checkpoints WHERE job_id=?", (job,)).fetchone()[0] == 1
        c.close()
        assert not os.path.exists(os.path.join(srv.data, "jobs", job, "adapter-tmp"))
    finally:
        srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)


# ---- kill -9 and resume -------------------------------------------------------------

RESUME_HP = {"epochs": 2, "batch_size": 2, "gradient_accumulation_steps": 1, "learning_rate": 2e-3,
             "lora_rank": 4, "lora_alpha": 8, "save_every": 2, "seed": 11, "warmup_ratio": 0.1, "lora_dropout": 0.1}


def reference_adapter(jsonl, tar, hp, tmp):
    """The adapter of an uninterrupted run of `gemmaforge train`."""
    open(os.path.join(tmp, "d.jsonl"), "wb").write(jsonl)
    open(os.path.join(tmp, "d.tar"), "wb").write(tar)
    args = [BIN, "train", "--model", MODEL, "--dataset", os.path.join(tmp, "d.jsonl"), "--images",
            os.path.join(tmp, "d.tar"), "--out", os.path.join(tmp, "ref")]
    for k, v in hp.items():
        args += ["--" + k.replace("_", "-"), str(v)]
    r = subprocess.run(args, capture_output=True, timeout=3600)  # a hang guard, not a deadline
    assert r.returncode == 0, r.stderr.decode()
    return open(os.path.join(tmp, "ref", "adapter", "adapter_model.safetensors"), "rb").read()


def t_kill9_resume_same_adapter(binary):
    rng = random.Random(int(os.environ.get("GF_TEST_SEED", "0")) or None)
    tmp = tempfile.mkdtemp(prefix="gf-resume-")
    srv = Server(binary)
    data = srv.data
    kills = 0
    try:
        ds, jsonl, tar = upload_shapes(srv, 16, 5)
        want = reference_adapter(jsonl, tar, RESUME_HP, tmp)
        job = create_job(srv, ds, RESUME_HP)
        total = 16
        for _ in range(6):
            target = rng.randint(0, total - 4)  # leave time to land the kill before the job ends
            j = wait_job(srv, job, timeout=300, pred=lambda j: j["status"] == "running" and (j["progress"]["step"] or 0) >= target)
            if j["status"] != "running":
                break
            time.sleep(rng.uniform(0, 0.3))
            srv.proc.kill()
            srv.proc.wait()
            kills += 1
            srv = Server(binary, data=data)
        j = wait_job(srv, job)
        assert j["status"] == "succeeded", j
        assert kills >= 3, "only %d kills landed while the job ran" % kills
        got = open(os.path.join(data, "adapters", j["adapter"], "adapter_model.safetensors"), "rb").read()
        assert got == want, "the resumed job's adapter differs from an uninterrupted run's"
        ev = events(srv, job)
        resumed = sum(e["message"] == "Job resumed after an interruption" for e in ev)
        assert resumed >= 1 and resumed <= kills, (resumed, kills)
        c = srv.db()
        assert c.execute("SELECT COUNT(*) FROM jobs WHERE status='running'").fetchone()[0] == 0
        steps = [s for (s,) in c.execute("SELECT step FROM checkpoints WHERE job_id=? ORDER BY step", (job,))]
        assert steps == [total - 4, total - 2, total], steps  # the newest three are kept
        kept = sorted(os.listdir(os.path.join(data, "jobs", job, "checkpoints")))
        assert kept == ["step-%08d" % s for s in steps], kept
        c.close()
    finally:
        srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)


# ---- cancel and failure ---------------------------------------------------------------

def t_cancel_running_job(binary):
    srv = Server(binary)
    try:
        ds, _, _ = upload_shapes(srv, 12, 3)
        job = create_job(srv, ds, {"epochs": 50, "batch_size": 2, "gradient_accumulation_steps": 1, "save_every": 1000})
        wait_job(srv, job, pred=lambda j: (j["progress"]["step"] or 0) >= 1)
        at_cancel = expect(srv.post_json("/v1/fine_tuning/jobs/%s/cancel" % job, {}), 200).json()["progress"]["step"]
        t0 = time.time()
        j = wait_job(srv, job, timeout=600)
        # the worker stops at the next step boundary: at most one step later,
        # however slow a step is on this machine (a wall-clock bound failed
        # under ASan on a busy 2-core machine)
        assert j["status"] == "cancelled" and j["progress"]["step"] <= at_cancel + 1, (at_cancel, j)
        print("    cancelled %.1f s after the request, at step %d (asked at step %d)" % (
            time.time() - t0, j["progress"]["step"], at_cancel))
        assert j["adapter"] is None and j["error"] is None, j
        step = j["progress"]["step"]
        time.sleep(1)
        assert expect(srv.get("/v1/fine_tuning/jobs/" + job), 200).json()["progress"]["step"] == step
        assert expect(srv.get("/v1/adapters"), 200).json()["data"] == []
        expect(srv.request("DELETE", "/v1/datasets/" + ds), 200)
    finally:
        srv.stop()


def base_weights(srv):
    """(copies, bytes) of base weights resident, from /metrics."""
    text = expect(srv.get("/metrics"), 200).body.decode()
    val = {}
    for line in text.splitlines():
        for name in ("gf_base_weights_copies", "gf_base_weights_resident_bytes"):
            if line.startswith(name + '{device="cpu0"} '):
                val[name] = int(line.split()[-1])
    return val["gf_base_weights_copies"], val["gf_base_weights_resident_bytes"]


def fit_resident_bytes(srv):
    """The base bytes a job's fit check counts against --device-memory: the
    host copies on the CPU kinds, the device copies on a GPU."""
    if not expect(srv.get("/readyz"), 200).json()["model"]["device"].startswith("cuda"):
        return base_weights(srv)[1]
    text = expect(srv.get("/metrics"), 200).body.decode()
    return int([l for l in text.splitlines() if l.startswith("gf_base_weights_device_bytes ")][0].split()[1])


def device_copies(srv):
    """Copies of the base weights on devices other than the CPU, from /metrics."""
    text = expect(srv.get("/metrics"), 200).body.decode()
    return int([l for l in text.splitlines() if l.startswith("gf_base_weights_device_copies ")][0].split()[1])


def t_jobs_share_the_served_base(binary):
    """A job whose quantization matches the served base trains on that copy of
    the weights: /metrics counts one copy while it runs, and answers stay
    those of the base. A job asking for NF4 on a full-precision base loads a
    second copy, says so with its size, and drops it when it ends."""
    srv = Server(binary)
    try:
        copies, base_bytes = base_weights(srv)
        assert copies == 1 and base_bytes > 0, (copies, base_bytes)
        ds, _, _ = upload_shapes(srv, 12, 5)
        long_run = {"epochs": 50, "batch_size": 2, "gradient_accumulation_steps": 1, "save_every": 1000}
        job = create_job(srv, ds, dict(long_run, quantization="none"))
        wait_job(srv, job, pred=lambda j: (j["progress"]["step"] or 0) >= 2)
        running = base_weights(srv)
        assert running == (1, base_bytes), (running, base_bytes, events(srv, job))
        # on a device (the guarded backend in CI, a GPU) the job reads the served copy there too
        on_device = 0 if expect(srv.get("/readyz"), 200).json()["model"]["device"] == "cpu" else 1
        assert device_copies(srv) == on_device, device_copies(srv)
        shared = [e["message"] for e in events(srv, job) if "base weights" in e["message"]]
        assert len(shared) == 1 and "running on the served base weights (full-precision" in shared[0], shared
        # the serving engine answers on the same weights while the job trains
        r = expect(srv.post_json("/v1/chat/completions", {"model": "dense", "max_tokens": 4,
                                                          "messages": [{"role": "user", "content": "hi"}]}), 200)
        assert r.json()["usage"]["completion_tokens"] >= 1
        assert expect(srv.get("/v1/fine_tuning/jobs/" + job), 200).json()["status"] == "running"
        expect(srv.post_json("/v1/fine_tuning/jobs/%s/cancel" % job, {}), 200)
        assert wait_job(srv, job, timeout=120)["status"] == "cancelled"
        assert base_weights(srv) == (1, base_bytes)

        job = create_job(srv, ds, dict(long_run, quantization="nf4"))
        wait_job(srv, job, pred=lambda j: (j["progress"]["step"] or 0) >= 2)
        copies, both = base_weights(srv)
        assert device_copies(srv) == 2 * on_device, device_copies(srv)  # its own weights, its own device copy
        second = [e["message"] for e in events(srv, job) if "base weights" in e["message"]]
        assert len(second) == 1 and "loaded a second copy of the base weights (NF4, " in second[0], second
        mb = float(second[0].split("(NF4, ")[1].split(" MB")[0])
        assert copies == 2 and abs((both - base_bytes) / 1e6 - mb) <= 0.05 and 0 < both - base_bytes < base_bytes, \
            (copies, both, base_bytes, second)
        expect(srv.post_json("/v1/fine_tuning/jobs/%s/cancel" % job, {}), 200)
        assert wait_job(srv, job, timeout=120)["status"] == "cancelled"
        assert base_weights(srv) == (1, base_bytes) and device_copies(srv) == on_device
    finally:
        srv.stop()


def t_job_and_requests_share_the_device(binary):
    """A job trains while streaming clients (16 on a GPU, 8 elsewhere) are
    served on the same device taking turns (--device-sched on, the CPU's
    default being off; --decode-wait-ms 0: training gives way at its next
    layer boundary): every answer equals the one the same request got
    before the job started, serving steps found the job on the device and
    it gave way to them, and the job trains on (it is not starved)."""
    device = os.environ.get("GF_DEVICE") or default_device(binary)
    n_clients = 16 if device.startswith("cuda") else 8
    srv = Server(binary, extra=["--device-sched", "on", "--decode-wait-ms", "0"])
    try:
        def body(i):
            return {"model": "dense", "max_tokens": 16, "stream": True, "seed": 50 + i,
                    "temperature": 0.8 if i % 2 else 0.0,
                    "messages": [{"role": "user", "content": "Describe shape %d in a few words." % i}]}

        def answer(i):
            r = expect(srv.post_json("/v1/chat/completions", body(i), timeout=600), 200)
            chunks = [json.loads(x[6:]) for x in r.body.decode().split("\n\n") if x.startswith("data: {")]
            return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])

        alone = {i: answer(i) for i in range(n_clients)}
        ds, _, _ = upload_shapes(srv, 12, 7)
        job = create_job(srv, ds, {"epochs": 50, "batch_size": 2, "gradient_accumulation_steps": 1,
                                   "save_every": 1000, "quantization": "none"})
        step0 = wait_job(srv, job, pred=lambda j: (j["progress"]["step"] or 0) >= 1)["progress"]["step"]
        results, errors = {}, []

        def client(i):
            try:
                for _ in range(2):
                    got = answer(i)
                    if got != alone[i]:
                        errors.append((i, got, alone[i]))
                results[i] = True
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append((i, repr(e)))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(n_clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors and len(results) == n_clients, errors
        m = metric_lines(srv)
        assert m["gf_device_serving_wait_bound_seconds"] == 0, m
        assert m['gf_device_serving_steps_total{waited="yes"}'] > 0, m
        assert m["gf_device_training_yields_total"] > 0, m
        assert m["gf_device_training_span_max_seconds"] > 0, m
        assert m['gf_device_busy_seconds_total{user="training"}'] > 0, m
        assert m['gf_device_busy_seconds_total{user="serving"}'] > 0, m
        shared = [e["message"] for e in events(srv, job) if e["message"].startswith("device:")]
        assert len(shared) == 1 and "shared with serving" in shared[0], shared
        j = wait_job(srv, job, pred=lambda j: (j["progress"]["step"] or 0) >= step0 + 2)
        assert j["status"] == "running", j
        expect(srv.post_json("/v1/fine_tuning/jobs/%s/cancel" % job, {}), 200)
        assert wait_job(srv, job, timeout=120)["status"] == "cancelled"
    finally:
        srv.stop()


def t_job_must_fit_its_device(binary):
    """A job checks, before loading anything, that it fits the device within
    --device-memory: with room for its training on the shared base but not
    for a second copy, a job on the served quantization trains, and one that
    would load an NF4 copy fails at once naming the sizes and the way out,
    with no second copy ever resident."""
    hp = {"epochs": 50, "batch_size": 2, "gradient_accumulation_steps": 1, "save_every": 1000, "max_seq_len": 512}
    srv = Server(binary)
    try:
        _, base_bytes = base_weights(srv)
        resident = fit_resident_bytes(srv)
        est = {q: expect(srv.post_json("/v1/fine_tuning/preflight", {"hyperparameters": dict(hp, quantization=q)}),
                         200).json()["memory_bytes"] for q in ("none", "nf4")}
    finally:
        srv.stop()
    share_need = est["none"]["total"] - est["none"]["base_weights"]
    second_need = est["nf4"]["total"]
    assert 0 < share_need < second_need, est
    limit = resident + (share_need + second_need) // 2
    srv = Server(binary, extra=["--device-memory", str(limit)])
    try:
        for q, fits, need in (("none", True, share_need), ("nf4", False, second_need)):
            d = expect(srv.post_json("/v1/fine_tuning/preflight", {"hyperparameters": dict(hp, quantization=q)}),
                       200).json()["device"]
            assert d["fits"] is fits and d["needed_bytes"] == need and d["free_bytes"] == limit - resident, (q, d)
            assert d["shares_served_base"] is (q == "none") and d["name"] in ("cpu", "guarded", "cuda:0"), d
            assert d["precision"] == "fp32", d  # the CPU kinds', and the GPU tests' (on_cuda.sh)
        ds, _, _ = upload_shapes(srv, 12, 6)
        job = create_job(srv, ds, dict(hp, quantization="nf4"))
        j = wait_job(srv, job, timeout=120)
        assert j["status"] == "failed" and j["error"]["code"] == "out_of_memory", j
        assert j["error"]["param"] == "hyperparameters.quantization", j
        msg = j["error"]["message"]
        assert "a second copy of the base (NF4, %.1f MB)" % (est["nf4"]["base_weights"] / 1e6) in msg, (msg, est)
        assert "%.1f MB are free" % ((limit - resident) / 1e6) in msg and 'quantization "none"' in msg, (msg, limit)
        assert not [e for e in events(srv, job) if "second copy" in e["message"] and "loaded" in e["message"]]
        assert base_weights(srv) == (1, base_bytes)

        job = create_job(srv, ds, dict(hp, quantization="none"))
        wait_job(srv, job, pred=lambda j: (j["progress"]["step"] or 0) >= 1)
        fit = [e["message"] for e in events(srv, job) if e["message"].startswith("memory:")]
        assert len(fit) == 1 and "needs %.1f MB" % (share_need / 1e6) in fit[0], (fit, share_need)
        expect(srv.post_json("/v1/fine_tuning/jobs/%s/cancel" % job, {}), 200)
        assert wait_job(srv, job, timeout=120)["status"] == "cancelled"
    finally:
        srv.stop()


def t_failed_jobs_say_why(binary):
    """A dataset uploaded while no model was loaded is not measured: its job
    is accepted, and fails at its start naming the line."""
    data = tempfile.mkdtemp(prefix="gf-api-")
    srv = Server(binary, model=False, data=data)
    try:
        ds, _, _ = upload_shapes(srv, 12, 4)
        assert expect(srv.get("/v1/datasets/" + ds), 200).json()["tokens"] is None
    finally:
        srv.stop()
    srv = Server(binary, data=data)
    try:
        job = create_job(srv, ds, {"max_seq_len": 16})
        j = wait_job(srv, job, timeout=120)
        assert j["status"] == "failed" and j["error"]["code"] == "sequence_too_long", j
        assert j["error"]["param"] == "hyperparameters.max_seq_len", j
        msg = j["error"]["message"]
        assert "line" in msg and "max_seq_len 16" in msg and "tokens" in msg, msg
        c = srv.db()
        assert c.execute("SELECT COUNT(*) FROM adapters").fetchone()[0] == 0
        assert c.execute("SELECT COUNT(*) FROM jobs WHERE status IN ('running','queued')").fetchone()[0] == 0
        c.close()
    finally:
        srv.stop()
        shutil.rmtree(data, ignore_errors=True)


def damage_image_data(tar_path, member):
    """Overwrites the compressed pixels of PNG `member` inside the tar in
    place: its headers (and the archive) stay whole, its data no longer
    inflates."""
    import tarfile
    with tarfile.open(tar_path) as t:
        info = t.getmember(member)
        data = t.extractfile(info).read()
    at = data.index(b"IDAT") + 4  # the chunk's data, after its length and type
    os.chmod(tar_path, 0o644)
    with open(tar_path, "r+b") as f:
        f.seek(info.offset_data + at)
        f.write(b"\xff" * 16)


def t_damaged_image_fails_its_job(binary):
    """A job encodes an uploaded set reading each image's size from its
    headers (the upload decoded every image): an image damaged on disk past
    its headers after the upload fails the job when its example is loaded,
    naming the line, and the server goes on serving."""
    data = tempfile.mkdtemp(prefix="gf-api-")
    srv = Server(binary, data=data)
    try:
        ds, jsonl, _ = upload_shapes(srv, 12, 4)
        lines = jsonl.decode().splitlines()
        line = next(i + 1 for i, l in enumerate(lines) if "img/0005.png" in l)
        damage_image_data(os.path.join(data, "datasets", ds, "images.tar"), "img/0005.png")
        job = create_job(srv, ds, {"epochs": 1, "batch_size": 1})
        j = wait_job(srv, job, timeout=300)
        assert j["status"] == "failed", j
        msg = j["error"]["message"]
        assert ("line %d: image 'img/0005.png': invalid PNG" % line) in msg, msg
        ev = events(srv, job)
        assert any("training set: 12 examples" in e["message"] for e in ev), ev
        c = srv.db()
        assert c.execute("SELECT COUNT(*) FROM adapters").fetchone()[0] == 0
        c.close()
        expect(srv.post_json("/v1/chat/completions", {"model": "dense", "max_tokens": 2,
                                                      "messages": [{"role": "user", "content": "hi"}]}), 200)
    finally:
        srv.stop()
        shutil.rmtree(data, ignore_errors=True)


def conversation(words):
    """One text-only example whose user turn is `words` words long."""
    return json.dumps({"messages": [{"role": "user", "content": " ".join(["colour"] * words)},
                                    {"role": "assistant", "content": "red"}]}).encode()


def t_dataset_lengths_checked_at_upload(binary):
    """An upload is measured in tokens for the served model: a line longer
    than a job can ever train (the model's context) is refused with the
    others, and a job whose max_seq_len is shorter than an example is refused
    when it is created, naming the line, rather than failing at its start.
    The upload's counts are the job's own (its "training set" event)."""
    context = json.load(open(os.path.join(MODEL, "config.json")))["text_config"]["max_position_embeddings"]
    srv = Server(binary)
    try:
        ds, j, t = upload_shapes(srv, 12, 4)
        tok = expect(srv.get("/v1/datasets/" + ds), 200).json()["tokens"]
        assert tok["model"] == "dense" and 0 < tok["longest"] < tok["total"], tok
        assert 1 <= tok["longest_line"] <= 12, tok

        # a validation set whose third line is the longest of all
        lines = [conversation(5) for _ in range(12)]
        lines[2] = conversation(3 * tok["longest"])
        vds = expect(srv.post_multipart("/v1/datasets", [("file", "v.jsonl", b"\n".join(lines))]), 201).json()["id"]
        vtok = expect(srv.get("/v1/datasets/" + vds), 200).json()["tokens"]
        assert vtok["longest_line"] == 3 and vtok["longest"] > tok["longest"], vtok

        for hp, extra, where, line, n in [({"max_seq_len": tok["longest"] - 1}, {}, "training_file", tok["longest_line"], tok["longest"]),
                                          ({"max_seq_len": tok["longest"]}, {"validation_dataset": vds}, "validation_file", 3, vtok["longest"])]:
            r = expect(srv.post_json("/v1/fine_tuning/jobs", dict(dataset=ds, hyperparameters=hp, **extra)), 400).json()["error"]
            assert r["code"] == "sequence_too_long" and r["param"] == "hyperparameters.max_seq_len", r
            assert ("line %d of %s" % (line, where)) in r["message"] and ("is %d tokens" % n) in r["message"], r
            assert ("max_seq_len %d" % hp["max_seq_len"]) in r["message"], r
        c = srv.db()
        assert c.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 0
        c.close()

        job = create_job(srv, ds, {"max_seq_len": tok["longest"], "epochs": 50, "save_every": 1000})
        wait_job(srv, job, pred=lambda x: (x["progress"]["step"] or 0) >= 1)
        seen = [e["message"] for e in events(srv, job) if e["message"].startswith("training set:")]
        assert seen == ["training set: 12 examples, %d tokens, " % tok["total"] + seen[0].split(" tokens, ", 1)[1]], seen
        assert seen[0].endswith("longest %d" % tok["longest"]), seen
        expect(srv.post_json("/v1/fine_tuning/jobs/%s/cancel" % job, {}), 200)
        wait_job(srv, job)

        # a line over the model's context: refused with its line, nothing stored
        before = len(expect(srv.get("/v1/datasets"), 200).json()["data"])
        bad = j.rstrip(b"\n").split(b"\n")
        bad.insert(4, conversation(context + 10))
        r = expect(srv.post_multipart("/v1/datasets", [("file", "d.jsonl", b"\n".join(bad)), ("images", "i.tar", t)]), 422)
        details = r.json()["error"]["details"]
        assert [(d["line"], d["code"]) for d in details] == [(5, "sequence_too_long")], details
        assert ("over the %d" % context) in details[0]["message"], details
        assert len(expect(srv.get("/v1/datasets"), 200).json()["data"]) == before
        until = time.time() + 60  # the upload's spooled parts go in its completion callback, after the answer
        while srv.tmp_entries() and time.time() < until:
            time.sleep(0.05)
        assert not srv.tmp_entries(), srv.tmp_entries()
    finally:
        srv.stop()


def fill_disk(path):
    """Writes path until the filesystem under it is full; returns its size."""
    with open(path, "ab") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as e:
            assert e.errno == 28, e  # ENOSPC
    os.sync()
    return os.path.getsize(path)


def t_disk_full_job_waits_pauses_and_resumes(binary):
    mnt = tempfile.mkdtemp(prefix="gf-disk-")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", mnt], stderr=subprocess.DEVNULL).returncode:
        os.rmdir(mnt)
        print("  SKIPPED: mounting a small tmpfs as the full disk needs root")
        return
    srv = None
    try:
        srv = Server(binary, data=os.path.join(mnt, "data"), extra=["--disk-full-wait", "3600"])
        ds, _, _ = upload_shapes(srv, 12, 3)
        spare, _, _ = upload_shapes(srv, 12, 5)
        job = create_job(srv, ds, {"epochs": 4, "batch_size": 2, "gradient_accumulation_steps": 1, "save_every": 2})
        wait_job(srv, job, pred=lambda j: (j["progress"]["step"] or 0) >= 1)
        filler = os.path.join(mnt, "filler")

        # full: the job says it waits; space back: it says so and goes on
        fill_disk(filler)
        j = wait_job(srv, job, pred=lambda j: j["status_reason"])
        assert j["status"] == "running" and j["status_reason"].startswith("Waiting for disk space: the checkpoint of step"), j
        assert any(e["level"] == "warn" and e["message"] == j["status_reason"] for e in events(srv, job))
        step = j["progress"]["step"]
        time.sleep(1)
        assert expect(srv.get("/v1/fine_tuning/jobs/" + job), 200).json()["progress"]["step"] == step, "trained on unsaved"
        os.remove(filler)
        j = wait_job(srv, job, pred=lambda j: not j["status_reason"] and (j["progress"]["step"] or 0) > step)
        assert any(e["message"].startswith("Disk space is back") for e in events(srv, job))

        # full again: waiting, then paused (here asked while it waits) with the reason in words
        fill_disk(filler)
        wait_job(srv, job, pred=lambda j: j["status_reason"])
        expect(srv.post_json("/v1/fine_tuning/jobs/%s/pause" % job, {}), 200)
        j = wait_job(srv, job, until=("paused", "succeeded", "failed", "cancelled"))
        assert j["status"] == "paused" and j["error"] is None, j
        assert j["status_reason"].startswith("The data disk stayed full") and "resume" in j["status_reason"], j

        # deletes free space through the API with 0 bytes free
        fill_disk(filler)
        assert os.statvfs(mnt).f_bavail == 0
        expect(srv.request("DELETE", "/v1/datasets/" + spare), 200)
        c = srv.db()
        assert c.execute("SELECT COUNT(*) FROM datasets WHERE id=?", (spare,)).fetchone()[0] == 0
        c.close()
        assert not os.path.exists(os.path.join(mnt, "data", "datasets", spare))

        # space freed: resumed, it finishes and its adapter is served
        os.remove(filler)
        expect(srv.post_json("/v1/fine_tuning/jobs/%s/resume" % job, {}), 200)
        j = wait_job(srv, job)
        assert j["status"] == "succeeded" and j["status_reason"] is None and j["adapter"], j
        expect(srv.post_json("/v1/chat/completions", {"model": j["adapter"], "max_tokens": 2,
                                                      "messages": [{"role": "user", "content": "hi"}]}), 200)
    finally:
        if srv:
            srv.stop()
        subprocess.run(["umount", mnt])
        os.rmdir(mnt)


def main():
    runner = Runner()
    for name, fn in [(n, f) for n, f in globals().items() if n.startswith("t_")]:
        runner.run(name, fn, BIN)
    return runner.finish()


if __name__ == "__main__":
    sys.exit(main())
