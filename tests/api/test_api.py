"""API tests against a real gemmaforge server on loopback with a real SQLite
file: happy paths, then every bad input of RELIABILITY.md §2.1 that applies
(H, J, T, D, G, A), each followed by a check that nothing was persisted.

usage: test_api.py PATH/TO/gemmaforge
"""
import io
import json
import os
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import tarfile
import shutil
import tempfile
import time

from harness import (FIXTURES, KEY, OPENAPI, Runner, Server, data_url, example, expect, fixture_bytes, jsonl, make_tar, multipart, png, wait_export)

BIN = sys.argv[1]
MIN_EXAMPLES = 3
UPLOAD_MAX = 4 * 1024 * 1024


def settle(srv):
    """Waits until the request cleanup of the last request has run (its
    completion callback, after the answer; a busy machine may take a while,
    a leak never ends)."""
    until = time.time() + 60
    while time.time() < until:
        if not srv.tmp_entries():
            return
        time.sleep(0.02)
    raise AssertionError("upload temp files left behind: %s" % srv.tmp_entries())


def nothing_persisted(srv, fn):
    before = srv.snapshot()
    fn()
    settle(srv)
    after = srv.snapshot()
    assert after["quick_check"] == "ok", after
    assert after["counts"] == before["counts"], (before["counts"], after["counts"])
    assert after["files"] == before["files"], after["files"] ^ before["files"]
    assert srv.alive(), "server died"


