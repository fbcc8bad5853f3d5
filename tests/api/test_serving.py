#!/usr/bin/env python3
"""Serving through the real server on loopback: chat completions and /v1/infer
over the base model and many adapters at once.

usage: test_serving.py PATH/TO/gemmaforge

- 32 concurrent clients over the base and 8 uploaded adapters, text and image
  prompts, streaming and not, sampling with seeds: every answer equals the
  same request sent alone (same seed, same output), whatever else shared the
  batch.
- A full queue answers 429 with Retry-After; a client that hangs up in the
  middle of a stream frees its slot and its KV blocks; queued clients that
  hang up leave the queue at once; a client that half-closes after its
  request still gets its whole answer.
- An adapter that would change nothing, or whose keys name modules the model
  does not have, is refused with an error naming the problem; an adapter whose
  file is damaged on disk fails its own requests only; an adapter changes the
  answer; a deleted adapter is no longer served.
- The vision tower's output is cached per image and adapter content: hits
  for repeated images, misses for a replaced adapter, answers unchanged.
- Images are decoded off the HTTP threads: while large images decode and
  zip-bomb PNGs are refused, /healthz keeps answering at once.
- Bad requests get the documented errors (remote image URLs, unknown models,
  out-of-range parameters, prompts too long for the context).
"""
import http.client
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import KEY, Runner, Server, data_url, default_device, expect, fixture_bytes, metric_lines, multipart, png  # noqa: E402

BIN = sys.argv[1] if len(sys.argv) > 1 else None
N_ADAPTERS = 8


# ---- adapters --------------------------------------------------------------------

def read_st(data):
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    return header, data[8 + n:]


def with_random_b(data, seed, scale=0.3):
    """adapter_init's safetensors with every lora_B replaced by random values."""
    header, blob = read_st(data)
    blob = bytearray(blob)
    rng = random.Random(seed)
    for name, meta in header.items():
        if name == "__metadata__" or "lora_B" not in name:
            continue
        assert meta["dtype"] == "F32", meta
        lo, hi = meta["data_offsets"]
        count = (hi - lo) // 4
        blob[lo:hi] = struct.pack("<%df" % count, *[rng.uniform(-scale, scale) for _ in range(count)])
    return data[:8 + struct.unpack("<Q", data[:8])[0]] + bytes(blob)


def with_zero_b(data):
    header, blob = read_st(data)
    blob = bytearray(blob)
    for name, meta in header.items():
        if name != "__metadata__" and "lora_B" in name:
            lo, hi = meta["data_offsets"]
            blob[lo:hi] = bytes(hi - lo)
    return data[:8 + struct.unpack("<Q", data[:8])[0]] + bytes(blob)


def renamed(data, old, new):
    """The same tensors under other module names (same lengths keep offsets valid)."""
    n = struct.unpack("<Q", data[:8])[0]
    header = data[8:8 + n].replace(old.encode(), new.encode())
    assert len(header) == n
    return data[:8] + header + data[8 + n:]


def upload(srv, name, cfg, weights):
    return srv.post_multipart("/v1/adapters", [("name", name), ("config", "adapter_config.json", cfg),
                                                ("weights", "adapter_model.safetensors", weights)])


def setup_adapters(srv):
    names = []
    for i in range(N_ADAPTERS):
        kind = "lora_all" if i % 2 else "lora_lm"
        d = ("dense", kind, "adapter_init")
        cfg, w = fixture_bytes(*d, "adapter_config.json"), fixture_bytes(*d, "adapter_model.safetensors")
        name = "ad-%d" % i
        expect(upload(srv, name, cfg, with_random_b(w, 100 + i)), 201)
        names.append(name)
    return names


# ---- requests ------------------------------------------------------------------------

IMAGE = data_url(png(48, 32, pixel=lambda x, y: (200, 40 + x, 30 + y)))


def chat_body(model, i, stream):
    content = "Tell me about number %d and the colour of the sea." % i
    if i % 4 == 3:
        content = [{"type": "image_url", "image_url": {"url": IMAGE}}, {"type": "text", "text": "What is this? %d" % i}]
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 6 + i % 5,
            "temperature": 0.9 if i % 2 else 0.0, "top_k": 40, "top_p": 0.95, "seed": 1000 + i, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def sse_events(body):
    """The JSON events of an SSE body; asserts it ends with [DONE]."""
    events = [line[6:] for line in body.decode().split("\n\n") if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", body[-200:]
    return [json.loads(e) for e in events[:-1]]


def answer_of(resp, stream):
    """(text, finish_reason, usage) of a chat completion response."""
    assert resp.status == 200, resp
    if not stream:
        j = resp.json()
        assert j["object"] == "chat.completion" and j["choices"][0]["message"]["role"] == "assistant", j
        return j["choices"][0]["message"]["content"], j["choices"][0]["finish_reason"], j["usage"]
    assert resp.headers["content-type"].startswith("text/event-stream"), resp.headers
    ev = sse_events(resp.body)
    assert ev[0]["choices"][0]["delta"] == {"role": "assistant"}, ev[0]
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in ev if e["choices"])
    finish = [e["choices"][0]["finish_reason"] for e in ev if e["choices"] and e["choices"][0]["finish_reason"]]
    assert len(finish) == 1, ev[-2:]
    usage = ev[-1]["usage"] if not ev[-1]["choices"] else None  # only with stream_options.include_usage
    return text, finish[0], usage


