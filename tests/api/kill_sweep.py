#!/usr/bin/env python3
"""kill -9 at random moments, many times, while the server writes: dataset
and adapter uploads, a fine-tuning job's steps and checkpoint saves, merges
publishing their output. After each kill the server restarts on the same
data directory, and then:

- the database passes PRAGMA integrity_check;
- every write the server acknowledged (201, or a 202 export that then
  succeeded) is there, whole: its row, and its files with the bytes sent;
- nothing is half there: no dataset, adapter or export directory without its
  row, nothing left in tmp/, no row whose files are missing;
- no job is left running without the worker taking it up again.
At the end the job runs to success.

usage: kill_sweep.py PATH/TO/gemmaforge [--kills N] [--seed S]
(CI: 50 kills; GF_TEST_SEED or --seed makes the kill times repeatable.)
"""
import argparse
import os
import random
import shutil
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "data"))
from harness import Acked, Server, check_store_whole, expect, fixture_bytes  # noqa: E402
import shapes  # noqa: E402

JOB_HP = {"epochs": 400, "batch_size": 2, "gradient_accumulation_steps": 1, "learning_rate": 1e-3, "lora_rank": 4,
          "lora_alpha": 8, "save_every": 1, "seed": 5, "quantization": "none"}
ADAPTER = ("dense", "lora_lm", "adapter_init")


def writer(srv, acked, stop, rng, n):
    """Uploads and merges until stop is set or the server goes away."""
    jsonl, tar, _ = shapes.dataset(12, rng.randint(0, 1 << 30), "img")
    cfg, weights = fixture_bytes(*ADAPTER, "adapter_config.json"), fixture_bytes(*ADAPTER, "adapter_model.safetensors")
    k = 0
    while not stop.is_set():
        k += 1
        try:
            what = rng.random()
            if what < 0.45:
                r = srv.post_multipart("/v1/datasets", [("file", "d.jsonl", jsonl), ("images", "i.tar", tar)], timeout=30)
                if r.status == 201:
                    with acked.lock:
                        acked.datasets[r.json()["id"]] = (len(jsonl), len(tar))
            elif what < 0.9:
                name = "kill-%d-%d" % (n, k)
                r = srv.post_multipart("/v1/adapters", [("name", name), ("config", "adapter_config.json", cfg),
                                                        ("weights", "adapter_model.safetensors", weights)], timeout=30)
                if r.status == 201:
                    with acked.lock:
                        acked.adapters[name] = len(weights)
            else:
                with acked.lock:
                    names = sorted(acked.adapters)
                if names:
                    r = srv.post_json("/v1/adapters/%s/merge" % rng.choice(names), {}, timeout=30)
                    if r.status == 202:
                        with acked.lock:
                            acked.exports.add(r.json()["id"])
        except Exception:
            return  # the server was killed under this request: not acknowledged


def job_step(srv, job):
    try:
        r = srv.get("/v1/fine_tuning/jobs/" + job, timeout=30)
        return (r.json()["progress"]["step"] or 0) if r.status == 200 else 0
    except Exception:
        return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("--kills", type=int, default=50)
    ap.add_argument("--seed", type=int, default=int(os.environ.get("GF_TEST_SEED", "0")) or None)
    a = ap.parse_args()
    seed = a.seed if a.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    print("kill sweep: %d kills, seed %d" % (a.kills, seed))
    data = tempfile.mkdtemp(prefix="gf-kill-")
    acked = Acked()
    srv = Server(a.binary, data=data, extra=["--min-examples", "10"])
    try:
        ds = expect(srv.post_multipart("/v1/datasets", [("file", "d.jsonl", shapes.dataset(12, 1, "img")[0]),
                                                         ("images", "i.tar", shapes.dataset(12, 1, "img")[1])]), 201).json()["id"]
        job = expect(srv.post_json("/v1/fine_tuning/jobs", {"dataset": ds, "hyperparameters": JOB_HP}), 201).json()["id"]
        t0, steps_seen = time.time(), []
        for n in range(a.kills):
            stop = threading.Event()
            writers = [threading.Thread(target=writer, args=(srv, acked, stop, random.Random(rng.random()), n * 10 + w))
                       for w in range(3)]
            for w in writers:
                w.start()
            if n % 5 == 4:  # every fifth kill lands while the job trains: after its next step, mid-step or mid-save
                step = job_step(srv, job)
                until = time.time() + 600  # a hang guard: waits on progress, not on the clock
                while job_step(srv, job) <= step and time.time() < until:
                    time.sleep(0.05)
                steps_seen.append(job_step(srv, job))
            time.sleep(rng.uniform(0.05, 0.8))
            srv.proc.kill()
            srv.proc.wait()
            stop.set()
            for w in writers:
                w.join(60)
            srv = Server(a.binary, data=data, extra=["--min-examples", "10"])
            check_store_whole(srv, acked, "kill %d" % (n + 1))
        j = expect(srv.get("/v1/fine_tuning/jobs/" + job), 200).json()
        assert j["status"] in ("queued", "running", "succeeded"), j
        assert all(b > a for a, b in zip([0] + steps_seen, steps_seen)) or not steps_seen, \
            "the job did not go on from its checkpoints: steps %s" % steps_seen
        expect(srv.post_json("/v1/fine_tuning/jobs/%s/cancel" % job, {}), 200)
        with acked.lock:
            print("kill sweep: ok: %d kills in %.0f s; %d datasets, %d adapters, %d exports acknowledged and kept; "
                  "%d kills landed while the job trained (at steps %s)" % (a.kills, time.time() - t0, len(acked.datasets),
                                                                    len(acked.adapters), len(acked.exports),
                                                                    len(steps_seen), steps_seen))
        return 0
    except AssertionError as e:
        print("FAIL (seed %d): %s" % (seed, e))
        return 1
    finally:
        srv.stop()
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