def good_dataset(n=MIN_EXAMPLES, images=True):
    red = png(8, 8, pixel=lambda x, y: (220, 20, 20))
    blue = png(12, 6, pixel=lambda x, y: (20, 20, 220))
    lines, members = [], []
    if images:
        members = [("shapes/red.png", red), ("./shapes/blue.png", blue), ("photos/tall.jpg", fixture_bytes("images", "tall.jpg"))]
        lines.append(example("shapes/red.png", answer="red", system="Answer with one word."))
        lines.append(example("shapes/blue.png", answer="blue"))
        lines.append(json.dumps({"messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(red)}},
                                         {"type": "image", "image": "photos/tall.jpg"},
                                         {"type": "text", "text": "Colours?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "red and many"}]}]}))
    while len(lines) < n:
        lines.append(example(None, text="Say hi %d" % len(lines), answer="hi"))
    return jsonl(lines), (make_tar(members) if images else None)


def upload(srv, lines_bytes, tar=None, name=None, **kw):
    fields = [("file", "data.jsonl", lines_bytes)]
    if tar is not None:
        fields.append(("images", "images.tar", tar))
    if name is not None:
        fields.append(("name", name))
    return srv.post_multipart("/v1/datasets", fields, **kw)


def adapter_files(which="lora_lm"):
    d = ("dense", which, "adapter_init")
    return fixture_bytes(*d, "adapter_config.json"), fixture_bytes(*d, "adapter_model.safetensors")


def upload_adapter(srv, name, config, weights):
    return srv.post_multipart("/v1/adapters", [("name", name), ("config", "adapter_config.json", config),
                                                ("weights", "adapter_model.safetensors", weights)])


# ======================================================================
# happy paths
# ======================================================================

def t_health_and_ready(srv):
    r = expect(srv.get("/healthz", key=None), 200)
    assert r.json() == {"status": "ok"}
    r = expect(srv.get("/readyz"), 200)
    body = r.json()
    device = body["model"].get("device")
    assert device in ("cpu", "guarded", "cuda:0"), body  # GF_DEVICE of the run; the GPU run sets fp32 too
    assert body == {"status": "ready", "store": "ok",
                    "model": {"id": "dense", "loaded": True, "device": device, "precision": "fp32",
                              "kv_cache": "fp32"}}, body


def t_dataset_lifecycle(srv):
    data, tar = good_dataset()
    r = expect(upload(srv, data, tar, name="colours <b>v1</b>"), 201)
    d = r.json()
    assert d["status"] == "ready" and d["examples"] == MIN_EXAMPLES and d["images"] == 4, d
    assert d["name"] == "colours <b>v1</b>" and d["id"].startswith("ds_") and d["has_images_archive"] is True
    ds_dir = os.path.join(srv.data, "datasets", d["id"])
    assert open(os.path.join(ds_dir, "data.jsonl"), "rb").read() == data
    assert open(os.path.join(ds_dir, "images.tar"), "rb").read() == tar
    got = expect(srv.get("/v1/datasets/" + d["id"]), 200).json()
    assert got == d, (got, d)
    # text-only dataset, no archive
    d2 = expect(upload(srv, good_dataset(images=False)[0]), 201).json()
    assert d2["images"] == 0 and d2["has_images_archive"] is False and d2["name"] == d2["id"]
    # list is newest first and pages
    page = expect(srv.get("/v1/datasets?limit=1"), 200).json()
    assert page["object"] == "list" and [x["id"] for x in page["data"]] == [d2["id"]] and page["has_more"] is True
    page2 = expect(srv.get("/v1/datasets?limit=1&after=" + d2["id"]), 200).json()
    assert page2["data"][0]["id"] == d["id"]
    expect(srv.get("/v1/datasets?limit=0"), 400, "invalid_value")
    expect(srv.get("/v1/datasets?limit=1&after=ds_nope"), 400, "invalid_value")
    # delete
    expect(srv.request("DELETE", "/v1/datasets/" + d2["id"]), 200)
    expect(srv.get("/v1/datasets/" + d2["id"]), 404, "dataset_not_found")
    assert not os.path.exists(os.path.join(srv.data, "datasets", d2["id"]))
    expect(srv.request("DELETE", "/v1/datasets/" + d2["id"]), 404, "dataset_not_found")
    srv.ready_dataset = d["id"]


def t_jobs_lifecycle(srv):
    ds = srv.ready_dataset
    r = expect(srv.post_json("/v1/fine_tuning/jobs", {"dataset": ds, "suffix": "pets",
                                                       "hyperparameters": {"epochs": 2, "lora_rank": 8}}), 201)
    job = r.json()
    assert job["status"] == "queued" and job["id"].startswith("job_") and job["model"] == "dense"
    h = job["hyperparameters"]
    assert h["epochs"] == 2 and h["lora_rank"] == 8 and h["learning_rate"] == 5e-5 and h["batch_size"] == 2
    assert h["gradient_accumulation_steps"] == 4 and h["lora_alpha"] == 64 and h["quantization"] == "nf4"
    assert h["target_modules"] == "all-linear" and h["lr_scheduler"] == "cosine" and h["gradient_checkpointing"] is True
    assert job["progress"]["step"] is None and job["error"] is None and job["adapter"] is None
    got = expect(srv.get("/v1/fine_tuning/jobs/" + job["id"]), 200).json()
    assert got == job
    lst = expect(srv.get("/v1/fine_tuning/jobs"), 200).json()
    assert job["id"] in [j["id"] for j in lst["data"]]
    # a dataset used by a queued job cannot be deleted
    expect(srv.request("DELETE", "/v1/datasets/" + ds), 409, "dataset_in_use")
    ev = expect(srv.get("/v1/fine_tuning/jobs/%s/events" % job["id"]), 200).json()["data"]
    assert len(ev) == 1 and ev[0]["type"] == "status" and "queued" in ev[0]["message"]
    # cancel: queued -> cancelled, idempotent
    c = expect(srv.post_json("/v1/fine_tuning/jobs/%s/cancel" % job["id"], None), 200).json()
    assert c["status"] == "cancelled" and c["finished_at"] is not None
    c2 = expect(srv.request("POST", "/v1/fine_tuning/jobs/%s/cancel" % job["id"]), 200).json()
    assert c2["status"] == "cancelled"
    ev = expect(srv.get("/v1/fine_tuning/jobs/%s/events?after=%d" % (job["id"], ev[0]["seq"])), 200).json()["data"]
    assert len(ev) == 1 and "cancelled" in ev[0]["message"]
    assert expect(srv.get("/v1/fine_tuning/jobs/%s/checkpoints" % job["id"]), 200).json()["data"] == []
    # the row in SQLite says the same
    db = srv.db()
    assert db.execute("SELECT status FROM jobs WHERE id=?", (job["id"],)).fetchone()[0] == "cancelled"
    db.close()
    # still queued jobs stay queued: nothing pretends to train
    j2 = expect(srv.post_json("/v1/fine_tuning/jobs", {"dataset": ds}), 201).json()
    time.sleep(0.3)
    assert expect(srv.get("/v1/fine_tuning/jobs/" + j2["id"]), 200).json()["status"] == "queued"
    srv.queued_job = j2["id"]


def t_adapter_lifecycle(srv):
    cfg, w = adapter_files("lora_all")
    a = expect(upload_adapter(srv, "pets-v1", cfg, w), 201).json()
    assert a["id"] == "pets-v1" and a["source"] == "uploaded" and a["rank"] == 4 and a["alpha"] == 8
    assert a["modules"] == 56 and a["vision"] is True and a["base_model"] == "dense", a
    import hashlib
    assert a["sha256"] == hashlib.sha256(w).hexdigest()
    expect(upload_adapter(srv, "pets-v1", cfg, w), 409, "adapter_exists")
    got = expect(srv.get("/v1/adapters/pets-v1"), 200).json()
    assert got == a
    models = expect(srv.get("/v1/models"), 200).json()
    ids = {m["id"]: m for m in models["data"]}
    assert ids["dense"]["parent"] is None and ids["pets-v1"]["parent"] == "dense", models
    # download: a tar of exactly the PEFT files
    r = expect(srv.get("/v1/adapters/pets-v1/download"), 200)
    assert r.headers["content-type"] == "application/x-tar"
    import io
    with tarfile.open(fileobj=io.BytesIO(r.body)) as t:
        assert sorted(t.getnames()) == ["adapter_config.json", "adapter_model.safetensors"]
        assert t.extractfile("adapter_model.safetensors").read() == w
        assert t.extractfile("adapter_config.json").read() == cfg
    cfg2, w2 = adapter_files("lora_lm")
    b = expect(upload_adapter(srv, "lm.only_2", cfg2, w2), 201).json()
    # 6 layers x 7 projections, less v_proj on the 2 full layers (attention_k_eq_v)
    assert b["vision"] is False and b["modules"] == 40, b
    expect(srv.request("DELETE", "/v1/adapters/lm.only_2"), 200)
    expect(srv.get("/v1/adapters/lm.only_2"), 404, "adapter_not_found")
    assert not os.path.exists(os.path.join(srv.data, "adapters", "lm.only_2"))


# ---- multipart bodies however the bytes arrive -------------------------------------

def answer_of_split(srv, path, body, ctype, cuts):
    status, payload = srv.send_pieces("POST", path, body, {"Authorization": "Bearer " + KEY, "Content-Type": ctype},
                                      cuts)
    obj = json.loads(payload)
    obj.pop("id", None)  # a fresh id per request
    return status, obj


def t_multipart_split_anywhere(srv):
    """Every route that takes multipart gives the same answer whether the body
    arrives whole, split in two at any byte, or in random small pieces
    (browsers and Node split after a field's value; this once answered
    'the form field ... appears twice')."""
    rng = random.Random(5)
    cases = [
        ("/v1/infer", [("prompt", "hi"), ("max_tokens", "1"), ("image", "a.png", png(8, 8))], 200),
        ("/v1/datasets", [("name", "split"), ("file", "data.jsonl", b'{"messages": []}\n{not json\n')], 422),
        ("/v1/adapters", [("name", "split-adapter"), ("config", "adapter_config.json", adapter_files()[0]),
                          ("weights", "adapter_model.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")],
         400),
    ]
    before = srv.snapshot()
    for path, fields, want in cases:
        body, ctype = multipart(fields)
        whole = answer_of_split(srv, path, body, ctype, [])
        assert whole[0] == want, (path, whole)
        for cut in range(1, len(body)):
            got = answer_of_split(srv, path, body, ctype, [cut])
            assert got == whole, (path, "split at byte %d of %d" % (cut, len(body)), got, whole)
        for _ in range(10):
            cuts = sorted(rng.sample(range(1, len(body)), min(len(body) - 1, rng.randint(2, 60))))
            got = answer_of_split(srv, path, body, ctype, cuts)
            assert got == whole, (path, "in %d pieces" % (len(cuts) + 1), got, whole)
    settle(srv)
    assert srv.snapshot() == before, "a refused upload left something behind"


def raw_upload(srv, path, body, headers):
    """Sends a whole request, body included, then reads the answer:
    (status, json) or the exception a client would have hit."""
    try:
        status, payload = srv.send_pieces("POST", path, body, headers)
    except OSError as e:
        return e
    return status, json.loads(payload)


def t_refusals_reach_clients_still_sending(srv):
    """An upload refused from its head (401, 404, 405, 415) is read to its end
    before the answer goes, so a client that sends its whole body before
    reading (Node's fetch, the OpenAI SDK) gets the JSON error, not a reset
    connection; with Expect: 100-continue the answer comes at once."""
    body, ctype = multipart([("file", "data.jsonl", b"x" * (3 << 20))])
    auth = {"Authorization": "Bearer " + KEY, "Content-Type": ctype}
    cases = [("/v1/datasets", dict(auth, Authorization="Bearer wrong"), 401, "invalid_api_key"),
             ("/v1/files-not-here", auth, 404, "not_found"),
             ("/v1/models", auth, 405, "method_not_allowed"),
             ("/v1/datasets", dict(auth, **{"Content-Type": "text/plain"}), 415, "unsupported_media_type")]
    for path, headers, status, code in cases:
        got = raw_upload(srv, path, body, headers)
        assert not isinstance(got, Exception), (path, status, "the client saw %r" % got)
        assert got[0] == status and got[1]["error"]["code"] == code, (path, got)
    # asked to wait for 100 Continue, the client is answered before it sends anything
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
    s.sendall(("POST /v1/datasets HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAuthorization: Bearer wrong\r\n"
               "Content-Type: %s\r\nContent-Length: %d\r\nExpect: 100-continue\r\n\r\n" % (srv.port, ctype, len(body))).encode())
    first = s.recv(65536)
    s.close()
    assert first.startswith(b"HTTP/1.1 401"), first[:80]
    assert srv.alive()


def t_models_retrieve(srv):
    """GET /v1/models/{id}: the base and any adapter, as the list shows them
    (the OpenAI SDKs' models.retrieve); anything else is model_not_found."""
    listed = {m["id"]: m for m in expect(srv.get("/v1/models"), 200).json()["data"]}
    got = expect(srv.get("/v1/models/dense"), 200).json()
    assert got == listed["dense"] and got["object"] == "model" and got["parent"] is None, got
    cfg, w = adapter_files("lora_all")
    expect(upload_adapter(srv, "retrieve-me", cfg, w), 201)
    got = expect(srv.get("/v1/models/retrieve-me"), 200).json()
    assert got["id"] == "retrieve-me" and got["parent"] == "dense" and got["object"] == "model", got
    expect(srv.request("DELETE", "/v1/adapters/retrieve-me"), 200)
    r = expect(srv.get("/v1/models/retrieve-me"), 404, "model_not_found")
    assert r.json()["error"]["param"] == "model"
    expect(srv.get("/v1/models/no-such-model"), 404, "model_not_found")


def t_json_of_tiny_values_refused(srv):
    """A body of millions of tiny values (cheap to send, gigabytes as a tree)
    is refused while its bytes are scanned, before any tree is built."""
    body = b'{"model":"dense","messages":[],"x":[' + b"0," * (3 << 20) + b"0]}"
    rss_before = srv.rss()
    for _ in range(3):
        r = srv.request("POST", "/v1/chat/completions", body, headers={"Content-Type": "application/json"}, timeout=120)
        expect(r, 400, "too_many_values")
        assert "1048576 values" in r.json()["error"]["message"], r
    # as a tree, each body cost gigabytes that stayed; scanned, nothing of it is kept (the
    # bound leaves room for an ASan build's quarantine of the freed body buffers)
    grown = srv.rss() - rss_before
    assert grown < 128 << 20, "RSS grew by %d MB over three refused bodies" % (grown >> 20)
    assert srv.alive()


def t_auth_before_routing(srv):
    """Without a valid key every /v1 path answers 401, so 404 and 405 do not
    map the API for strangers; the auth scheme is case-insensitive."""
    for method, path in (("GET", "/v1/no-such-route"), ("POST", "/v1/models"), ("DELETE", "/v1/datasets"),
                         ("GET", "/v1/datasets")):
        expect(srv.request(method, path, key=None), 401, "missing_api_key")
        expect(srv.request(method, path, key="wrong-key"), 401, "invalid_api_key")
    expect(srv.request("GET", "/v1/no-such-route"), 404, "not_found")
    for scheme in ("bearer", "BEARER", "Bearer"):
        r = srv.request("GET", "/v1/models", key=None, headers={"Authorization": "%s %s" % (scheme, KEY)})
        expect(r, 200)
    expect(srv.get("/healthz", key=None), 200)


def t_job_reserves_its_adapter_name(srv):
    """A job's adapter name ("<suffix>-<8 hex of its id>") is held from the
    job's creation: an upload under it is refused while the job is queued or
    running (the job would train to the end and then fail on the name), and
    free again once the job is cancelled."""
    job = expect(srv.post_json("/v1/fine_tuning/jobs", {"dataset": srv.ready_dataset, "suffix": "held"}), 201).json()
    name = "held-" + job["id"].split("_", 1)[1][:8]
    cfg, w = adapter_files("lora_all")
    r = expect(upload_adapter(srv, name, cfg, w), 409, "adapter_name_reserved")
    assert r.json()["error"]["param"] == "name", r
    expect(srv.post_json("/v1/fine_tuning/jobs/%s/cancel" % job["id"], {}), 200)
    expect(upload_adapter(srv, name, cfg, w), 201)
    expect(srv.request("DELETE", "/v1/adapters/" + name), 200)


def t_ambiguous_framing_refused(srv):
    """Heads a proxy could frame differently (request smuggling) are refused
    with 400 before any body is read: two Host headers, two Content-Length
    headers, Content-Length with Transfer-Encoding, an HTTP version other
    than 1.0 and 1.1, a space between a header's name and its colon, a line
    ended by a bare LF (the request line, a header, the empty line before a
    body), a bare CR in a value, a folded header line. The plain request is
    served, with odd but valid headers too."""
    get = "GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer %s\r\n" % KEY
    post = ("POST /v1/fine_tuning/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer %s\r\n"
            "Content-Type: application/json\r\n" % KEY)
    cases = [(get + "\r\n", b"200"),
             (get + "Host: other.example\r\n\r\n", b"400"),
             (post + "Content-Length: 2\r\nContent-Length: 20\r\n\r\n{}", b"400"),
             (post + "Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", b"400"),
             (get.replace("HTTP/1.1", "HTTP/1.2") + "\r\n", b"400"),
             (get + "Content-Type : text/plain\r\n\r\n", b"400"),
             (get.replace("HTTP/1.1\r\n", "HTTP/1.1\n") + "\r\n", b"400"),
             (get.replace("Host: 127.0.0.1\r\n", "Host: 127.0.0.1\n") + "\r\n", b"400"),
             (post + "Content-Length: 2\n\r\n{}", b"400"),
             (post + "Content-Length: 2\r\n\n{}", b"400"),
             (post + "Content-Length: 2\n\n{}", b"400"),
             (get + "X-Note: a\rb\r\n\r\n", b"400"),
             (get + "X-Note: a\r\n b\r\n\r\n", b"400"),
             (get + "X-Note: a\r\n\tb\r\nAccept: */*\r\n\r\n", b"400"),
             ("GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n", b"200"),
             ("GET /healthz HTTP/1.0\nHost: 127.0.0.1\n\n", b"400"),
             (get + "Accept:*/*\r\nX-A:   spaced   \r\nX-Empty:\r\nX-Tab:\tv\r\n\r\n", b"200")]
    before = srv.snapshot()
    for req, status in cases:
        out = srv.raw(req.encode(), read_all=False)
        assert out.split(b" ", 2)[1] == status, (req, out[:200])
        if status == b"400":
            assert b'"code":"invalid_request"' in out, out[:300]
    settle(srv)
    assert srv.snapshot() == before, "a refused request left something behind"


def trickle(port, pieces, pause, limit=60):
    """Sends pieces with a pause between them until the server closes the
    connection; returns the seconds it stayed open (at most limit)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=limit)
    t0 = time.time()
    try:
        for p in pieces:
            s.sendall(p)
            time.sleep(pause)
            if time.time() - t0 > limit:
                break
        s.settimeout(max(1, limit - (time.time() - t0)))
        while s.recv(65536):
            pass
    except OSError:
        pass
    finally:
        s.close()
    return time.time() - t0


def t_slow_clients_are_cut(binary):
    """Slowloris: a head sent a byte every half second is cut once the head
    deadline passes, although the connection is never silent for the idle
    timeout; so is an upload trickling under the minimum rate. A client
    that sends promptly is served meanwhile."""
    srv = Server(binary, extra=["--header-timeout", "2", "--min-body-rate", "1000", "--timeout", "30", "--no-train"])
    try:
        head = b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 200
        stayed = trickle(srv.port, [head[i:i + 1] for i in range(len(head))], 0.5)
        assert stayed < 20, "a trickled head kept its connection %.0f s" % stayed
        body = b'{"dataset": "' + b"x" * 4000 + b'"}'
        start = ("POST /v1/fine_tuning/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer %s\r\n"
                 "Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (KEY, len(body))).encode()
        stayed = trickle(srv.port, [start] + [body[i:i + 10] for i in range(0, len(body), 10)], 0.5)
        assert stayed < 20, "an upload at 20 bytes/s kept its connection %.0f s" % stayed
        expect(srv.get("/v1/models"), 200)
        assert srv.alive()
    finally:
        srv.stop()


def t_metrics(srv):
    r = expect(srv.get("/metrics"), 200)
    text = r.body.decode()
    assert r.headers["content-type"].startswith("text/plain")
    assert 'gf_http_requests_total{route="POST /v1/datasets",status="201"}' in text
    assert 'gf_http_request_duration_seconds_bucket{route="GET /healthz",le="+Inf"}' in text
    db = srv.db()
    queued = db.execute("SELECT COUNT(*) FROM jobs WHERE status='queued'").fetchone()[0]
    cancelled = db.execute("SELECT COUNT(*) FROM jobs WHERE status='cancelled'").fetchone()[0]
    n_ds = db.execute("SELECT COUNT(*) FROM datasets").fetchone()[0]
    db.close()
    assert "gf_queue_depth %d\n" % queued in text and "gf_datasets %d\n" % n_ds in text, text
    assert cancelled >= 1 and 'gf_jobs{status="cancelled"} %d\n' % cancelled in text and "gf_model_loaded 1" in text
    assert 'gf_device_memory_total_bytes{device="cpu0"}' in text
    # free memory is read for the CPU and the GPUs the server uses, never above the total
    total = dict(re.findall(r'^gf_device_memory_total_bytes\{device="(\w+)"\} (\d+)$', text, re.M))
    free = dict(re.findall(r'^gf_device_memory_free_bytes\{device="(\w+)"\} (\d+)$', text, re.M))
    assert "cpu0" in free and 0 < int(free["cpu0"]) <= int(total["cpu0"]), text
    assert all(d in total and int(f) <= int(total[d]) for d, f in free.items()), text


def t_static_dashboard(srv):
    r = expect(srv.get("/", key=None), 200)
    assert r.headers["content-type"].startswith("text/html") and b'<script type="module" src="/app.js">' in r.body
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self';" in csp and "object-src 'none'" in csp, csp
    assert "unsafe" not in csp and "frame-ancestors 'none'" in csp, csp
    r = expect(srv.get("/app.js", key=None), 200)
    assert r.headers["content-type"].startswith("text/javascript") and r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["cache-control"] == "no-cache" and r.headers["etag"].startswith('"'), r.headers
    again = srv.get("/app.js", key=None, headers={"If-None-Match": r.headers["etag"]})
    assert again.status == 304 and again.body == b"", again
    assert srv.get("/app.js", key=None, headers={"If-None-Match": '"other"'}).body == r.body
    expect(srv.get("/web/", key=None), 404)
    expect(srv.get("/../server/main.c", key=None), 404)
    expect(srv.get("/.git", key=None), 404)


# ======================================================================
# H: transport
# ======================================================================

def t_h1_h2_auth_every_route(srv):
    routes = [json.loads(l) for l in subprocess.check_output([BIN, "routes"]).decode().splitlines()]
    assert len(routes) >= 20
    for rt in routes:
        path = rt["pattern"].replace("{id}", "x1").replace("{name}", "x1")
        if not rt["auth"]:
            assert path == "/healthz", rt
            continue
        for key, code in ((None, "missing_api_key"), (KEY[:-1] + "X", "invalid_api_key"), (KEY[:-3], "invalid_api_key"),
                          (KEY + " ", "invalid_api_key"), ("", "missing_api_key")):
            r = srv.request(rt["method"], path, key=key)
            expect(r, 401, code)
            assert r.headers.get("www-authenticate") == "Bearer", r.headers
        r = srv.request(rt["method"], path + "?api_key=" + KEY, key=None)
        expect(r, 401, "missing_api_key")
    expect(srv.get("/v1/models", key=None, headers={"Authorization": "Basic " + KEY}), 401, "invalid_api_key")


def t_h3_host_header(srv):
    for host in ("localhost/v1/models?", "evil.example", "localhost@evil", "a\\b", "127.0.0.1#x"):
        expect(srv.get("/v1/models", headers={"Host": host}), 400, "invalid_host")
        expect(srv.get("/v1/models", headers={"Host": host}, key=None), 400, "invalid_host")
    expect(srv.get("/v1/models", headers={"Host": "localhost:%d" % srv.port}), 200)


def t_h4_path_variants(srv):
    for p in ("/v1//datasets", "/v1/./datasets", "/V1/datasets", "/v1/datasets/", "/v1/datasets/%2e%2e/",
              "/v1/datasets/..", "/v1/datasets%2Fx", "/v1/%c0%ae%c0%ae/datasets", "/v1/datasets/a%00b"):
        for key in (None, KEY):
            r = srv.get(p, key=key)
            assert r.status in (400, 401, 404), (p, r)
            if key is None:
                assert r.status != 200


def t_h5_method_not_allowed(srv):
    for m in ("PUT", "PATCH", "TRACE", "DELETE"):
        r = expect(srv.request(m, "/v1/fine_tuning/jobs"), 405)
        assert set(r.headers["allow"].split(", ")) == {"POST", "GET"}, r.headers
    r = expect(srv.request("POST", "/v1/datasets/x1"), 405)
    assert r.headers["allow"] == "GET, DELETE"


def t_h6_h7_huge_header_and_uri(srv):
    out = srv.raw(b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nCookie: " + b"a" * 70000 + b"\r\n\r\n")
    assert out == b"" or out.split(b" ")[1] in (b"431", b"400", b"413"), out[:80]
    out = srv.raw(b"GET /" + b"a" * 100000 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert out == b"" or out.split(b" ")[1] in (b"414", b"431", b"400"), out[:80]
    expect(srv.get("/healthz"), 200)


def t_h8_declared_too_large(srv):
    def go():
        head = ("POST /v1/datasets HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer %s\r\n"
                "Content-Type: multipart/form-data; boundary=x\r\nContent-Length: %d\r\n\r\n" % (KEY, UPLOAD_MAX + 1)).encode()
        out = srv.raw(head, read_all=False)
        assert out.startswith(b"HTTP/1.1 413"), out[:200]
        assert b"request_too_large" in out or b"Content-Length" in out
        r = srv.post_json("/v1/fine_tuning/jobs", {"dataset": "x" * (2 * 1024 * 1024)})
        expect(r, 413, "request_too_large")
    nothing_persisted(srv, go)


def t_h9_chunked_over_cap(srv):
    def go():
        import http.client
        body, ctype = __import__("harness").multipart([("file", "d.jsonl", b"x" * (UPLOAD_MAX + 4096))])
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=20)
        conn.putrequest("POST", "/v1/datasets")
        for k, v in (("Host", "localhost"), ("Authorization", "Bearer " + KEY), ("Content-Type", ctype),
                     ("Transfer-Encoding", "chunked")):
            conn.putheader(k, v)
        conn.endheaders()
        status = None
        try:
            for i in range(0, len(body), 65536):
                piece = body[i:i + 65536]
                conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
            conn.send(b"0\r\n\r\n")
            r = conn.getresponse()
            status, data = r.status, r.read()
        except (BrokenPipeError, ConnectionResetError):
            r = None
        if status is not None:
            assert status == 413 and b"request_too_large" in data, (status, data[:200])
        conn.close()
    nothing_persisted(srv, go)


def t_h10_slow_body_times_out(srv):
    def go():
        head = ("POST /v1/datasets HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer %s\r\n"
                "Content-Type: multipart/form-data; boundary=x\r\nContent-Length: 1000000\r\n\r\n--x\r\n" % KEY).encode()
        t = time.time()
        srv.raw(head + b"a" * 1000, timeout=15)
        assert time.time() - t < 12, "connection was not closed at the idle timeout"
    nothing_persisted(srv, go)


def t_h11_bad_framing(srv):
    for req in (b"POST /v1/fine_tuning/jobs HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                b"POST /v1/fine_tuning/jobs HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n",
                b"POST /v1/fine_tuning/jobs HTTP/1.1\r\nHost: localhost\r\nContent-Length: -5\r\n\r\n"):
        out = srv.raw(req)
        assert out == b"" or out.split(b" ")[1] in (b"400", b"401", b"413"), out[:100]
    expect(srv.get("/healthz"), 200)


def t_h12_content_type(srv):
    def go():
        expect(srv.request("POST", "/v1/fine_tuning/jobs", body=b'{"dataset":"x"}', headers={"Content-Type": "text/plain"}), 415, "unsupported_media_type")
        expect(srv.request("POST", "/v1/fine_tuning/jobs", body=b'{"dataset":"x"}'), 415, "unsupported_media_type")
        expect(srv.request("POST", "/v1/datasets", body=b'{}', headers={"Content-Type": "application/json"}), 415, "unsupported_media_type")
    nothing_persisted(srv, go)


def t_h13_garbage(srv):
    for req in (b"GET /healthz HTTP/1.1\r\n\r\n", b"HELLO\r\n\r\n", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"\x00\x01\x02\r\n\r\n"):
        out = srv.raw(req)
        assert out == b"" or out.split(b" ")[1] in (b"400", b"505", b"501"), (req, out[:100])
    expect(srv.get("/healthz"), 200)


# ======================================================================
# J: JSON bodies
# ======================================================================

JOBS = "/v1/fine_tuning/jobs"


def post_raw_json(srv, body):
    return srv.request("POST", JOBS, body=body, headers={"Content-Type": "application/json"})


def t_j1_to_j4_json_syntax(srv):
    def go():
        for b in (b"", b"{", b'{"a":1,', b"[]", b'"str"', b"null", b"{} {}", b"{'a':1}"):
            expect(post_raw_json(srv, b), 400, "invalid_json")
        expect(post_raw_json(srv, b"[" * 1001 + b"]" * 1001), 400, "nesting_too_deep")
        expect(post_raw_json(srv, b"[" * 100000), 400, "nesting_too_deep")
        expect(post_raw_json(srv, b'{"dataset":"\xff\xfe"}'), 400, "invalid_utf8")
        expect(post_raw_json(srv, b'{"dataset":"\xc0\xae"}'), 400, "invalid_utf8")
        expect(post_raw_json(srv, b'{"dataset":"\\ud800"}'), 400, "invalid_string")
        expect(post_raw_json(srv, b'{"dataset":"a\\u0000b"}'), 400, "invalid_string")
        r = expect(post_raw_json(srv, b'{"dataset":"a","dataset":"b"}'), 400, "duplicate_key")
        assert r.json()["error"]["param"] == "dataset"
    nothing_persisted(srv, go)


def t_j5_to_j8_types_and_values(srv):
    ds = srv.ready_dataset

    def hp(**h):
        return srv.post_json(JOBS, {"dataset": ds, "hyperparameters": h})

    def go():
        r = expect(hp(epochs="10"), 400, "invalid_hyperparameter")
        assert r.json()["error"]["param"] == "hyperparameters.epochs"
        expect(srv.post_json(JOBS, {"dataset": 5}), 400, "invalid_type")
        expect(srv.post_json(JOBS, {"dataset": ds, "hyperparameters": []}), 400, "invalid_type")
        for bad in (b"1e400", b"-1e400", b"NaN", b"Infinity", b"9999999999999999999999", b"1.5", b"0", b"-1"):
            r = post_raw_json(srv, b'{"dataset":"%s","hyperparameters":{"epochs":%s}}' % (ds.encode(), bad))
            assert r.status == 400 and r.code in ("invalid_hyperparameter", "invalid_json"), (bad, r)
        for field, value in (("learning_rate", 0), ("learning_rate", -1e-5), ("batch_size", 0), ("batch_size", 10 ** 6),
                             ("lora_rank", 0), ("lora_rank", 100000), ("epochs", 10 ** 9), ("warmup_ratio", 1.5),
                             ("lora_dropout", -0.1), ("lr_scheduler", "exp"), ("quantization", "int8"),
                             ("target_modules", ["q_proj", "lm_head"]), ("target_modules", []), ("seed", -1),
                             ("gradient_checkpointing", 1), ("save_every", 0)):
            r = expect(hp(**{field: value}), 400, "invalid_hyperparameter")
            assert r.json()["error"]["param"] == "hyperparameters." + field, r
        expect(hp(max_token=5), 400, "invalid_hyperparameter")
        r = expect(srv.post_json(JOBS, {"dataset": ds, "max_tokens": 1}), 400, "unknown_parameter")
        assert r.json()["error"]["param"] == "max_tokens"
        expect(srv.post_json(JOBS, {}), 400, "missing_parameter")
        expect(srv.post_json(JOBS, {"dataset": ds, "suffix": "../x"}), 400, "invalid_name")
        expect(srv.post_json(JOBS, {"dataset": ds, "model": "other"}), 404, "model_not_found")
    nothing_persisted(srv, go)


# ======================================================================
# T: jobs
# ======================================================================

def t_t1_to_t5_jobs(srv):
    def go():
        r = expect(srv.post_json(JOBS, {"dataset": "ds_000000000000000000000000"}), 404, "dataset_not_found")
        assert r.json()["error"]["param"] == "dataset"
        expect(srv.post_json(JOBS, {"dataset": srv.ready_dataset, "validation_dataset": "ds_nope"}), 404, "dataset_not_found")
        expect(srv.get(JOBS + "/job_nope"), 404, "job_not_found")
        expect(srv.request("POST", JOBS + "/job_nope/cancel"), 404, "job_not_found")
        expect(srv.get(JOBS + "/job_nope/events"), 404, "job_not_found")
        expect(srv.get(JOBS + "/%s/events?after=-1" % srv.queued_job), 400, "invalid_value")
    nothing_persisted(srv, go)
    # T5: finished jobs cannot be cancelled (a succeeded row is written as the trainer would)
    db_path = os.path.join(srv.data, "gemmaforge.db")
    import sqlite3
    c = sqlite3.connect(db_path, timeout=10)
    c.execute("BEGIN IMMEDIATE")
    c.execute("UPDATE jobs SET status='succeeded' WHERE id=?", (srv.queued_job,))
    c.commit()
    c.close()
    expect(srv.request("POST", JOBS + "/%s/cancel" % srv.queued_job), 409, "job_not_cancellable")


def t_t4_queue_full(binary):
    srv = Server(binary, extra=["--max-queued-jobs", "2", "--no-train", "--min-examples", str(MIN_EXAMPLES)])
    try:
        ds = expect(upload(srv, good_dataset(images=False)[0]), 201).json()["id"]
        for _ in range(2):
            expect(srv.post_json(JOBS, {"dataset": ds}), 201)
        def go():
            r = expect(srv.post_json(JOBS, {"dataset": ds}), 429, "queue_full")
            assert int(r.headers["retry-after"]) > 0
        nothing_persisted(srv, go)
    finally:
        srv.stop()


# ======================================================================
# D and G: datasets and their images
# ======================================================================

def bad_upload(srv, data, tar=None, status=422, code=None, lines=None):
    r = expect(upload(srv, data, tar), status, code)
    if lines is not None:
        details = r.json()["error"]["details"]
        got = {d["line"]: d["code"] for d in details}
        assert got == lines, (got, lines)
    return r


def t_d1_text_edges(srv):
    good = example(None, answer="ok")
    def go():
        bad_upload(srv, b"", code="empty_dataset")
        bad_upload(srv, b"  \n\n \n", code="empty_dataset")
    nothing_persisted(srv, go)
    # BOM and CRLF and a last line without newline are accepted
    body = b"\xef\xbb\xbf" + ("\r\n".join([good] * MIN_EXAMPLES)).encode()
    d = expect(upload(srv, body), 201).json()
    assert d["examples"] == MIN_EXAMPLES


def weighted(w1, w2):
    """A two-turn conversation whose assistant turns have OpenAI's weights w1, w2."""
    return json.dumps({"messages": [{"role": "user", "content": "one"}, {"role": "assistant", "content": "a", "weight": w1},
                                    {"role": "user", "content": "two"}, {"role": "assistant", "content": "b", "weight": w2}]})


def t_d2_to_d5_lines(srv):
    good = example(None, answer="ok")
    lines = [good,
             "[1,2]",                                                          # 2 not an object
             '{"messages":[]} trailing',                                       # 3 trailing garbage
             '{"nope":1}',                                                     # 4 no messages
             json.dumps({"messages": [{"role": "robot", "content": "x"}]}),    # 5 unknown role
             json.dumps({"messages": [{"role": "user", "content": "hi"}]}),    # 6 no assistant
             json.dumps({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "a"}]}),  # 7
             json.dumps({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]}),   # 8
             "",                                                               # 9 blank: skipped
             good,
             json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "extra": 1}),  # 11
             json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "s"}, {"role": "assistant", "content": "y"}]}),  # 12
             json.dumps({"messages": [{"role": "user", "content": [{"type": "audio", "audio": "a"}]}, {"role": "assistant", "content": "y"}]}),  # 13
             '{"messages":[{"role":"user","content":"a","content":"b"},{"role":"assistant","content":"y"}]}',  # 14 duplicate
             good,
             weighted(0, 1),                                                   # 16 OpenAI's weight: fine
             weighted(0, 0),                                                   # 17 nothing trained
             weighted(2, 1),                                                   # 18 not 0 or 1
             json.dumps({"messages": [{"role": "user", "content": "x", "weight": 1}, {"role": "assistant", "content": "y"}]}),  # 19
             json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": True}]})]  # 20
    expected = {2: "invalid_json", 3: "invalid_json", 4: "missing_messages", 5: "unknown_role", 6: "no_assistant_turn",
                7: "empty_content", 8: "invalid_content", 11: "unknown_field", 12: "invalid_message",
                13: "invalid_content", 14: "invalid_json", 17: "no_trained_turn", 18: "invalid_weight", 19: "invalid_weight",
                20: "invalid_weight"}
    def go():
        r = bad_upload(srv, jsonl(lines), code="invalid_dataset", lines=expected)
        assert "15 of 19 lines" in r.json()["error"]["message"], r
        bad_upload(srv, jsonl([good] * (MIN_EXAMPLES - 1)), code="too_few_examples")
    nothing_persisted(srv, go)


