"""Test harness for the gemmaforge API: starts the real server binary on a
loopback port with a temporary data directory, talks HTTP to it, and checks
the database and the data directory afterwards. Standard library only."""
import atexit
import base64
import http.client
import io
import json
import os
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback
import uuid
import zlib

KEY = "test-key-0123456789abcdef"
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures")
OPENAPI = json.load(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "api", "openapi.json")))


# ---- safetensors files, as the engine's tests read them ---------------------

def safetensors_raw(path):
    """name -> (dtype, shape, bytes) of a safetensors file."""
    data = open(path, "rb").read()
    n = struct.unpack("<Q", data[:8])[0]
    return {k: (m["dtype"], m["shape"], data[8 + n + m["data_offsets"][0]:8 + n + m["data_offsets"][1]])
            for k, m in json.loads(data[8:8 + n]).items() if k != "__metadata__"}


def write_st(path, tensors):
    """A safetensors file of tensors: a list of (name, dtype, shape, raw bytes)."""
    header, off = {}, 0
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(raw)]}
        off += len(raw)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for t in tensors:
            f.write(t[3])


def bf16_floats(raw):
    h = struct.unpack("<%dH" % (len(raw) // 2), raw)
    return struct.unpack("<%df" % len(h), struct.pack("<%dI" % len(h), *[x << 16 for x in h]))


def read_st(path):
    """name -> (shape, values) of a safetensors file of BF16, F32, I64 and U8 tensors."""
    out = {}
    for name, (dtype, shape, raw) in safetensors_raw(path).items():
        if dtype == "BF16":
            out[name] = (shape, bf16_floats(raw))
            continue
        fmt = {"F32": "f", "I64": "q", "U8": "B"}[dtype]
        out[name] = (shape, struct.unpack("<%d%s" % (len(raw) // struct.calcsize(fmt), fmt), raw))
    return out


# ---- every JSON answer checked against api/openapi.json ------------------------

def _schema_errors(value, schema, where="$"):
    """The ways value breaks schema (the JSON Schema subset openapi.json uses:
    $ref, type (incl. lists and "null"), const, enum, pattern, properties,
    required, items, oneOf)."""
    if "$ref" in schema:
        schema = OPENAPI["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    if "oneOf" in schema:
        ok = [s for s in schema["oneOf"] if not _schema_errors(value, s, where)]
        return [] if len(ok) == 1 else ["%s: matches %d of oneOf" % (where, len(ok))]
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    kind = "integer" if isinstance(value, int) and not isinstance(value, bool) else \
        "number" if isinstance(value, float) else names.get(type(value), "?")
    errs = []
    if "type" in schema:
        allowed = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if kind not in allowed and not (kind == "integer" and "number" in allowed) and \
                not (kind == "number" and "integer" in allowed and float(value).is_integer()):
            return ["%s: %s is not %s" % (where, kind, "/".join(allowed))]
    if "const" in schema and value != schema["const"]:
        errs.append("%s: %r is not %r" % (where, value, schema["const"]))
    if "enum" in schema and value not in schema["enum"]:
        errs.append("%s: %r not in %r" % (where, value, schema["enum"]))
    if "pattern" in schema and isinstance(value, str):
        import re
        if not re.search(schema["pattern"], value):
            errs.append("%s: %r does not match %s" % (where, value, schema["pattern"]))
    if isinstance(value, dict):
        for k in schema.get("required", []):
            if k not in value:
                errs.append("%s: no %r" % (where, k))
        for k, sub in schema.get("properties", {}).items():
            if k in value:
                errs += _schema_errors(value[k], sub, where + "." + k)
    if isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            errs += _schema_errors(v, schema["items"], "%s[%d]" % (where, i))
    return errs


def _operation(method, path):
    path = path.split("?", 1)[0]
    for pattern, ops in OPENAPI["paths"].items():
        a, b = pattern.strip("/").split("/"), path.strip("/").split("/")
        if len(a) == len(b) and all(x == y or (x.startswith("{") and y) for x, y in zip(a, b)):
            return ops.get(method.lower())
    return None


def check_against_openapi(method, path, status, headers, body):
    """Raises AssertionError when a JSON answer is not what openapi.json says
    (the route's schema for that status, or the error schema)."""
    if not headers.get("content-type", "").startswith("application/json") or not body:
        return
    op = _operation(method, path)
    responses = op["responses"] if op else {"default": OPENAPI["paths"]["/v1/datasets"]["get"]["responses"]["default"]}
    r = responses.get(str(status)) or responses.get("default")
    assert r, "%s %s: status %d is not described in openapi.json" % (method, path, status)
    schema = r.get("content", {}).get("application/json", {}).get("schema")
    assert schema, "%s %s: a JSON answer with status %d that openapi.json does not describe" % (method, path, status)
    errs = _schema_errors(json.loads(body), schema)
    assert not errs, "%s %s -> %d does not match openapi.json: %s" % (method, path, status, "; ".join(errs[:5]))


def default_device(binary):
    """The device a server runs on when none is named: the first GPU, else the CPU."""
    out = subprocess.run([binary, "devices"], capture_output=True, text=True).stdout
    return "cuda" if any(line.startswith("cuda0 ") for line in out.splitlines()) else "cpu"


class Server:
    def __init__(self, binary, extra=(), model=True, keys=(KEY,), data=None, wrap=()):
        """wrap: a command the server runs under (e.g. fiu-run -x); its pid stays the server's."""
        self.binary = binary
        if not data:  # removed when the test process ends (a restarted server may reuse it until then)
            data = tempfile.mkdtemp(prefix="gf-api-")
            atexit.register(shutil.rmtree, data, True)
        self.data = data
        args = list(wrap) + [binary, "serve", "--data", self.data, "--port", "0", "--timeout", "3"]
        if model:
            args += ["--model", os.path.join(FIXTURES, "dense")]
        for k in keys:
            args += ["--api-key", k]
        args += list(extra)
        self.log = open(os.path.join(tempfile.gettempdir(), "gf-server-%d.log" % os.getpid()), "ab")
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self.log)
        line = self.proc.stdout.readline().decode()
        if not line.startswith("listening on"):
            raise RuntimeError("server did not start: %r" % line)
        self.port = int(line.strip().rsplit(":", 1)[1])

    def stop(self, sig=signal.SIGTERM):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                return self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                raise
        return self.proc.returncode

    def alive(self):
        return self.proc.poll() is None

    def rss(self):
        """The server's resident set size in bytes (Linux /proc)."""
        for line in open("/proc/%d/status" % self.proc.pid):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS for the server")

    # ---- HTTP ----------------------------------------------------------
    def request(self, method, path, body=None, headers=None, key=KEY, timeout=30):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        h = {"Host": "127.0.0.1:%d" % self.port}
        if key:
            h["Authorization"] = "Bearer " + key
        h.update(headers or {})
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            h.setdefault("Content-Type", "application/json")
        try:
            conn.request(method, path, body=body, headers=h)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered early (413) and closed; its answer is still readable
        r = conn.getresponse()
        data = r.read()
        conn.close()
        headers = dict((k.lower(), v) for k, v in r.getheaders())
        check_against_openapi(method, path, r.status, headers, data)
        return Resp(r.status, headers, data)

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post_json(self, path, obj, **kw):
        return self.request("POST", path, body=obj, **kw)

    def post_multipart(self, path, fields, **kw):
        body, ctype = multipart(fields)
        headers = kw.pop("headers", {})
        headers["Content-Type"] = ctype
        return self.request("POST", path, body=body, headers=headers, **kw)

    def raw(self, data, timeout=5, read_all=True):
        """Sends raw bytes; returns what the server answered (b'' if closed)."""
        s = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        try:
            s.sendall(data)
            out = b""
            while True:
                try:
                    chunk = s.recv(65536)
                except (socket.timeout, ConnectionResetError):
                    break
                if not chunk:
                    break
                out += chunk
                if not read_all and b"\r\n\r\n" in out:
                    break
            return out
        finally:
            s.close()

    def send_pieces(self, method, path, body, headers, cuts=(), pause=0.001, timeout=30):
        """Sends one request over its own socket (headers: a dict; Host,
        Content-Length and Connection: close added) whose body goes out in
        pieces split at the given offsets, with a pause between them so the
        server reads them apart; returns (status, body) of the answer. A
        socket error (a reset while sending) is raised as the client sees it."""
        head = "%s %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Length: %d\r\nConnection: close\r\n%s\r\n" % (
            method, path, self.port, len(body), "".join("%s: %s\r\n" % kv for kv in headers.items()))
        s = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        try:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.sendall(head.encode())
            last = 0
            for c in list(cuts) + [len(body)]:
                if c > last:
                    s.sendall(body[last:c])
                    last = c
                    time.sleep(pause)
            out = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
        finally:
            s.close()
        head, _, payload = out.partition(b"\r\n\r\n")
        return int(head.split(b" ", 2)[1]), payload

    # ---- persistence checks -------------------------------------------
    def db(self):
        return sqlite3.connect("file:%s/gemmaforge.db?mode=ro" % self.data, uri=True, timeout=10)

    def snapshot(self):
        c = self.db()
        counts = {t: c.execute("SELECT COUNT(*) FROM %s" % t).fetchone()[0]
                  for t in ("datasets", "jobs", "job_events", "adapters", "checkpoints", "idempotency")}
        check = c.execute("PRAGMA quick_check").fetchone()[0]
        c.close()
        files = set()
        for sub in ("datasets", "adapters", "jobs"):
            for root, dirs, fs in os.walk(os.path.join(self.data, sub)):
                for f in fs + dirs:
                    files.add(os.path.relpath(os.path.join(root, f), self.data))
        return {"counts": counts, "quick_check": check, "files": files}

    def tmp_entries(self):
        return os.listdir(os.path.join(self.data, "tmp"))


class Resp:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)

    @property
    def code(self):
        try:
            return self.json()["error"]["code"]
        except Exception:
            return None

    def __repr__(self):
        return "<%d %s>" % (self.status, self.body[:300])


def multipart(fields):
    """fields: list of (name, value) or (name, filename, bytes)."""
    boundary = "gfboundary" + uuid.uuid4().hex
    out = io.BytesIO()
    for f in fields:
        out.write(b"--" + boundary.encode() + b"\r\n")
        if len(f) == 2:
            name, value = f
            out.write(b'Content-Disposition: form-data; name="%s"\r\n\r\n' % name.encode())
            out.write(value if isinstance(value, bytes) else value.encode())
        else:
            name, filename, data = f
            out.write(b'Content-Disposition: form-data; name="%s"; filename="%s"\r\n' % (name.encode(), filename.encode()))
            out.write(b"Content-Type: application/octet-stream\r\n\r\n")
            out.write(data)
        out.write(b"\r\n")
    out.write(b"--" + boundary.encode() + b"--\r\n")
    return out.getvalue(), "multipart/form-data; boundary=" + boundary


# ---- test data ---------------------------------------------------------

def png(width, height, color_type=2, bit_depth=8, pixel=lambda x, y: (x * 7 % 256, y * 13 % 256, 90),
        palette=None, extra_chunks=(), bad_crc=False, ihdr_size=None):
    """A PNG encoder for tests: color types 0, 2, 3, 4, 6 at 8 or 16 bits."""
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[color_type]
    rows = []
    for y in range(height):
        row = bytearray([0])
        for x in range(width):
            p = pixel(x, y)
            vals = [p[0]] if channels == 1 else ([p[0], 200] if channels == 2 else
                                                  (list(p[:3]) + ([128] if channels == 4 else [])))
            if color_type == 3:
                vals = [(x + y) % len(palette)]
            for v in vals:
                row += struct.pack(">H", v * 257) if bit_depth == 16 else bytes([v])
        rows.append(bytes(row))
    raw = zlib.compress(b"".join(rows))

    def chunk(kind, data, corrupt=False):
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        if corrupt:
            crc ^= 0xFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    w, h = ihdr_size or (width, height)
    out = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0))
    if palette:
        out += chunk(b"PLTE", b"".join(bytes(c) for c in palette))
    for k, d in extra_chunks:
        out += chunk(k, d)
    out += chunk(b"IDAT", raw, corrupt=bad_crc) + chunk(b"IEND", b"")
    return out


def fixture_bytes(*parts):
    with open(os.path.join(FIXTURES, *parts), "rb") as f:
        return f.read()


def make_tar(members, fmt=tarfile.PAX_FORMAT):
    """members: list of (name, bytes) or TarInfo-producing tuples (name, bytes, type, linkname)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        for m in members:
            name, data = m[0], m[1]
            info = tarfile.TarInfo(name)
            if len(m) > 2:
                info.type = m[2]
                info.linkname = m[3] if len(m) > 3 else ""
                t.addfile(info)
                continue
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def example(image=None, text="What colour is this?", answer="red", system=None):
    msgs = []
    if system:
        msgs.append({"role": "system", "content": system})
    content = [{"type": "text", "text": text}]
    if image is not None:
        content.insert(0, {"type": "image", "image": image})
    msgs.append({"role": "user", "content": content})
    msgs.append({"role": "assistant", "content": answer})
    return json.dumps({"messages": msgs})


def jsonl(lines):
    return ("\n".join(lines) + "\n").encode()


def data_url(data, mime="image/png"):
    return "data:%s;base64,%s" % (mime, base64.b64encode(data).decode())


# ---- runner ------------------------------------------------------------

class Runner:
    def __init__(self):
        self.passed = 0
        self.failed = []

    def run(self, name, fn, *args):
        t = time.time()
        try:
            fn(*args)
            self.passed += 1
            print("ok   %-60s %.2fs" % (name, time.time() - t), flush=True)
        except Exception:
            self.failed.append(name)
            print("FAIL %s\n%s" % (name, traceback.format_exc()), flush=True)

    def finish(self):
        print("\n%d passed, %d failed" % (self.passed, len(self.failed)))
        for n in self.failed:
            print("  failed: " + n)
        return 1 if self.failed else 0


def expect(resp, status, code=None, error_shape=True):
    assert resp.status == status, "expected %d %s, got %r" % (status, code, resp)
    if code is not None:
        assert resp.code == code, "expected code %s, got %r" % (code, resp)
    if status >= 400 and error_shape:
        e = resp.json()["error"]
        assert set(e) >= {"type", "code", "message", "param"}, e
        assert "/tmp" not in e["message"] and "SELECT" not in e["message"] and "INSERT" not in e["message"], e
    return resp


def metric_lines(srv):
    """name{labels} -> value of every sample of one /metrics answer (one snapshot)."""
    text = expect(srv.get("/metrics"), 200).body.decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def wait_export(srv, eid, bound_s=3600):
    """Polls an export until it ends (a hang guard, not a deadline)."""
    t = time.time()
    while True:
        e = expect(srv.get("/v1/exports/" + eid), 200).json()
        if e["status"] not in ("queued", "running"):
            return e
        assert time.time() - t < bound_s, e
        time.sleep(0.1)


class Acked:
    """The writes a server acknowledged (check_store_whole), across restarts."""

    def __init__(self):
        self.lock = threading.Lock()
        self.datasets, self.adapters, self.exports = {}, {}, set()


def check_store_whole(srv, acked, when):
    """The data directory holds together (after a kill or injected faults,
    `when` says which): integrity_check passes, every write in acked (an
    Acked) is there whole, no dataset, adapter or export directory lacks its
    row (an export rerun since the start may be writing its hidden partial
    directory), no row lacks its files, tmp/ is empty. The directories are
    listed before the database is read: the export worker may be publishing
    meanwhile."""
    d = srv.data
    listed = {sub: os.listdir(os.path.join(d, sub)) for sub in ("datasets", "adapters", "exports")}
    c = srv.db()
    assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok", when
    rows = {t: {r[0] for r in c.execute(q)} for t, q in (
        ("datasets", "SELECT id FROM datasets"), ("adapters", "SELECT name FROM adapters"),
        ("exports", "SELECT id FROM exports"), ("jobs", "SELECT id FROM jobs"))}
    export_status = dict(c.execute("SELECT id, status FROM exports"))
    c.close()
    with acked.lock:
        for ds, (nj, nt) in acked.datasets.items():
            assert ds in rows["datasets"], "%s: acknowledged dataset %s lost" % (when, ds)
            assert os.path.getsize(os.path.join(d, "datasets", ds, "data.jsonl")) == nj, ds
            assert os.path.getsize(os.path.join(d, "datasets", ds, "images.tar")) == nt, ds
        for name, nw in acked.adapters.items():
            assert name in rows["adapters"], "%s: acknowledged adapter %s lost" % (when, name)
            assert os.path.getsize(os.path.join(d, "adapters", name, "adapter_model.safetensors")) == nw, name
        for e in acked.exports:
            assert e in rows["exports"], "%s: acknowledged export %s lost" % (when, e)
    for sub in ("datasets", "adapters"):
        for entry in listed[sub]:
            assert entry in rows[sub], "%s: %s/%s has no row" % (when, sub, entry)
    for entry in listed["exports"]:
        # an export rerun since the start writes a hidden partial directory, renamed into place when done
        partial = entry.startswith(".") and ".partial-" in entry
        eid = entry[1:].split(".partial-")[0] if partial else entry
        status = export_status.get(eid)
        ok = status in ("succeeded", "running") and not (partial and status == "succeeded" and
                                                         os.path.exists(os.path.join(d, "exports", entry)))
        assert ok, "%s: exports/%s is left over (export %s)" % (when, entry, status)
    for ds in rows["datasets"]:
        assert os.path.exists(os.path.join(d, "datasets", ds, "data.jsonl")), "%s: dataset %s lost its file" % (when, ds)
    for name in rows["adapters"]:
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            assert os.path.exists(os.path.join(d, "adapters", name, f)), "%s: adapter %s lost %s" % (when, name, f)
    assert srv.tmp_entries() == [], "%s: tmp/ holds %s" % (when, srv.tmp_entries())