def t_concurrent_clients_match_alone(srv):
    names = srv.adapter_names
    models = ["dense"] + names
    jobs = [(models[i % len(models)], i, i % 2 == 1) for i in range(32)]
    alone = {}
    for model, i, _ in jobs:
        alone[i] = answer_of(srv.post_json("/v1/chat/completions", chat_body(model, i, False), timeout=120), False)
    results, errors = {}, []

    def client(model, i, stream):
        try:
            results[i] = answer_of(srv.post_json("/v1/chat/completions", chat_body(model, i, stream), timeout=300), stream)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append((i, repr(e)))

    threads = [threading.Thread(target=client, args=j) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for model, i, stream in jobs:
        got, want = results[i], alone[i]
        assert got[0] == want[0] and got[1] == want[1], (model, i, stream, got, want)
        assert got[2]["completion_tokens"] == want[2]["completion_tokens"] > 0, (got, want)
        assert got[2]["prompt_tokens"] == want[2]["prompt_tokens"], (got, want)
    # the adapters changed the answers: greedy requests differ from the base model's
    base = {i: alone[i][0] for model, i, _ in jobs if model == "dense"}
    same = sum(alone[i][0] == chat_prompt_base(srv, i) for model, i, _ in jobs if model != "dense")
    assert same <= 4, "%d of 29 adapter answers equal the base model's" % same
    assert base, base
    # the engine's gauges follow at the end of its step: give it that long
    assert wait_metric(srv, "gf_inference_running", 0) and wait_metric(srv, "gf_kv_blocks_used", 0)
    loads, evictions = metric(srv, "gf_adapter_loads_total"), metric(srv, "gf_adapter_evictions_total")
    assert loads >= N_ADAPTERS and evictions >= N_ADAPTERS - 4, (loads, evictions)  # 4 resident at most when idle
    # decode steps went through graphs exactly where the backend records them
    # (the guarded backend in CI, CUDA on a GPU unless GF_CUDA_GRAPHS=0)
    text = expect(srv.get("/metrics"), 200).body.decode()
    steps = {how: float(text.split('\ngf_decode_graph_steps_total{how="%s"} ' % how)[1].split()[0])
             for how in ("recorded", "replayed", "resubmitted")}
    device = os.environ.get("GF_DEVICE") or default_device(srv.binary)
    records = device == "guarded" or (device.startswith("cuda") and os.environ.get("GF_CUDA_GRAPHS") != "0")
    assert (sum(steps.values()) > 0) == records, (steps, device)
    # and were padded to their bucket of rows for it; none where nothing records
    # (on CUDA with graphs off, a context pads its first decode step, before
    # the backend has said that graphs are off)
    padded = metric(srv, "gf_decode_steps_padded_total")
    assert padded > 0 if records else (device.startswith("cuda") or padded == 0), (padded, device)


_base_cache = {}


def chat_prompt_base(srv, i):
    """The base model's answer to request i's prompt (same settings)."""
    if i not in _base_cache:
        _base_cache[i] = answer_of(srv.post_json("/v1/chat/completions", chat_body("dense", i, False)), False)[0]
    return _base_cache[i]


def t_same_seed_same_output(srv):
    body = chat_body(srv.adapter_names[1], 1, False)
    body["max_tokens"] = 12
    a = answer_of(srv.post_json("/v1/chat/completions", body), False)
    b = answer_of(srv.post_json("/v1/chat/completions", body), False)
    body["seed"] += 1
    c = answer_of(srv.post_json("/v1/chat/completions", body), False)
    assert a == b, (a, b)
    assert c[0] != a[0], "another seed gave the same 12 sampled tokens: %r" % (a,)


def t_stop_and_length(srv):
    body = {"model": "dense", "messages": [{"role": "user", "content": "count"}], "max_tokens": 10, "temperature": 0}
    full, finish, usage = answer_of(srv.post_json("/v1/chat/completions", body), False)
    assert finish == "length" and usage["completion_tokens"] == 10, (full, finish, usage)
    cut = full[len(full) // 2:len(full) // 2 + 2]
    assert cut, full
    body["stop"] = [cut]
    text, finish, usage = answer_of(srv.post_json("/v1/chat/completions", body), False)
    assert finish == "stop" and text == full[:full.index(cut)], (text, full, cut)
    # the stop string is found on the connection's side while the engine runs
    # on: the usage counts the tokens up to the stop, the same every time
    assert 1 <= usage["completion_tokens"] < 10, usage
    for _ in range(3):
        again = answer_of(srv.post_json("/v1/chat/completions", body), False)
        assert again == (text, finish, usage), (again, usage)
    body["stream"] = True
    text, finish, _ = answer_of(srv.post_json("/v1/chat/completions", body), True)
    assert finish == "stop" and text == full[:full.index(cut)], (text, full, cut)


def t_infer_multipart(srv):
    img = png(40, 40, pixel=lambda x, y: (20, 200, 20))
    fields = [("image", "g.png", img), ("prompt", "What colour is this?"), ("adapter", srv.adapter_names[0]),
              ("max_tokens", "5")]
    r = expect(srv.post_multipart("/v1/infer", fields), 200)
    j = r.json()
    assert j["model"] == srv.adapter_names[0] and j["usage"]["completion_tokens"] == 5 and isinstance(j["text"], str), j
    chat = {"model": srv.adapter_names[0], "max_tokens": 5, "temperature": 0,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(img)}},
                                                      {"type": "text", "text": "What colour is this?"}]}]}
    assert answer_of(srv.post_json("/v1/chat/completions", chat), False)[0] == j["text"]
    expect(srv.post_multipart("/v1/infer", [("prompt", "hi"), ("adapter", "nope")]), 404, "model_not_found")
    expect(srv.post_multipart("/v1/infer", [("image", "x.png", b"not an image"), ("prompt", "hi")]), 415)