def t_d3_line_too_long(srv):
    long_line = json.dumps({"messages": [{"role": "user", "content": "x" * (9 << 20)}, {"role": "assistant", "content": "y"}]})
    def go():
        r = bad_upload(srv, jsonl([example(None)] * MIN_EXAMPLES + [long_line]), status=413)
    big = Server(BIN, extra=["--max-upload-bytes", str(32 << 20), "--min-examples", str(MIN_EXAMPLES)])
    try:
        def go2():
            bad_upload(big, jsonl([example(None)] * MIN_EXAMPLES + [long_line]), code="invalid_dataset",
                       lines={MIN_EXAMPLES + 1: "line_too_long"})
        nothing_persisted(big, go2)
    finally:
        big.stop()
    nothing_persisted(srv, go)


def t_d8_image_references(srv):
    red = png(4, 4)
    tar = make_tar([("ok/red.png", red)])
    refs = ["../../etc/passwd", "/etc/passwd", "C:\\x", "ok/../../b.png", "ok/./red.png", "missing.png",
            "ok\\red.png", "http://169.254.169.254/x.png", "file:///etc/passwd"]
    lines = [example("ok/red.png")] * MIN_EXAMPLES + [example(r) for r in refs]
    exp = {MIN_EXAMPLES + 1 + i: "unknown_image_reference" for i in range(len(refs))}
    exp[MIN_EXAMPLES + 8] = exp[MIN_EXAMPLES + 9] = "remote_images_not_supported"
    def go():
        bad_upload(srv, jsonl(lines), tar, code="invalid_dataset", lines=exp)
        bad_upload(srv, jsonl([example("ok/red.png")] * MIN_EXAMPLES), None, code="invalid_dataset",
                   lines={i + 1: "unknown_image_reference" for i in range(MIN_EXAMPLES)})
        ex = json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]},
                                      {"role": "assistant", "content": "a"}]})
        bad_upload(srv, jsonl([example(None)] * MIN_EXAMPLES + [ex]), code="invalid_dataset",
                   lines={MIN_EXAMPLES + 1: "remote_images_not_supported"})
    nothing_persisted(srv, go)


