#!/usr/bin/env python3
"""Load at a fixed rate through the real server on loopback, and a soak mode.

usage: load.py PATH/TO/gemmaforge [--rate R] [--duration S] [--adapters N]
               [--sample S] [--warmup S] [--max-growth-mb M] [--max-in-flight N]

Starts the server on the bundled tiny model (no training), uploads N adapters
(random lora_B), then sends chat completions open-loop at R requests/s for S
seconds: round-robin over the base and the adapters, streaming and not, text
and image prompts, 8 tokens each. Every --sample seconds it records the
server's RSS, open file descriptors and threads, and the p50/p99 latency,
completions and errors of the window, as one table row. At most
--max-in-flight requests are open at once, below the server's per-IP
connection limit: when the server answers slower than the offered rate (a
slow or busy machine), sends wait, the wait counts in their latency, and the
run says so instead of failing on connections the limit closes. Fails when any
request fails, when the server dies, or when RSS, descriptors or threads grow
after the warm-up (--warmup seconds) by more than --max-growth-mb (RSS) or at
all (descriptors, threads, at the end of a quiet second).

CI runs it short (tests/CMakeLists.txt: 30 s at 8/s over 4 adapters); the
soak is --duration 3600 --sample 60 (README, "Reliability": the figures).
Standard library only; loopback only; every wait bounded.
"""
import argparse
import json
import os
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "api"))
from harness import Server, data_url, expect, fixture_bytes, png  # noqa: E402
import test_serving  # noqa: E402  (its adapter helpers)

IMAGE = data_url(png(40, 30, pixel=lambda x, y: (30, 90 + x, 200 - y)))


def proc_status(pid):
    out = {}
    for line in open("/proc/%d/status" % pid):
        k, _, v = line.partition(":")
        if k in ("VmRSS", "Threads"):
            out[k] = int(v.split()[0])
    return out["VmRSS"] * 1024, out["Threads"], len(os.listdir("/proc/%d/fd" % pid))


def body_of(model, i):
    content = "Request %d: tell me something short." % i
    if i % 5 == 4:
        content = [{"type": "image_url", "image_url": {"url": IMAGE}}, {"type": "text", "text": "What is this?"}]
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 8,
            "temperature": 0.7, "seed": i, "stream": i % 2 == 1}


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.window, self.errors, self.done, self.total_errors = [], [], 0, 0
        self.in_flight = 0

    def start(self):
        with self.lock:
            self.in_flight += 1

    def busy(self, limit):
        with self.lock:
            return self.in_flight >= limit

    def add(self, latency, error):
        with self.lock:
            self.in_flight -= 1
            self.done += 1
            if error:
                self.errors.append(error)
                self.total_errors += 1
            else:
                self.window.append(latency)

    def take(self):
        with self.lock:
            w, e = sorted(self.window), list(self.errors)
            self.window, self.errors = [], []
        return w, e


def pct(sorted_values, p):
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(p / 100.0 * len(sorted_values)))]