def t_bad_requests(srv):
    def chat(**kw):
        body = {"model": "dense", "messages": [{"role": "user", "content": "hi"}]}
        body.update(kw)
        return srv.post_json("/v1/chat/completions", body)

    for url in ("http://169.254.169.254/x.png", "https://example.com/a.jpg", "file:///etc/passwd"):
        msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]
        r = expect(chat(messages=msgs), 400, "remote_images_not_supported")
        assert r.json()["error"]["param"] == "messages[0].content[0]", r
    expect(chat(model="no-such-adapter"), 404, "model_not_found")
    expect(chat(model="../etc"), 400, "invalid_model_name")
    expect(chat(temperature=3), 400, "invalid_value")
    expect(chat(top_p=0), 400, "invalid_value")
    expect(chat(max_tokens=0), 400, "invalid_value")
    expect(chat(max_tokens="10"), 400, "invalid_type")
    expect(chat(n=2), 400, "invalid_value")
    expect(chat(max_token=5), 400, "unknown_parameter")
    expect(chat(messages=[]), 400, "invalid_type")
    expect(chat(messages=[{"role": "robot", "content": "x"}]), 400, "invalid_value")
    expect(chat(stop=["a"] * 17), 400, "too_many_stop_sequences")
    r = expect(chat(messages=[{"role": "user", "content": "word " * 3000}], max_tokens=4000), 400,
               "context_length_exceeded")
    msg = r.json()["error"]["message"]
    assert "4000" in msg and "prompt has" in msg, msg
    assert srv.alive()