def t_d9_multipart_edges(srv):
    data, _ = good_dataset(images=False)
    def go():
        def raw_mp(ctype, body):
            return srv.request("POST", "/v1/datasets", body=body, headers={"Content-Type": ctype})
        r = raw_mp("multipart/form-data", b"--x\r\n\r\n")
        assert r.status == 400 and r.code == "invalid_multipart", r
        r = raw_mp("multipart/form-data; boundary=" + "b" * 200, b"--" + b"b" * 200 + b"\r\n")
        assert r.status == 400, r
        r = raw_mp("multipart/form-data; boundary=zzz", b"no boundary here at all")
        assert r.status == 400, r
        r = raw_mp("multipart/form-data; boundary=zzz", b"--zzz\r\nContent-Type: text/plain\r\n\r\nabc\r\n--zzz--\r\n")
        assert r.status == 400, r
        expect(srv.post_multipart("/v1/datasets", [("file", "a.jsonl", data), ("file", "b.jsonl", data)]), 400, "invalid_multipart")
        expect(srv.post_multipart("/v1/datasets", [("file", "a.jsonl", data), ("sneaky", "x")]), 400, "invalid_multipart")
        expect(srv.post_multipart("/v1/datasets", [("name", "x")]), 400, "missing_parameter")
    nothing_persisted(srv, go)
    # a hostile filename is ignored: the part is stored under a server id
    d = expect(srv.post_multipart("/v1/datasets", [("file", "../../../etc/x.png", data)]), 201).json()
    assert os.listdir(os.path.join(srv.data, "datasets", d["id"])) == ["data.jsonl"]


