#!/usr/bin/env python3
"""Faults injected, not hoped for: the server runs under libfiu (fiu-run -x,
Debian's fiu-utils), and while uploads, a fine-tuning job's steps and
checkpoint saves, adapter publishing and merges run, the C library calls
they rest on fail at random (each round one family: write/pwrite,
fsync/fdatasync, rename, open, mmap). Then the faults are switched off and:

- the server is alive and answered every request: 2xx, or an error with its
  JSON body (never a dropped connection);
- nothing is half there (harness.check_store_whole): tmp/ is empty, every
  dataset, adapter and export directory has its row and every row its files;
- restarted, the database passes integrity_check and every write that was
  acknowledged is there, whole; the job is succeeded, failed or paused with
  its reason in words, or trains on, never stuck.

First, without faults: the server loads no library once it listens
(no_late_loads).

usage: faults.py PATH/TO/gemmaforge [--rounds N] [--seed S]
Exit 77 (skipped) without fiu-run.
"""
import argparse
import collections
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "data"))
from harness import Acked, Server, check_store_whole, expect, fixture_bytes  # noqa: E402
import shapes  # noqa: E402

FAMILIES = [("write", ["posix/io/rw/write", "posix/io/rw/pwrite"]),
            ("fsync", ["posix/io/sync/fsync", "posix/io/sync/fdatasync"]),
            ("rename", ["posix/io/dir/rename"]),
            ("open", ["posix/io/oc/open"]),
            ("mmap", ["posix/mm/mmap"])]
JOB_HP = {"epochs": 200, "batch_size": 2, "gradient_accumulation_steps": 1, "learning_rate": 1e-3, "lora_rank": 4,
          "lora_alpha": 8, "save_every": 1, "seed": 3, "quantization": "none"}
ADAPTER = ("dense", "lora_lm", "adapter_init")


def ctrl(srv, base, cmd):
    subprocess.run(["fiu-ctrl", "-f", base, "-c", cmd, str(srv.proc.pid)], check=True, timeout=30)


def operations(srv, rng, n, tag, acked, answers):
    """n random writes; what each got, and what was acknowledged."""
    jsonl, tar, _ = shapes.dataset(12, rng.randint(0, 1 << 30), "img")
    cfg, weights = fixture_bytes(*ADAPTER, "adapter_config.json"), fixture_bytes(*ADAPTER, "adapter_model.safetensors")
    for k in range(n):
        what = rng.random()
        try:
            if what < 0.4:
                r = srv.post_multipart("/v1/datasets", [("file", "d.jsonl", jsonl), ("images", "i.tar", tar)], timeout=60)
                if r.status == 201:
                    acked.datasets[r.json()["id"]] = (len(jsonl), len(tar))
            elif what < 0.8:
                name = "%s-%d" % (tag, k)
                r = srv.post_multipart("/v1/adapters", [("name", name), ("config", "adapter_config.json", cfg),
                                                        ("weights", "adapter_model.safetensors", weights)], timeout=60)
                if r.status == 201:
                    acked.adapters[name] = len(weights)
            elif acked.adapters:
                r = srv.post_json("/v1/adapters/%s/merge" % rng.choice(sorted(acked.adapters)), {}, timeout=60)
                if r.status == 202:
                    acked.exports.add(r.json()["id"])
            else:
                r = srv.get("/v1/datasets", timeout=60)
            if r.status >= 400:
                assert r.json()["error"]["code"], r  # every error has its JSON body
            answers[(r.status, r.code)] += 1
        except AssertionError:
            raise
        except Exception as e:
            raise AssertionError("a request got no answer under faults: %r" % e)


def job_under_faults(srv, job, steps):
    """Leaves the faults on while the job runs `steps` more steps (checkpoint
    saves and all), or until it stops running (a hang guard of 600 s without
    progress: a busy machine trains slower, never wrongly)."""
    seen, until, start = None, time.time() + 600, None
    while time.time() < until:
        try:
            j = srv.get("/v1/fine_tuning/jobs/" + job, timeout=60).json()
        except Exception:
            time.sleep(0.1)  # the database may fail this read under the faults too
            continue
        if "progress" not in j:
            time.sleep(0.1)
            continue
        step = j["progress"]["step"] or 0
        start = step if start is None else start
        if j["status"] != "running" or step >= start + steps:
            return
        if (j["status"], step) != seen:
            seen, until = (j["status"], step), time.time() + 600
        time.sleep(0.05)
    raise AssertionError("the job made no progress for 600 s under the faults")


def job_settles(srv, job):
    """The job is not stuck: it ends, pauses saying why, or keeps training."""
    j = expect(srv.get("/v1/fine_tuning/jobs/" + job), 200).json()
    if j["status"] in ("succeeded", "cancelled"):
        return j["status"]
    if j["status"] == "failed":
        assert j["error"]["code"] and j["error"]["message"], j
        return "failed: " + j["error"]["code"]
    if j["status"] == "paused":
        assert j["status_reason"], j
        return "paused"
    step, until = j["progress"]["step"] or 0, time.time() + 600  # a hang guard: waits on progress
    while time.time() < until:
        k = expect(srv.get("/v1/fine_tuning/jobs/" + job), 200).json()
        if k["status"] not in ("running", "queued"):
            return job_settles(srv, job)
        if (k["progress"]["step"] or 0) > step:
            return "trains on"
        time.sleep(0.1)
    raise AssertionError("the job is stuck at step %s after the faults ended" % step)