def one(srv, body, stats, t0):
    """t0 is when the request was due, so a send held back counts its wait (no coordinated omission)."""
    try:
        r = srv.post_json("/v1/chat/completions", body, timeout=120)
        ok = r.status == 200 and (b"[DONE]" in r.body if body["stream"] else b'"chat.completion"' in r.body)
        stats.add(time.time() - t0, None if ok else "%d %s" % (r.status, r.body[:120]))
    except Exception as e:  # a connection error is a failed request
        stats.add(time.time() - t0, repr(e))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("--rate", type=float, default=8.0)
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--sample", type=float, default=5.0)
    ap.add_argument("--warmup", type=float, default=10.0)
    ap.add_argument("--max-growth-mb", type=float, default=24.0)
    ap.add_argument("--max-in-flight", type=int, default=48,
                    help="requests open at once; kept below the server's per-IP connection limit (64)")
    a = ap.parse_args()

    srv = Server(a.binary, extra=["--no-train", "--max-seqs", "16", "--max-queue", "256"])
    failed = []
    try:
        test_serving.N_ADAPTERS = a.adapters
        models = ["dense"] + test_serving.setup_adapters(srv)
        stats, threads = Stats(), []
        print("%d models, %.1f requests/s for %.0f s, a sample every %.0f s" % (len(models), a.rate, a.duration, a.sample))
        print("%7s %9s %7s %7s %9s %9s %8s %6s %7s" % ("t_s", "rss_MB", "fds", "threads", "p50_ms", "p99_ms", "done", "errors", "req/s"))
        t0 = time.time()
        next_sample, i, rows, last_done, held = t0 + a.sample, 0, [], 0, 0
        while time.time() - t0 < a.duration:
            due, now = t0 + i / a.rate, time.time()
            if now < due and now < next_sample:
                time.sleep(min(due, next_sample) - now)
                continue
            if now >= due and stats.busy(a.max_in_flight):
                # the server answers slower than the offered rate (a slow or busy machine): more
                # connections from this one client would pass its per-IP limit and be closed unanswered
                time.sleep(0.01)
                held += time.time() - now
            elif now >= due:
                stats.start()
                th = threading.Thread(target=one, args=(srv, body_of(models[i % len(models)], i), stats, due), daemon=True)
                th.start()
                threads.append(th)
                i += 1
            if now >= next_sample:
                w, errs = stats.take()
                rss, nthreads, fds = proc_status(srv.proc.pid)
                t = time.time() - t0
                rows.append((t, rss, fds, nthreads))
                print("%7.0f %9.1f %7d %7d %9.1f %9.1f %8d %6d %7.1f" % (
                    t, rss / 2 ** 20, fds, nthreads, pct(w, 50) * 1e3, pct(w, 99) * 1e3, stats.done, len(errs),
                    (stats.done - last_done) / a.sample), flush=True)
                last_done = stats.done
                for e in errs[:3]:
                    print("    error: %s" % e)
                next_sample += a.sample
                threads = [x for x in threads if x.is_alive()]
        for th in threads:
            th.join(180)
        if any(th.is_alive() for th in threads):
            failed.append("requests still unanswered 180 s after the load ended")
        time.sleep(1.0)  # a quiet second: connections closed, queues empty
        rss, nthreads, fds = proc_status(srv.proc.pid)
        print("after the load: rss %.1f MB, %d fds, %d threads; %d requests, %d failed; %.1f requests/s sent" % (
            rss / 2 ** 20, fds, nthreads, stats.done, stats.total_errors, i / a.duration))
        if held:
            print("note: sends waited %.1f s in all for one of %d open requests to end: the server answered "
                  "slower than %.1f requests/s here (latencies count from when a request was due)" % (
                      held, a.max_in_flight, a.rate))
        if stats.total_errors:
            failed.append("%d of %d requests failed" % (stats.total_errors, stats.done))
        if not srv.alive():
            failed.append("the server died")
        warm = [r for r in rows if r[0] >= a.warmup]
        if warm:
            base_rss, peak = warm[0][1], max(r[1] for r in warm + [(0, rss)])
            if peak - base_rss > a.max_growth_mb * 2 ** 20:
                failed.append("RSS grew by %.1f MB after the warm-up (bound %.0f MB)" % ((peak - base_rss) / 2 ** 20, a.max_growth_mb))
            # idle after the load, the server holds no more descriptors or threads than under it
            if fds > max(r[2] for r in warm):
                failed.append("open descriptors grew to %d (at most %d under load)" % (fds, max(r[2] for r in warm)))
            if nthreads > max(r[3] for r in warm):
                failed.append("threads grew to %d (at most %d under load)" % (nthreads, max(r[3] for r in warm)))
        else:
            failed.append("no sample after the warm-up: make --duration longer than --warmup")
    finally:
        srv.stop()
    for f in failed:
        print("FAIL: " + f)
    print("load: " + ("ok" if not failed else "failed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