def t_d11_t6_idempotency_keys(srv):
    data, tar = good_dataset()
    key = {"Idempotency-Key": "upload-7f3a"}
    first = expect(upload(srv, data, tar, name="idem", headers=dict(key)), 201)
    n_before = srv.snapshot()["counts"]["datasets"]
    # the same upload again (curl picks a new multipart boundary): the first response, nothing new
    again = expect(upload(srv, data, tar, name="idem", headers=dict(key)), 201)
    assert again.json() == first.json()
    assert srv.snapshot()["counts"]["datasets"] == n_before
    def go():
        expect(upload(srv, data + b"\n", tar, name="idem", headers=dict(key)), 422, "idempotency_key_reused")
        expect(upload(srv, data, tar, headers={"Idempotency-Key": "bad key with spaces"}), 400, "invalid_idempotency_key")
        expect(upload(srv, data, tar, headers={"Idempotency-Key": "x" * 300}), 400, "invalid_idempotency_key")
    nothing_persisted(srv, go)
    # jobs: without a key two jobs, with a key one job and the same answer
    ds = first.json()["id"]
    a = expect(srv.post_json(JOBS, {"dataset": ds}), 201).json()
    b = expect(srv.post_json(JOBS, {"dataset": ds}), 201).json()
    assert a["id"] != b["id"]
    k = {"Idempotency-Key": "job-1"}
    j1 = expect(srv.post_json(JOBS, {"dataset": ds}, headers=dict(k)), 201).json()
    j2 = expect(srv.post_json(JOBS, {"dataset": ds}, headers=dict(k)), 201).json()
    assert j1 == j2
    expect(srv.post_json(JOBS, {"dataset": ds, "suffix": "other"}, headers=dict(k)), 422, "idempotency_key_reused")
    # a failed first request stores nothing: the same key works once the request is fixed
    k2 = {"Idempotency-Key": "job-2"}
    expect(srv.post_json(JOBS, {"dataset": "ds_missing"}, headers=dict(k2)), 404, "dataset_not_found")
    expect(srv.post_json(JOBS, {"dataset": ds}, headers=dict(k2)), 201)
    # the same key on another route is another key
    expect(upload(srv, data, tar, headers={"Idempotency-Key": "job-1"}), 201)
    for jid in (a["id"], b["id"], j1["id"]):
        srv.request("POST", JOBS + "/%s/cancel" % jid)
    db = srv.db()
    for jid in [r[0] for r in db.execute("SELECT id FROM jobs WHERE status='queued' AND dataset_id=?", (ds,))]:
        srv.request("POST", JOBS + "/%s/cancel" % jid)
    db.close()


def t_d12_archives(srv):
    red = png(4, 4)
    lines = jsonl([example("a.png")] * MIN_EXAMPLES)
    cases = [make_tar([("a.png", red), ("../evil.png", red)]),
             make_tar([("a.png", red), ("/abs.png", red)]),
             make_tar([("a.png", red), ("link.png", b"", tarfile.SYMTYPE, "/etc/passwd")]),
             make_tar([("a.png", red), ("hard.png", b"", tarfile.LNKTYPE, "a.png")]),
             make_tar([("a.png", red), ("a.png", red)]),
             make_tar([("a.png", red)])[:600],                      # truncated
             b"not a tar" * 100,
             make_tar([("a.png", red)])[:-1024] + b"\x00" * 512 + b"x" * 512]
    corrupt = bytearray(make_tar([("a.png", red)], fmt=tarfile.USTAR_FORMAT))
    corrupt[148:156] = b"0000000\x00"
    cases.append(bytes(corrupt))
    def go():
        for i, tar in enumerate(cases):
            r = upload(srv, lines, tar)
            assert r.status == 400 and r.code == "invalid_archive", (i, r)
    nothing_persisted(srv, go)
    # GNU long names are honoured
    long_name = "d/" + "n" * 150 + ".png"
    d = expect(upload(srv, jsonl([example(long_name)] * MIN_EXAMPLES), make_tar([(long_name, red)], fmt=tarfile.GNU_FORMAT)), 201)
    assert d.json()["images"] == MIN_EXAMPLES


def t_d13_names(srv):
    data, _ = good_dataset(images=False)
    def go():
        for name, code in (("", "invalid_value"), ("x" * 10000, "request_too_large"), ("a\nb", "invalid_value"),
                           ("evil\u202etxt.exe", "invalid_value"), (b"\xff\xfe", "invalid_utf8")):
            r = srv.post_multipart("/v1/datasets", [("file", "a.jsonl", data), ("name", name)])
            assert r.status in (400, 413) and r.code == code, (name, r)
    nothing_persisted(srv, go)
    r = expect(srv.post_multipart("/v1/datasets", [("file", "a.jsonl", data), ("name", '"><img src=x onerror=alert(1)>')]), 201)
    assert r.json()["name"] == '"><img src=x onerror=alert(1)>'