def start_job(srv):
    """A dataset uploaded and a job on it that has made its first step."""
    jsonl, tar, _ = shapes.dataset(12, 7, "img")
    ds = expect(srv.post_multipart("/v1/datasets", [("file", "d.jsonl", jsonl), ("images", "i.tar", tar)]), 201).json()["id"]
    job = expect(srv.post_json("/v1/fine_tuning/jobs", {"dataset": ds, "hyperparameters": JOB_HP}), 201).json()["id"]
    until = time.time() + 600  # a hang guard: a busy machine starts slower, never wrongly
    while (expect(srv.get("/v1/fine_tuning/jobs/" + job), 200).json()["progress"]["step"] or 0) < 1:
        assert time.time() < until, "the job never started"
        time.sleep(0.05)
    return ds, job


def no_late_loads(binary):
    """The server loads no library once it listens (glibc's LD_DEBUG=files
    names each one): a dlopen takes the dynamic loader's lock, and mid-flight,
    against libfiu's interposed allocator, that lock once deadlocked the
    whole server (the CUDA runtime loading its driver at a job's start)."""
    data = tempfile.mkdtemp(prefix="gf-loads-")
    trace = os.path.join(data, "ld")
    old = {k: os.environ.get(k) for k in ("LD_DEBUG", "LD_DEBUG_OUTPUT")}
    os.environ.update(LD_DEBUG="files", LD_DEBUG_OUTPUT=trace)
    try:
        srv = Server(binary, data=os.path.join(data, "d"), extra=["--min-examples", "10"])
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    path = "%s.%d" % (trace, srv.proc.pid)

    def loads():
        with open(path, errors="replace") as f:
            return [line.split("file=", 1)[1].strip() for line in f if "dynamically loaded by" in line]
    try:
        at_start = loads()
        start_job(srv)
        expect(srv.get("/metrics"), 200)
        late = loads()[len(at_start):]
        assert not late, "loaded after the server started listening: %s" % late
    finally:
        srv.stop()
        shutil.rmtree(data, ignore_errors=True)


def one_round(binary, family, names, p, rng, n_ops):
    data = tempfile.mkdtemp(prefix="gf-faults-")
    base = os.path.join(data, "fiu")
    acked, answers = Acked(), collections.Counter()
    srv = Server(binary, data=os.path.join(data, "d"), wrap=["fiu-run", "-x", "-f", base],
                 extra=["--min-examples", "10", "--disk-full-wait", "0"])
    try:
        ds, job = start_job(srv)
        jsonl, tar, _ = shapes.dataset(12, 7, "img")  # the bytes start_job uploaded, for the store checks
        acked.datasets[ds] = (len(jsonl), len(tar))
        for name in names:
            ctrl(srv, base, "enable_random name=%s,probability=%g" % (name, p))
        operations(srv, rng, n_ops, family, acked, answers)
        job_under_faults(srv, job, 3)
        for name in names:
            ctrl(srv, base, "disable name=%s" % name)
        assert srv.alive(), "the server died under %s faults" % family
        check_store_whole(srv, acked, "%s faults" % family)
        outcome = job_settles(srv, job)
        srv.stop()
        srv = Server(binary, data=os.path.join(data, "d"), extra=["--min-examples", "10", "--no-train"])
        check_store_whole(srv, acked, "restarted after %s faults" % family)
        return answers, outcome
    finally:
        srv.stop()
        shutil.rmtree(data, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--ops", type=int, default=24)
    ap.add_argument("--probability", type=float, default=0.08)
    ap.add_argument("--seed", type=int, default=int(os.environ.get("GF_TEST_SEED", "0")) or None)
    a = ap.parse_args()
    if not shutil.which("fiu-run"):
        print("SKIPPED: fiu-run (Debian's fiu-utils) is not installed")
        return 77
    seed = a.seed if a.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    print("fault injection: %d rounds of %d families, p=%g, seed %d" % (a.rounds, len(FAMILIES), a.probability, seed))
    failed = 0
    try:
        no_late_loads(a.binary)
        print("ok   no library is loaded once the server listens", flush=True)
    except AssertionError as e:
        failed += 1
        print("FAIL late loads: %s" % e, flush=True)
    for r in range(a.rounds):
        for family, names in FAMILIES:
            try:
                answers, outcome = one_round(a.binary, family, names, a.probability, random.Random(rng.random()), a.ops)
                print("ok   %-7s round %d: %s; job %s" % (family, r, dict(answers), outcome), flush=True)
            except AssertionError as e:
                failed += 1
                print("FAIL %-7s round %d (seed %d): %s" % (family, r, seed, e), flush=True)
    print("faults: %s" % ("ok" if not failed else "%d failed" % failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