def t_refused_adapters(srv):
    d = ("dense", "lora_lm", "adapter_init")
    cfg, w = fixture_bytes(*d, "adapter_config.json"), fixture_bytes(*d, "adapter_model.safetensors")
    r = expect(upload(srv, "empty", cfg, with_zero_b(w)), 400, "adapter_incompatible")
    assert "would change nothing" in r.json()["error"]["message"], r
    bad = renamed(with_random_b(w, 5), "layers.0.mlp.down_proj", "layers.0.mlp.doom_proj")
    r = expect(upload(srv, "wrongkeys", cfg, bad), 400, "adapter_incompatible")
    assert "doom_proj" in r.json()["error"]["message"], r
    # values that would overflow the forward pass (they answered "" before)
    huge = json.loads(cfg)
    huge["lora_alpha"] = 1e308
    r = expect(upload(srv, "huge-alpha", json.dumps(huge).encode(), with_random_b(w, 7)), 400, "adapter_incompatible")
    assert "lora_alpha" in r.json()["error"]["message"], r
    r = expect(upload(srv, "huge-weights", cfg, with_random_b(w, 8, scale=1e38)), 400, "adapter_incompatible")
    assert "lora_B" in r.json()["error"]["message"] and "1e4" in r.json()["error"]["message"], r
    expect(srv.get("/v1/adapters/huge-alpha"), 404)
    # damaged on disk after upload: its requests fail, named; the others are served
    expect(upload(srv, "damaged", cfg, with_random_b(w, 6)), 201)
    path = os.path.join(srv.data, "adapters", "damaged", "adapter_model.safetensors")
    os.chmod(path, 0o600)
    with open(path, "r+b") as f:
        f.truncate(100)
    r = srv.post_json("/v1/chat/completions", {"model": "damaged", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status >= 400 and r.code and "adapter" in r.json()["error"]["message"].lower(), r
    answer_of(srv.post_json("/v1/chat/completions", {"model": srv.adapter_names[2], "max_tokens": 3,
                                                     "messages": [{"role": "user", "content": "hi"}]}), False)


def t_delete_adapter_stops_serving(srv):
    d = ("dense", "lora_lm", "adapter_init")
    cfg, w = fixture_bytes(*d, "adapter_config.json"), fixture_bytes(*d, "adapter_model.safetensors")
    expect(upload(srv, "short-lived", cfg, with_random_b(w, 9)), 201)
    body = {"model": "short-lived", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}
    answer_of(srv.post_json("/v1/chat/completions", body), False)
    models = {m["id"]: m for m in expect(srv.get("/v1/models"), 200).json()["data"]}
    assert models["short-lived"]["parent"] == "dense" and models["dense"]["parent"] is None, models
    expect(srv.request("DELETE", "/v1/adapters/short-lived"), 200)
    expect(srv.post_json("/v1/chat/completions", body), 404, "model_not_found")


# ---- limits: queue and disconnects -----------------------------------------------------------

def metric(srv, name):
    text = expect(srv.get("/metrics"), 200).body.decode()
    return float(text.split("\n%s " % name)[1].split()[0])


def wait_metric(srv, name, value, timeout=20):
    t0 = time.time()
    while metric(srv, name) != value and time.time() - t0 < timeout:
        time.sleep(0.05)
    return metric(srv, name) == value


def t_queue_full_and_disconnect(binary):
    srv = Server(binary, extra=["--no-train", "--max-seqs", "1", "--max-queue", "2", "--max-tokens", "8000"])
    try:
        body = {"model": "dense", "messages": [{"role": "user", "content": "go on"}], "max_tokens": 400,
                "temperature": 0}
        statuses, lock = [], threading.Lock()

        def client():
            r = srv.post_json("/v1/chat/completions", body, timeout=600)
            with lock:
                statuses.append((r.status, r.headers.get("retry-after"), r.code))

        threads = [threading.Thread(target=client) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        full = [s for s in statuses if s[0] == 429]
        assert len(full) >= 4 and all(s[1] and s[2] == "queue_full" for s in full), statuses
        assert sum(s[0] == 200 for s in statuses) >= 1, statuses
        # a client that hangs up mid-stream frees its slot and its KV blocks
        stream = dict(body, stream=True, max_tokens=4000)
        stream["messages"] = [{"role": "user", "content": "x"}]
        s = open_chat(srv, stream)
        got = b""
        while got.count(b"data: ") < 3:
            got += s.recv(4096)
        assert b"200 OK" in got.split(b"\r\n")[0], got[:200]
        hang_up_frees_slot(srv, s, 1)
        # a non-streaming client that hangs up is noticed at the next token too
        plain = dict(stream, stream=False)
        hang_up_frees_slot(srv, open_chat(srv, plain), 2)
        # waiting longer than the idle timeout (3 s here) for a slot is not idleness; the holder's
        # 8,000 steps take about 7 s on one core of a 2-core machine (a speed, not a bound)
        s = open_chat(srv, dict(stream, max_tokens=8000))
        assert wait_metric(srv, "gf_inference_running", 1)
        completed = metric_lines(srv)['gf_inference_requests_total{outcome="completed"}']
        result = {}
        waiter = threading.Thread(target=lambda: result.update(r=srv.post_json("/v1/chat/completions", dict(
            plain, max_tokens=5), timeout=60)))
        waiter.start()
        time.sleep(4.5)
        now = metric_lines(srv)
        if now['gf_inference_requests_total{outcome="completed"}'] == completed:
            assert now["gf_inference_queue_depth"] == 1, ("the waiting request was dropped", now)
        else:
            print("    the holder ended before the idle timeout: the waiter ran sooner")
        s.close()  # the slot frees; the waiting request runs
        waiter.join()
        assert result["r"].status == 200 and result["r"].json()["usage"]["completion_tokens"] > 0, result
        assert srv.alive()
    finally:
        srv.stop()


def open_chat(srv, body):
    """A raw connection that has sent a chat completion request (to hang up on)."""
    payload = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAuthorization: Bearer %s\r\n"
              b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (srv.port, KEY.encode(), len(payload))
              + payload)
    return s


def hang_up_frees_slot(srv, s, n_cancelled):
    """Closes s while its request runs; its slot and KV blocks come back."""
    assert wait_metric(srv, "gf_inference_running", 1)
    s.close()
    assert wait_metric(srv, "gf_inference_running", 0), "the hung-up request still holds its slot"
    assert wait_metric(srv, "gf_kv_blocks_used", 0)
    assert metric(srv, 'gf_inference_requests_total{outcome="cancelled"}') == n_cancelled


def open_infer(srv, fields):
    """A raw connection that has sent a multipart /v1/infer request."""
    body, ctype = multipart(fields)
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
    s.sendall(b"POST /v1/infer HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAuthorization: Bearer %s\r\n"
              b"Content-Type: %s\r\nContent-Length: %d\r\n\r\n" % (srv.port, KEY.encode(), ctype.encode(), len(body))
              + body)
    return s


def response_on(s):
    """(status, body) of the final answer on raw socket s, any interim 1xx
    skipped and a chunked body decoded, as an HTTP/1.1 client reads it."""
    s.settimeout(600)
    r = http.client.HTTPResponse(s)
    r.begin()
    return r.status, r.read()


def t_half_close_and_queued_hang_ups(binary):
    """Queued clients that hang up leave the queue at once (a live request is
    then admitted, not refused with 429); clients that half-close after their
    request (shutdown(SHUT_WR): done sending, still reading) are not hung up:
    queued and then running, chat (plain and streaming) and /v1/infer, each
    gets the answer the same request gets from a client that stays open."""
    srv = Server(binary, extra=["--no-train", "--max-seqs", "1", "--max-queue", "4", "--max-tokens", "8000"])
    try:
        # the holder keeps the one slot busy for its 8,000 decode steps (about 7 s on one core
        # of a 2-core machine; the queue is looked at every 250 ms), then is closed below
        long = {"model": "dense", "messages": [{"role": "user", "content": "go on"}], "max_tokens": 8000,
                "temperature": 0, "stream": True}
        holder = open_chat(srv, long)
        assert wait_metric(srv, "gf_inference_running", 1)
        gone = [open_chat(srv, dict(long, stream=False)) for _ in range(4)]
        assert wait_metric(srv, "gf_inference_queue_depth", 4)
        for s in gone:
            s.close()
        assert wait_metric(srv, "gf_inference_queue_depth", 0), "hung-up queued requests kept their queue slots"
        assert wait_metric(srv, 'gf_inference_requests_total{outcome="cancelled"}', 4)
        assert metric(srv, "gf_inference_running") == 1, "the running request was not the one that hung up"

        plain = {"model": "dense", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 12,
                 "temperature": 0}
        infer = [("prompt", "Once upon a time"), ("max_tokens", "9")]
        half = [open_chat(srv, plain), open_chat(srv, dict(plain, stream=True)), open_infer(srv, infer)]
        for s in half:
            s.shutdown(socket.SHUT_WR)
        assert wait_metric(srv, "gf_inference_queue_depth", 3)
        time.sleep(1.5)  # several looks at the sockets: a FIN alone must not count as a hang-up
        # one snapshot of the counters; the holder's length is a speed, not a bound: if it has
        # ended, half-closed clients run, and none of them may have been cancelled either way
        now = metric_lines(srv)
        assert now['gf_inference_requests_total{outcome="cancelled"}'] == 4, ("a half-closed client was taken for gone", now)
        if now['gf_inference_requests_total{outcome="completed"}'] == 0:
            assert (now["gf_inference_queue_depth"], now["gf_inference_running"]) == (3, 1), now
        else:
            print("    the holder ended before the look: half-closed clients were running")
        holder.close()
        got = [response_on(s) for s in half]
        assert all(status == 200 for status, _ in got), [g[0] for g in got]
        want_chat = answer_of(expect(srv.post_json("/v1/chat/completions", plain), 200), False)
        assert json.loads(got[0][1])["choices"][0]["message"]["content"] == want_chat[0], got[0]
        streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in sse_events(got[1][1]) if e["choices"])
        assert streamed == want_chat[0] and got[1][1].rstrip().endswith(b"data: [DONE]"), got[1][1][-200:]
        want_infer = expect(srv.post_multipart("/v1/infer", infer), 200).json()
        assert json.loads(got[2][1])["text"] == want_infer["text"], (got[2], want_infer)
        assert srv.alive()
    finally:
        srv.stop()

def t_kv_cache_bf16(binary):
    """--kv-cache bf16 (the default in the bf16 precision; the CPU's is
    fp32): /readyz says what the KV cache holds, /metrics counts half the
    bytes for the same blocks, and it answers, the same each time; an
    unknown value stops the server at start, naming the flag."""
    got = {}
    for kv in ("fp32", "bf16"):
        srv = Server(binary, extra=["--no-train", "--max-seqs", "2", "--kv-cache", kv])
        try:
            ready = expect(srv.get("/readyz"), 200, error_shape=False).json()
            assert ready["model"]["kv_cache"] == kv, ready
            m = metric_lines(srv)
            body = {"model": "dense", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 12,
                    "temperature": 0}
            a, b = (answer_of(expect(srv.post_json("/v1/chat/completions", body), 200), False) for _ in range(2))
            assert a == b and a[2]["completion_tokens"] == 12, (a, b)
            got[kv] = (m["gf_kv_cache_bytes"], m["gf_kv_blocks_total"], m["gf_kv_window_blocks_total"])
            assert srv.alive()
        finally:
            srv.stop()
    assert got["bf16"][1:] == got["fp32"][1:] and got["bf16"][0] * 2 == got["fp32"][0] > 0, got
    r = subprocess.run([binary, "serve", "--kv-cache", "fp16", "--port", "0"], capture_output=True, timeout=60)
    assert r.returncode == 2 and b"bad value: --kv-cache fp16" in r.stderr.split(b"\n")[0], (r.returncode, r.stderr[:300])


def png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xffffffff)