def t_g_images(srv):
    photo = fixture_bytes("images", "tall.jpg")
    sof = photo.find(b"\xff\xc0")
    if sof < 0:
        sof = photo.find(b"\xff\xc2")
    huge_jpeg = bytearray(photo)
    huge_jpeg[sof + 5:sof + 9] = bytes([0xFF, 0xDC, 0xFF, 0xDC])  # 65500 x 65500
    cases = {
        "trunc.png": (png(16, 16)[:-30], "invalid_image"),
        "crc.png": (png(16, 16, bad_crc=True), "invalid_image"),
        "empty.png": (b"", "invalid_image"),
        "bomb.png": (png(1, 1, ihdr_size=(100000, 100000)), "image_too_large"),
        "zero.png": (png(1, 1, ihdr_size=(0, 5)), "invalid_image"),
        "huge.jpg": (bytes(huge_jpeg), "image_too_large"),
        "trunc.jpg": (photo[: len(photo) // 2], "invalid_image"),
        "text.png": (b"<html>hello</html>", "unsupported_image_format"),
        "anim.gif": (b"GIF89a" + b"\x00" * 20, "unsupported_image_format"),
        "zip.png": (b"PK\x03\x04" + b"\x00" * 30, "unsupported_image_format"),
        "svg.png": (b'<svg xmlns="http://www.w3.org/2000/svg"/>', "unsupported_image_format"),
    }
    names = sorted(cases)
    tar = make_tar([(n, cases[n][0]) for n in names])
    lines = [example(None)] * MIN_EXAMPLES + [example(n) for n in names]
    exp = {MIN_EXAMPLES + 1 + i: cases[n][1] for i, n in enumerate(names)}
    def go():
        bad_upload(srv, jsonl(lines), tar, code="invalid_dataset", lines=exp)
        # data URLs: bad base64, whitespace, declared type that lies, unsupported declared type, image in assistant
        red = png(3, 3)
        def img_line(url, role="user"):
            part = {"type": "image_url", "image_url": {"url": url}}
            if role == "user":
                return json.dumps({"messages": [{"role": "user", "content": [part]}, {"role": "assistant", "content": "a"}]})
            return json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": [part]}]})
        too_many = json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(red)}}] * 11},
                                            {"role": "assistant", "content": "a"}]})
        lines2 = [example(None)] * MIN_EXAMPLES + [
            img_line("data:image/png;base64,@@@@"),
            img_line(data_url(red)[:-2] + " ="),
            img_line(data_url(red, mime="image/jpeg")),
            img_line(data_url(red, mime="image/gif")),
            img_line(data_url(red), role="assistant"),
            too_many,
            img_line("data:image/png,rawbytes")]
        exp2 = {MIN_EXAMPLES + 1: "invalid_image", MIN_EXAMPLES + 2: "invalid_image", MIN_EXAMPLES + 3: "invalid_image",
                MIN_EXAMPLES + 4: "unsupported_image_format", MIN_EXAMPLES + 5: "image_in_assistant_message",
                MIN_EXAMPLES + 6: "too_many_images", MIN_EXAMPLES + 7: "invalid_image"}
        bad_upload(srv, jsonl(lines2), code="invalid_dataset", lines=exp2)
    nothing_persisted(srv, go)


def t_g11_odd_images_accepted(srv):
    pal = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (9, 9, 9)]
    imgs = {
        "1x1.png": png(1, 1), "2x2.png": png(2, 2), "wide.png": png(2000, 1), "tall.png": png(1, 2000),
        "g16.png": png(5, 5, color_type=0, bit_depth=16), "rgb16.png": png(5, 5, bit_depth=16),
        "ga.png": png(5, 5, color_type=4), "pal.png": png(5, 5, color_type=3, palette=pal), "rgba.png": png(5, 5, color_type=6),
    }
    for f in ("exact.png", "gray.png", "palette.png", "rgba.png", "tiny.png", "wide.png", "tall.jpg", "photo.jpg"):
        imgs["fx/" + f] = fixture_bytes("images", f)
    names = sorted(imgs)
    lines = [example(n) for n in names]
    d = expect(upload(srv, jsonl(lines), make_tar([(n, imgs[n]) for n in names])), 201).json()
    assert d["examples"] == len(names) and d["images"] == len(names)


# ======================================================================
# A: adapters
# ======================================================================

def st_file(header, data=b""):
    h = json.dumps(header).encode()
    import struct as _s
    return _s.pack("<Q", len(h)) + h + data


def t_a1_to_a4_corrupt_weights(srv):
    cfg, w = adapter_files()
    import struct as _s
    n = _s.unpack("<Q", w[:8])[0]
    hdr = json.loads(w[8:8 + n])
    key = next(k for k in hdr if k != "__metadata__")
    def with_entry(**kv):
        h = dict(hdr)
        e = dict(h[key]); e.update(kv); h[key] = e
        return st_file(h, w[8 + n:])
    cases = [b"", b"\x01", b"\x00" * 7, _s.pack("<Q", len(w)) + w[8:], _s.pack("<Q", 2 ** 64 - 1) + w[8:],
             _s.pack("<Q", 200 * 1000 * 1000) + w[8:], _s.pack("<Q", 4) + b"[1,2]",
             _s.pack("<Q", 4) + b"{\xff\xfe}", _s.pack("<Q", 3) + b"{a:", _s.pack("<Q", 2002) + b"{" + b'"a":[' * 400 + b" " * 1,
             w[:8] + w[8:8 + n].replace(key.encode(), key.encode(), 1) + w[8 + n:] + b"trailing",
             w[:-4],
             with_entry(data_offsets=[8, 4]), with_entry(data_offsets=[-4, 4]), with_entry(dtype="Q7"),
             with_entry(shape=[2 ** 40, 2 ** 40]), with_entry(shape=[1]),
             st_file(dict(hdr, **{"dup": hdr[key]}), w[8 + n:])]
    # duplicate tensor names in raw JSON
    raw = w[8:8 + n].decode()
    dup_hdr = raw[:-1] + ',"%s":%s}' % (key, json.dumps(hdr[key]))
    cases.append(_s.pack("<Q", len(dup_hdr)) + dup_hdr.encode() + w[8 + n:])
    # a zero-size tensor reusing another tensor's offset
    z = dict(hdr); z["zero"] = {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
    cases.append(st_file(z, w[8 + n:]))
    def go():
        for i, bad in enumerate(cases):
            r = upload_adapter(srv, "bad-%d" % i, cfg, bad)
            assert r.status == 400 and r.code == "adapter_corrupt", (i, r)
    nothing_persisted(srv, go)


def t_a5_a6_incompatible(srv):
    import struct as _s
    cfg, w = adapter_files()
    n = _s.unpack("<Q", w[:8])[0]
    hdr = json.loads(w[8:8 + n])
    data = w[8 + n:]
    keys = [k for k in hdr if k != "__metadata__"]
    a_key = "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight"
    assert a_key in keys

    def rebuild(mut):
        h = json.loads(json.dumps(hdr))
        d = bytearray(data)
        mut(h, d)
        return st_file(h, bytes(d))

    def drop_b(h, d):
        bk = a_key.replace("lora_A", "lora_B")
        e = h.pop(bk)
        b, e2 = e["data_offsets"]
        # keep the buffer tiled: turn the hole into a tensor of an unknown module
        h["base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_B.bias"] = e

    def rename(h, d):
        h[a_key.replace("q_proj", "zz_proj").replace("layers.0.", "layers.0.")] = h.pop(a_key)

    def wrong_module(h, d):
        h[a_key.replace("language_model.layers.0", "language_model.layers.99")] = h.pop(a_key)
        bk = a_key.replace("lora_A", "lora_B")
        h[bk.replace("language_model.layers.0", "language_model.layers.99")] = h.pop(bk)

    def nan(h, d):
        b, _ = h[a_key]["data_offsets"]
        d[b:b + 4] = _s.pack("<f", float("nan"))

    def zero_b(h, d):
        for k in keys:
            if k.endswith("lora_B.weight"):
                b, e = h[k]["data_offsets"]
                d[b:e] = b"\x00" * (e - b)

    def lm_head(h, d):
        h["base_model.model.lm_head.lora_A.weight"] = h.pop(a_key)
        bk = a_key.replace("lora_A", "lora_B")
        h["base_model.model.lm_head.lora_B.weight"] = h.pop(bk)

    weight_cases = [rebuild(drop_b), rebuild(rename), rebuild(wrong_module), rebuild(nan), rebuild(zero_b), rebuild(lm_head)]
    c = json.loads(cfg)
    cfg_cases = [b"", b"{", json.dumps(dict(c, r=8)).encode(), json.dumps(dict(c, r=0)).encode(),
                 json.dumps(dict(c, r=100000)).encode(), json.dumps(dict(c, peft_type="IA3")).encode(),
                 json.dumps(dict(c, use_dora=True)).encode(), json.dumps(dict(c, lora_alpha=-1)).encode(),
                 json.dumps(dict(c, modules_to_save=["lm_head"])).encode()]
    def go():
        for i, bad in enumerate(weight_cases):
            r = upload_adapter(srv, "inc-%d" % i, cfg, bad)
            assert r.status == 400 and r.code == "adapter_incompatible", (i, r)
        r = upload_adapter(srv, "inc-z", cfg, weight_cases[4])
        assert "change nothing" in r.json()["error"]["message"], r
        r = upload_adapter(srv, "inc-w", cfg, weight_cases[2])
        assert "does not exist in the base model" in r.json()["error"]["message"], r
        for i, bad in enumerate(cfg_cases):
            r = upload_adapter(srv, "cfg-%d" % i, bad, w)
            assert r.status == 400 and r.code in ("adapter_corrupt", "adapter_incompatible"), (i, r)
        for name in ("../x", "a/b", "a b", ".hidden", "x" * 65, "dense"):
            r = upload_adapter(srv, name, cfg, w)
            assert r.status in (400, 409), (name, r)
        expect(srv.post_multipart("/v1/adapters", [("name", "ok"), ("config", "c.json", cfg)]), 400, "missing_parameter")
    nothing_persisted(srv, go)


# ======================================================================
# process level
# ======================================================================

def t_restart_keeps_state_and_gc(binary):
    srv = Server(binary, extra=["--min-examples", str(MIN_EXAMPLES), "--no-train"])
    ds = expect(upload(srv, good_dataset()[0], good_dataset()[1]), 201).json()["id"]
    assert srv.stop() == 0, "SIGTERM should exit 0"
    # leftovers of an interrupted upload and a half-published dataset
    os.makedirs(os.path.join(srv.data, "tmp", "up-stale"), exist_ok=True)
    open(os.path.join(srv.data, "tmp", "up-stale", "part0"), "w").write("x")
    os.makedirs(os.path.join(srv.data, "datasets", ".tmp-ds_half"))
    os.makedirs(os.path.join(srv.data, "datasets", "ds_orphan"))
    srv2 = Server(binary, data=srv.data, extra=["--min-examples", str(MIN_EXAMPLES), "--no-train"])
    try:
        expect(srv2.get("/v1/datasets/" + ds), 200)
        assert srv2.tmp_entries() == []
        assert sorted(os.listdir(os.path.join(srv.data, "datasets"))) == [ds]
    finally:
        srv2.stop()


def t_f13_database_busy(srv):
    """Another process holds the write lock past the busy timeout: 503, then recovery."""
    import sqlite3
    c = sqlite3.connect(os.path.join(srv.data, "gemmaforge.db"), timeout=10, isolation_level=None)
    c.execute("BEGIN IMMEDIATE")
    try:
        def go():
            r = expect(srv.post_json(JOBS, {"dataset": srv.ready_dataset}), 503, "database_busy")
            assert int(r.headers["retry-after"]) > 0
            expect(srv.get("/healthz"), 200)
        nothing_persisted(srv, go)
    finally:
        c.execute("ROLLBACK")
        c.close()
    expect(srv.get("/v1/datasets/" + srv.ready_dataset), 200)


def t_f13_read_only_data_dir(binary):
    """A data directory the server cannot write (a read-only mount) is refused
    at start, naming the path, instead of a server that answers reads and
    fails every write with an unexplained 500; a fresh one too; the database
    is left as it was. Needs root to bind-mount (skipped otherwise)."""
    import hashlib
    srv = Server(binary, extra=["--min-examples", str(MIN_EXAMPLES), "--no-train"])
    ds = expect(upload(srv, good_dataset()[0], good_dataset()[1]), 201).json()["id"]
    assert srv.stop() == 0
    db = os.path.join(srv.data, "gemmaforge.db")
    before = hashlib.sha256(open(db, "rb").read()).hexdigest()
    fresh = tempfile.mkdtemp(prefix="gf-api-ro-fresh-")
    mounts = []
    try:
        for src in (srv.data, fresh):
            mnt = tempfile.mkdtemp(prefix="gf-api-ro-")
            if subprocess.run(["mount", "--bind", src, mnt], stderr=subprocess.DEVNULL).returncode:
                print("  SKIPPED: a read-only bind mount needs root")
                return
            mounts.append(mnt)
            assert subprocess.run(["mount", "-o", "remount,ro,bind", mnt]).returncode == 0
            p = subprocess.run([binary, "serve", "--data", mnt, "--port", "0", "--no-train",
                                "--model", os.path.join(FIXTURES, "dense")], capture_output=True, timeout=120)
            err = p.stderr.decode()
            assert p.returncode == 1 and not p.stdout.startswith(b"listening"), (p.returncode, p.stdout, err)
            assert mnt in err and "Read-only file system" in err, err
            assert ("cannot be written" if src == srv.data else "cannot create") in err, err
        assert hashlib.sha256(open(db, "rb").read()).hexdigest() == before, "the read-only start changed the database"
        assert os.listdir(fresh) == []
    finally:
        for mnt in mounts:
            subprocess.run(["umount", mnt])
            os.rmdir(mnt)
        shutil.rmtree(fresh, True)
    srv2 = Server(binary, data=srv.data, extra=["--min-examples", str(MIN_EXAMPLES), "--no-train"])
    try:
        expect(srv2.get("/v1/datasets/" + ds), 200)
    finally:
        srv2.stop()


def t_no_keys_configured(binary):
    srv = Server(binary, keys=(), model=False)
    try:
        expect(srv.get("/v1/models", key=None), 200)
        r = expect(srv.get("/readyz", key=None), 503, error_shape=False)
        assert "--model" in r.json()["model"]["reason"] and r.headers.get("retry-after")
        assert expect(srv.get("/v1/models", key=None), 200).json()["data"] == []
    finally:
        srv.stop()


def t_preflight(srv):
    """The training memory estimate and module list before a job is queued."""
    train = json.loads(fixture_bytes("dense", "lora_all", "train.json"))
    hp = {"lora_rank": 4, "lora_alpha": 8, "target_modules": "all-linear", "quantization": "nf4", "max_seq_len": 512,
          "lora_dropout": 0}
    a = expect(srv.post_json("/v1/fine_tuning/preflight", {"hyperparameters": hp}), 200).json()
    assert a["trainable_parameters"] == train["n_trainable"] and len(a["modules"]) == 56, a
    assert any("vision_tower" in m for m in a["modules"]) and not any("lm_head" in m for m in a["modules"]), a
    m = a["memory_bytes"]
    assert m["total"] == (m["base_weights"] + m["adapter_training_state"] + m["activations"] + m["vision_tower"]
                          + m["backend_scratch"]), m
    # weights, gradients (and their norm's double), AdamW's m and v: float32
    assert m["adapter_training_state"] == 16 * train["n_trainable"] + 8 and m["vision_tower"] > 0, m
    # the CPU kinds keep no scratch of their own; CUDA counts its workspaces at least
    on_gpu = expect(srv.get("/readyz"), 200).json()["model"]["device"].startswith("cuda")
    assert (m["backend_scratch"] > 0) if on_gpu else (m["backend_scratch"] == 0), m
    b = expect(srv.post_json("/v1/fine_tuning/preflight", {"hyperparameters": dict(hp, quantization="none",
                                                                                      max_seq_len=1024)}), 200).json()
    assert b["memory_bytes"]["base_weights"] > m["base_weights"], (a, b)
    assert b["memory_bytes"]["activations"] > m["activations"], (a, b)
    # dropout adds its scratch: two floats per input of the widest adapted linear
    d = expect(srv.post_json("/v1/fine_tuning/preflight", {"hyperparameters": dict(hp, lora_dropout=0.1)}), 200).json()
    extra = d["memory_bytes"]["adapter_training_state"] - m["adapter_training_state"]
    assert extra > 0 and extra % 8 == 0 and d["memory_bytes"]["total"] == m["total"] + extra, (m, d)
    r = expect(srv.post_json("/v1/fine_tuning/preflight", {"hyperparameters": {"lora_rank": 0}}), 400,
               "invalid_hyperparameter")
    assert r.json()["error"]["param"] == "hyperparameters.lora_rank", r


def read_sse(sock, until_event, timeout=20):
    """Reads a chunked SSE response from sock until an event named
    until_event; returns [(id, event, data)] and the raw head."""
    sock.settimeout(timeout)
    raw = b""
    t0 = time.time()
    while b"event: %s\n" % until_event.encode() not in raw or not raw.endswith(b"\r\n"):
        chunk = sock.recv(65536)
        if not chunk or time.time() - t0 > timeout:
            break
        raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    text = b""
    while body:  # de-chunk
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        text, body = text + rest[:size], rest[size + 2:]
    events = []
    for block in text.decode().split("\n\n"):
        if not block.strip():
            continue
        f = dict(line.split(": ", 1) for line in block.split("\n"))
        events.append((int(f["id"]) if "id" in f else None, f["event"], json.loads(f["data"])))
    return events, head


def t_job_events_follow(srv):
    """Accept: text/event-stream follows a job's events: the stored ones at
    once, then each new one as it is committed (here: a cancel), then an end
    event with the final status; ?after= and Last-Event-ID resume."""
    job = expect(srv.post_json("/v1/fine_tuning/jobs", {"dataset": srv.ready_dataset}), 201).json()["id"]
    polled = expect(srv.get("/v1/fine_tuning/jobs/%s/events" % job), 200).json()["data"]
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    s.sendall(b"GET /v1/fine_tuning/jobs/%s/events HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAuthorization: Bearer %s\r\n"
              b"Accept: text/event-stream\r\n\r\n" % (job.encode(), srv.port, KEY.encode()))
    time.sleep(0.3)
    expect(srv.post_json("/v1/fine_tuning/jobs/%s/cancel" % job, {}), 200)
    events, head = read_sse(s, "end")
    s.close()
    assert b"200 OK" in head and b"text/event-stream" in head, head
    assert [e[0] for e in events[:len(polled)]] == [p["seq"] for p in polled], (events, polled)
    assert events[0][2] == polled[0], (events[0], polled[0])
    assert any(e[1] == "status" and "cancel" in e[2]["message"].lower() for e in events[len(polled):]), events
    assert events[-1][1] == "end" and events[-1][2] == {"status": "cancelled", "reason": "job_ended"}, events[-1]
    seqs = [e[0] for e in events if e[0] is not None]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), seqs
    # resuming after the first event gives the rest
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    s.sendall(b"GET /v1/fine_tuning/jobs/%s/events HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAuthorization: Bearer %s\r\n"
              b"Accept: text/event-stream\r\nLast-Event-ID: %d\r\n\r\n" % (job.encode(), srv.port, KEY.encode(), seqs[0]))
    again, _ = read_sse(s, "end")
    s.close()
    assert [e[0] for e in again if e[0] is not None] == seqs[1:], (again, seqs)
    expect(srv.get("/v1/fine_tuning/jobs/job_nope/events", headers={"Accept": "text/event-stream"}), 404)


def t_openapi_covers_every_route(srv):
    """api/openapi.json describes exactly the route table, the server serves
    it, and (through the harness) every JSON answer of these suites is checked
    against it."""
    routes = [json.loads(line) for line in subprocess.run([BIN, "routes"], capture_output=True, check=True).stdout.splitlines()]
    table = {(r["method"].lower(), r["pattern"]) for r in routes}
    described = {(m, p) for p, ops in OPENAPI["paths"].items() for m in ops}
    assert table == described, ("routes not described", sorted(table - described), "described, not routes", sorted(described - table))
    for r in routes:
        op = OPENAPI["paths"][r["pattern"]][r["method"].lower()]
        assert (op.get("security") == []) == (not r["auth"]), (r, op.get("security"))
    served = expect(srv.get("/v1/openapi.json"), 200)
    assert served.json() == OPENAPI
    expect(srv.get("/v1/openapi.json", key=None), 401, "missing_api_key")