def flat_png(width, height, inflated=None):
    """A black RGB PNG, encoded fast: its rows of zeros compress ~1000:1. With
    inflated, its image data inflates to that many bytes whatever the header
    says (a zip bomb when that is past what width x height needs)."""
    n = inflated if inflated is not None else height * (1 + 3 * width)
    z, chunk, parts = zlib.compressobj(9), bytes(1 << 20), []
    for off in range(0, n, len(chunk)):
        parts.append(z.compress(chunk[:min(len(chunk), n - off)]))
    parts.append(z.flush())
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) +
            png_chunk(b"IDAT", b"".join(parts)) + png_chunk(b"IEND", b""))


def t_images_off_http_threads(binary):
    """Finding 2 of the reliability review: images were decoded on the HTTP
    thread of their request, so a few requests of large images (or bombs)
    held every HTTP thread and /healthz waited behind them. Now two HTTP
    threads serve /healthz at once while one image thread works through four
    requests of three 16-megapixel PNGs each (48 MB of pixels each, sent as
    50 KB) and refuses requests of eight zip bombs. The bound is relative
    (a slow machine slows both sides): no /healthz may wait a quarter of the
    shortest image request, which it did, whole, before."""
    srv = Server(binary, extra=["--no-train", "--threads", "2", "--image-threads", "1", "--max-image-queue", "16"])
    try:
        big = data_url(flat_png(4000, 4000))
        bomb = data_url(flat_png(1, 1, inflated=64 << 20))
        heavy = {"model": "dense", "max_tokens": 1, "temperature": 0, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": big}}] * 3 + [{"type": "text", "text": "What is this?"}]}]}
        bombs = {"model": "dense", "max_tokens": 1, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": bomb}}] * 8}]}
        results, lock, done = [], threading.Lock(), threading.Event()

        def send(body, kind):
            t0 = time.time()
            r = srv.post_json("/v1/chat/completions", body, timeout=600)
            with lock:
                results.append((kind, r.status, r.code, time.time() - t0))

        threads = [threading.Thread(target=send, args=(heavy, "heavy")) for _ in range(4)]
        threads += [threading.Thread(target=send, args=(bombs, "bomb")) for _ in range(2)]
        for t in threads:
            t.start()
        waits = []
        while any(t.is_alive() for t in threads[:4]):
            t0 = time.time()
            expect(srv.get("/healthz"), 200)
            waits.append(time.time() - t0)
            time.sleep(0.02)
        for t in threads:
            t.join()
        heavy_s = sorted(d for kind, status, code, d in results if kind == "heavy")
        assert [(k, s) for k, s, c, d in results if k == "heavy"] == [("heavy", 200)] * 4, results
        assert [(s, c) for k, s, c, d in results if k == "bomb"] == [(400, "invalid_image")] * 2, results
        waits.sort()
        print("    /healthz while images decoded: %d answers, p50 %.1f ms, max %.1f ms; image requests %.2f-%.2f s"
              % (len(waits), 1000 * waits[len(waits) // 2], 1000 * waits[-1], heavy_s[0], heavy_s[-1]))
        assert len(waits) >= 10, "too few /healthz answers while the images decoded: %d" % len(waits)
        assert waits[-1] < heavy_s[0] / 4, "/healthz waited %.3f s behind image decoding (requests %.2f s)" % (
            waits[-1], heavy_s[0])
        counts = metric(srv, 'gf_image_decode_total{outcome="done"}')
        assert counts == 6, counts
        assert srv.alive()
    finally:
        srv.stop()


def t_hang_up_while_images_wait(binary):
    """A client that hangs up while its images wait for the image thread is
    let go: its task skips the work (or, if it had started, the request is
    cancelled at the engine), it never completes, and the pool drains."""
    srv = Server(binary, extra=["--no-train", "--image-threads", "1"])
    try:
        big = data_url(flat_png(4000, 4000))
        heavy = {"model": "dense", "max_tokens": 1, "temperature": 0, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": big}}] * 4 + [{"type": "text", "text": "What is this?"}]}]}
        first = []
        th = threading.Thread(target=lambda: first.append(srv.post_json("/v1/chat/completions", heavy, timeout=600)))
        th.start()
        assert wait_metric(srv, 'gf_image_decode_requests{state="running"}', 1, timeout=120)
        gone = open_chat(srv, heavy)
        assert wait_metric(srv, 'gf_image_decode_requests{state="queued"}', 1, timeout=120)
        gone.close()
        th.join(600)
        expect(first[0], 200)
        assert wait_metric(srv, 'gf_image_decode_total{outcome="done"}', 2, timeout=120)
        assert metric(srv, 'gf_image_decode_requests{state="queued"}') == 0
        assert metric(srv, 'gf_image_decode_requests{state="running"}') == 0
        # the engine counts a request after its last event has woken the client
        assert wait_metric(srv, 'gf_inference_requests_total{outcome="completed"}', 1, timeout=120)
        time.sleep(0.5)  # a request cancelled at the engine would be counted by now too
        completed = metric(srv, 'gf_inference_requests_total{outcome="completed"}')
        cancelled = metric(srv, 'gf_inference_requests_total{outcome="cancelled"}')
        assert completed == 1 and cancelled in (0, 1), (completed, cancelled)
        print("    the hung-up request %s" % ("never reached the engine" if cancelled == 0 else "was cancelled at the engine"))
        assert srv.alive()
    finally:
        srv.stop()


def t_vision_cache_keyed_by_content(binary):
    """The vision tower's output is cached per (image bytes, the adapter's
    vision weights), not per adapter name: a repeated image hits; an adapter
    of the text model only shares the base's features; an adapter replaced
    under the same name with other vision weights misses and answers with
    its new weights. Every answer equals the same request on a server with
    the cache off."""
    srv = Server(binary, extra=["--no-train"])
    ref = Server(binary, extra=["--no-train", "--vision-cache-mb", "0"])
    try:
        def fixture(kind):
            d = ("dense", kind, "adapter_init")
            return fixture_bytes(*d, "adapter_config.json"), fixture_bytes(*d, "adapter_model.safetensors")
        (cfg_all, w_all), (cfg_lm, w_lm) = fixture("lora_all"), fixture("lora_lm")
        v1, v2, t = with_random_b(w_all, 31), with_random_b(w_all, 32), with_random_b(w_lm, 33)
        for name, cfg, w in (("vis", cfg_all, v1), ("txt", cfg_lm, t)):
            expect(upload(srv, name, cfg, w), 201)
        for name, cfg, w in (("vis1", cfg_all, v1), ("vis2", cfg_all, v2), ("txt", cfg_lm, t)):
            expect(upload(ref, name, cfg, w), 201)
        image = data_url(png(64, 48, pixel=lambda x, y: (x * 4 % 256, 250 - y * 5, (x * y) % 256)))

        def ask(server, model):
            body = {"model": model, "max_tokens": 12, "temperature": 0, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "Describe it."}]}]}
            return answer_of(server.post_json("/v1/chat/completions", body), False)[0]

        def lookups():
            return (metric(srv, 'gf_vision_cache_lookups_total{result="hit"}'),
                    metric(srv, 'gf_vision_cache_lookups_total{result="miss"}'))

        want = {m: ask(ref, m) for m in ("vis1", "vis2", "txt", "dense")}
        assert want["vis1"] != want["vis2"], "the two vision adapters answer alike: the test could not tell them apart"
        steps = [("vis", "vis1", (0, 1)), ("vis", "vis1", (1, 1)), ("dense", "dense", (1, 2)), ("txt", "txt", (2, 2))]
        for model, same_as, counts in steps:
            assert ask(srv, model) == want[same_as], (model, same_as)
            assert lookups() == counts, (model, lookups(), counts)
        expect(srv.request("DELETE", "/v1/adapters/vis"), 200)
        expect(upload(srv, "vis", cfg_all, v2), 201)
        assert ask(srv, "vis") == want["vis2"], "a replaced adapter answered with the old one's vision features"
        assert lookups() == (2, 3), lookups()
        assert metric(srv, "gf_vision_cache_entries") == 3 and metric(srv, "gf_vision_cache_bytes") > 0
        assert metric(ref, "gf_vision_cache_entries") == 0
    finally:
        srv.stop()
        ref.stop()


def t_preemption_over_http(binary):
    """A KV pool of 10 blocks (one sequence at its longest) under 8 concurrent
    clients: sequences are preempted as they grow and resume by recomputing;
    every answer, streamed or not, greedy or sampled with a seed, equals the
    one the same request gets alone."""
    srv = Server(binary, extra=["--no-train", "--max-seqs", "6", "--max-context", "160", "--kv-blocks", "10"])
    try:
        bodies = {}
        for i in range(8):
            body = chat_body("dense", i, i % 3 == 1)
            body["max_tokens"] = 40
            bodies[i] = body
        alone = {}
        for i, body in bodies.items():
            alone[i] = answer_of(srv.post_json("/v1/chat/completions", body, timeout=120), body["stream"])
        assert metric(srv, "gf_inference_preemptions_total") == 0
        results, errors = {}, []

        def client(i):
            try:
                resp = srv.post_json("/v1/chat/completions", bodies[i], timeout=300)
                results[i] = answer_of(resp, bodies[i]["stream"])
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append((i, repr(e)))

        threads = [threading.Thread(target=client, args=(i,)) for i in bodies]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        for i in bodies:
            assert results[i][:2] == alone[i][:2], (i, results[i], alone[i])
        assert metric(srv, "gf_inference_preemptions_total") > 0
        assert wait_metric(srv, "gf_inference_paused", 0) and wait_metric(srv, "gf_kv_blocks_used", 0)
        assert wait_metric(srv, "gf_kv_window_blocks_used", 0) and metric(srv, "gf_kv_window_blocks_total") > 0
        assert srv.alive()
    finally:
        srv.stop()


def t_shutdown_mid_answer(binary):
    """SIGTERM while answering: a non-streaming client cut short gets 503
    shutting_down (retry elsewhere), never a 200 whose text reads complete;
    one that finished before gets its whole answer."""
    srv = Server(binary, extra=["--no-train", "--drain", "0"])  # no grace: running answers are cut
    try:
        body = {"model": "dense", "messages": [{"role": "user", "content": "count"}], "max_tokens": 4000,
                "temperature": 0}
        answers = []

        def ask():
            answers.append(srv.post_json("/v1/chat/completions", body, timeout=120))

        th = threading.Thread(target=ask)
        th.start()
        for _ in range(3000):  # until the engine has generated some of its tokens
            text = expect(srv.get("/metrics"), 200).body.decode()
            done = [int(x.split()[-1]) for x in text.splitlines() if x.startswith("gf_inference_generated_tokens_total ")]
            if done and done[0] >= 50:
                break
            time.sleep(0.005)
        srv.proc.send_signal(signal.SIGTERM)
        th.join(120)
        r = answers[0]
        if r.status == 200:
            j = r.json()
            assert j["choices"][0]["finish_reason"] == "length" and j["usage"]["completion_tokens"] == 4000, j["usage"]
        else:
            assert r.status == 503 and r.code == "shutting_down", r
        srv.proc.wait(30)
    finally:
        srv.stop()


def t_device_fault_refuses_new_work(binary):
    """A device fault in a serving step (injected through the guarded
    backend) ends the request it hit with 500 device_error; from then on the
    server refuses new requests with 503 device_failed, /healthz and /readyz
    say why (an orchestrator restarts it), and it stays up for the rest."""
    fault = os.path.join(tempfile.mkdtemp(prefix="gf-fault-"), "fault")
    saved = {k: os.environ.get(k) for k in ("GF_DEVICE", "GF_GUARDED_FAULT_FILE")}
    os.environ.update(GF_DEVICE="guarded", GF_GUARDED_FAULT_FILE=fault)
    try:
        srv = Server(binary, extra=["--no-train"])
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        body = {"model": "dense", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
        expect(srv.post_json("/v1/chat/completions", body), 200)
        expect(srv.get("/healthz"), 200)
        open(fault, "w").close()
        r = srv.post_json("/v1/chat/completions", body)
        assert r.status == 500 and r.code == "device_error" and "injected" in r.json()["error"]["message"], r
        r = srv.post_json("/v1/chat/completions", dict(body, stream=True))
        assert r.status == 503 and r.code == "device_failed" and "restart" in r.json()["error"]["message"], r
        h = expect(srv.get("/healthz"), 503)
        assert h.code == "device_failed" and "injected" in h.json()["error"]["message"], h
        rd = expect(srv.get("/readyz"), 503, error_shape=False).json()
        assert rd["status"] == "not_ready" and "injected" in rd["device"], rd
        expect(srv.get("/v1/models"), 200)
        assert srv.alive()
    finally:
        srv.stop()
        shutil.rmtree(os.path.dirname(fault), ignore_errors=True)


def main():
    runner = Runner()
    srv = Server(BIN, extra=["--no-train", "--max-seqs", "6", "--max-queue", "64", "--max-adapters", "4"])
    try:
        srv.adapter_names = setup_adapters(srv)
        for name, fn in [(n, f) for n, f in globals().items() if n.startswith("t_")]:
            uses_binary = fn.__code__.co_varnames[:1] == ("binary",)
            runner.run(name, fn, BIN if uses_binary else srv)
        assert srv.alive(), "server died during the tests"
    finally:
        srv.stop()
    return runner.finish()


if __name__ == "__main__":
    if not BIN:
        print(__doc__)
        sys.exit(2)
    sys.exit(main())