def t_merge_export(srv):
    """POST /v1/adapters/{name}/merge runs as an export job whose download is
    exactly what `gemmaforge merge` writes for the same adapter."""
    src = os.path.join(FIXTURES, "dense", "lora_all", "adapter_final")
    cfg = open(os.path.join(src, "adapter_config.json"), "rb").read()
    weights = open(os.path.join(src, "adapter_model.safetensors"), "rb").read()
    expect(upload_adapter(srv, "merge-src", cfg, weights), 201)
    r = expect(srv.post_json("/v1/adapters/merge-src/merge", {}), 202).json()
    assert r["object"] == "export" and r["id"].startswith("exp_") and r["status"] == "queued", r
    assert r["adapter"] == "merge-src" and r["dtype"] == "auto" and r["download_url"] is None, r
    e = wait_export(srv, r["id"])
    assert e["status"] == "succeeded", e
    assert e["result"]["merged_tensors"] == 56 and e["result"]["shards"] == 1, e
    assert "qlora_gap" not in e["result"], "an uploaded adapter has no QLoRA run to compare with"
    assert e["progress"]["bytes_done"] == e["progress"]["bytes_total"] == e["result"]["bytes"] > 0, e
    assert e["download_url"] == "/v1/exports/%s/content" % r["id"] and e["finished_at"] >= e["started_at"] > 0, e
    assert [x["id"] for x in expect(srv.get("/v1/exports"), 200).json()["data"]][0] == r["id"]
    d = expect(srv.get(e["download_url"]), 200)
    assert d.headers["content-type"] == "application/x-tar"
    assert 'filename="merge-src-merged.tar"' in d.headers["content-disposition"], d.headers
    got = {m.name: tf.extractfile(m).read() for tf in [tarfile.open(fileobj=io.BytesIO(d.body))] for m in tf.getmembers()}
    cli = os.path.join(tempfile.mkdtemp(), "m")
    c = subprocess.run([BIN, "merge", "--model", os.path.join(FIXTURES, "dense"), "--adapter", src, "--out", cli],
                       capture_output=True, timeout=3600)
    assert c.returncode == 0, c.stderr
    want = {f: open(os.path.join(cli, f), "rb").read() for f in os.listdir(cli)}
    assert sorted(got) == sorted(want) and "model.safetensors.index.json" in got, (sorted(got), sorted(want))
    for f in want:
        assert got[f] == want[f], f
    # the same adapter as one GGUF file: the text model only, so an adapter of
    # the vision tower fails, saying why
    g = wait_export(srv, expect(srv.post_json("/v1/adapters/merge-src/merge", {"format": "gguf"}), 202).json()["id"])
    assert g["status"] == "failed" and g["kind"] == "gguf" and g["error"]["code"] == "unsupported_adapter", g
    assert "outside the text model" in g["error"]["message"] and g["download_url"] is None, g
    assert not os.path.exists(os.path.join(srv.data, "exports", g["id"]))
    lm = os.path.join(FIXTURES, "dense", "lora_lm", "adapter_final")
    expect(upload_adapter(srv, "merge-lm", open(os.path.join(lm, "adapter_config.json"), "rb").read(),
                          open(os.path.join(lm, "adapter_model.safetensors"), "rb").read()), 201)
    q = expect(srv.post_json("/v1/adapters/merge-lm/merge", {"format": "gguf", "dtype": "q8_0"}), 202).json()
    assert q["kind"] == "gguf" and q["dtype"] == "q8_0", q
    q = wait_export(srv, q["id"])
    assert q["status"] == "succeeded" and q["result"]["merged_tensors"] == 40, q
    d = expect(srv.get(q["download_url"]), 200)
    assert d.headers["content-type"] == "application/octet-stream" and 'filename="merge-lm.gguf"' in d.headers["content-disposition"]
    cli_gguf = os.path.join(tempfile.mkdtemp(), "m.gguf")
    c = subprocess.run([BIN, "export-gguf", "--model", os.path.join(FIXTURES, "dense"), "--adapter", lm, "--out", cli_gguf,
                        "--type", "q8_0"], capture_output=True, timeout=3600)
    assert c.returncode == 0, c.stderr
    assert d.body == open(cli_gguf, "rb").read() and d.body[:4] == b"GGUF"
    expect(srv.request("DELETE", "/v1/exports/" + q["id"]), 200)
    expect(srv.request("DELETE", "/v1/exports/" + g["id"]), 200)
    # errors
    bad = expect(srv.post_json("/v1/adapters/merge-src/merge", {"format": "onnx"}), 400, "invalid_value")
    assert bad.json()["error"]["param"] == "format"
    bad = expect(srv.post_json("/v1/adapters/merge-src/merge", {"format": "gguf", "dtype": "auto"}), 400, "invalid_value")
    assert bad.json()["error"]["param"] == "dtype"
    expect(srv.post_json("/v1/adapters/nope/merge", {}), 404, "adapter_not_found")
    expect(srv.post_json("/v1/adapters/merge-src/merge", {"dtype": "f8"}), 400, "invalid_value")
    expect(srv.post_json("/v1/adapters/merge-src/merge", {"dtyp": "f16"}), 400)
    expect(srv.get("/v1/exports/exp_nope"), 404, "export_not_found")
    expect(srv.post_json("/v1/exports/%s/cancel" % r["id"], None), 409, "export_not_cancellable")
    # delete: row and files
    out_dir = os.path.join(srv.data, "exports", r["id"])
    assert os.path.isdir(out_dir)
    expect(srv.request("DELETE", "/v1/exports/" + r["id"]), 200)
    assert not os.path.exists(out_dir) and not os.listdir(os.path.join(srv.data, "exports"))
    expect(srv.get("/v1/exports/" + r["id"]), 404, "export_not_found")
    expect(srv.get(e["download_url"]), 404, "export_not_found")


def t_merge_export_queue(binary):
    """Exports wait for a server that runs them (--no-export here): one per
    adapter at a time, cancel and delete rules, and a server that runs
    exports picks up what was queued or left running by a crash."""
    src = os.path.join(FIXTURES, "dense", "lora_lm", "adapter_final")
    cfg = open(os.path.join(src, "adapter_config.json"), "rb").read()
    weights = open(os.path.join(src, "adapter_model.safetensors"), "rb").read()
    srv = Server(binary, extra=["--no-train", "--no-export"])
    try:
        expect(upload_adapter(srv, "qa", cfg, weights), 201)
        expect(upload_adapter(srv, "qb", cfg, weights), 201)
        idem = {"Idempotency-Key": "merge-qa-1"}
        a = expect(srv.post_json("/v1/adapters/qa/merge", {"dtype": "f32"}, headers=idem), 202).json()
        again = expect(srv.post_json("/v1/adapters/qa/merge", {"dtype": "f32"}, headers=idem), 202).json()
        assert again["id"] == a["id"], (again, a)
        r = expect(srv.post_json("/v1/adapters/qa/merge", {}), 409, "export_running")
        assert a["id"] in r.json()["error"]["message"]
        b = expect(srv.post_json("/v1/adapters/qb/merge", {}), 202).json()
        expect(srv.get("/v1/exports/%s/content" % a["id"]), 409, "export_not_ready")
        expect(srv.request("DELETE", "/v1/exports/" + a["id"]), 409, "export_running")
        c = expect(srv.post_json("/v1/exports/%s/cancel" % b["id"], None), 200).json()
        assert c["status"] == "cancelled" and c["finished_at"], c
        expect(srv.request("DELETE", "/v1/exports/" + b["id"]), 200)
        data = srv.data
    finally:
        srv.stop()
    # what a crash leaves: the export marked running, a published but
    # unrecorded output and a hidden partial directory
    db = sqlite3.connect(os.path.join(data, "gemmaforge.db"))
    db.execute("UPDATE exports SET status='running', started_at=1 WHERE id=?", (a["id"],))
    db.commit()
    db.close()
    os.makedirs(os.path.join(data, "exports", a["id"]))
    open(os.path.join(data, "exports", a["id"], "model-00001-of-00001.safetensors"), "wb").write(b"stale")
    os.makedirs(os.path.join(data, "exports", ".%s.partial-abc123" % a["id"]))
    srv = Server(binary, extra=["--no-train"], data=data)
    try:
        e = wait_export(srv, a["id"])
        assert e["status"] == "succeeded" and e["dtype"] == "f32", e
        assert sorted(os.listdir(os.path.join(data, "exports"))) == [a["id"]]
        d = expect(srv.get(e["download_url"]), 200)
        got = {m.name: tf.extractfile(m).read() for tf in [tarfile.open(fileobj=io.BytesIO(d.body))] for m in tf.getmembers()}
        cli = os.path.join(tempfile.mkdtemp(), "m")
        c = subprocess.run([binary, "merge", "--model", os.path.join(FIXTURES, "dense"), "--adapter", src, "--out", cli,
                            "--dtype", "f32"], capture_output=True, timeout=3600)
        assert c.returncode == 0, c.stderr
        assert got == {f: open(os.path.join(cli, f), "rb").read() for f in os.listdir(cli)}
    finally:
        srv.stop()


def main():
    runner = Runner()
    # jobs stay queued here (their lifecycle through training is tests/api/test_training.py)
    srv = Server(BIN, extra=["--min-examples", str(MIN_EXAMPLES), "--max-upload-bytes", str(UPLOAD_MAX), "--no-train"])
    try:
        for name, fn in [(n, f) for n, f in globals().items() if n.startswith("t_")]:
            uses_binary = fn.__code__.co_varnames[:1] == ("binary",)
            runner.run(name, fn, BIN if uses_binary else srv)
        assert srv.alive(), "server died during the tests"
    finally:
        rc = srv.stop()
    if rc != 0:
        print("server exited with %s" % rc)
        runner.failed.append("server exit status")
    return runner.finish()


if __name__ == "__main__":
    sys.exit(main())
