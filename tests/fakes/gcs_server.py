"""A Google Cloud Storage JSON-API server on loopback that ENFORCES generation preconditions.

gcp-storage-emulator speaks the API but ignores `ifGenerationMatch` (a second create with
`if_generation_match=0` succeeds on it), so the lease and lock paths cannot be tested against it. This
server implements the part of the API google-cloud-storage uses, with the preconditions GCS applies:

- objects: get metadata, download (`alt=media`, `/download/...`, with `Range`; `media` records the bytes
  each download sent, per object, so tests can see what a reader fetched), delete, list with
  prefix / delimiter / pageToken / maxResults; upload by `uploadType=media`, `multipart` and `resumable`
  (chunked PUTs with Content-Range; the preconditions are evaluated when the upload is finalized);
- `ifGenerationMatch` (0 = must not exist), `ifGenerationNotMatch`, `ifMetagenerationMatch`,
  `ifMetagenerationNotMatch` -> 412 when they fail; `x-goog-generation` / `x-goog-hash` headers on downloads;
- buckets exist on first use; generations are strictly increasing per server;
- fault injection: `fail_after_next(method, n, status)` carries out the next n `method` requests (POST for
  uploads, DELETE, ...) and then answers `status` anyway, as a reply lost after the write landed (the client
  retries a request that already succeeded);
- its own clock: `clock_offset` seconds from this machine's (the server stamps objects' `updated` and the
  `Date` header of every response with it, as GCS does with Google's), and `backdate(bucket, name, s)`
  makes an object look written `s` seconds earlier (time passing for the store alone);
- fault injection: `fail_next(n, status)` answers the next n requests with `status` (e.g. 503) so retries
  and "a failed upload never marks work done" can be tested.

Use: `fake = FakeGcs.start(port=0); os.environ["STORAGE_EMULATOR_HOST"] = fake.url; ...; fake.stop()`,
or the `fake_gcs` pytest fixture (which sets and restores STORAGE_EMULATOR_HOST).
Run standalone: `python -m tests.fakes.gcs_server --port 9023`.
"""

from __future__ import annotations

import base64
import datetime
import email.utils
import hashlib
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlparse

import google_crc32c

_SYSTEM_TIME = time.time  # taken at import: a test that fakes time.time for a client leaves the server's alone


@dataclass
class _Object:
    bucket: str
    name: str
    data: bytes
    generation: int
    metageneration: int
    content_type: str
    updated: str

    def resource(self, base_url: str) -> dict:
        crc = base64.b64encode(google_crc32c.Checksum(self.data).digest()).decode()
        md5 = base64.b64encode(hashlib.md5(self.data).digest()).decode()
        path = f"/storage/v1/b/{self.bucket}/o/{quote(self.name, safe='')}"
        return {
            "kind": "storage#object",
            "id": f"{self.bucket}/{self.name}/{self.generation}",
            "selfLink": base_url + path,
            "mediaLink": f"{base_url}/download{path}?generation={self.generation}&alt=media",
            "name": self.name,
            "bucket": self.bucket,
            "generation": str(self.generation),
            "metageneration": str(self.metageneration),
            "contentType": self.content_type,
            "size": str(len(self.data)),
            "md5Hash": md5,
            "crc32c": crc,
            "etag": f"{self.generation}",
            "timeCreated": self.updated,
            "updated": self.updated,
            "storageClass": "STANDARD",
        }

    def hash_header(self) -> str:
        crc = base64.b64encode(google_crc32c.Checksum(self.data).digest()).decode()
        md5 = base64.b64encode(hashlib.md5(self.data).digest()).decode()
        return f"crc32c={crc},md5={md5}"


class _Failed(Exception):
    def __init__(self, status: int, message: str):
        self.status, self.message = status, message


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # clients that hang up (killed processes, closed pools) are normal here


class FakeGcs:
    """The server's state (objects by (bucket, name)) and its lifecycle."""

    def __init__(self):
        self.objects: dict[tuple[str, str], _Object] = {}
        self.uploads: dict[str, dict] = {}
        self.lock = threading.Lock()
        self._next_generation = 1_700_000_000_000_000
        self._faults: list[int] = []
        self._after_faults: list[tuple[str, str, int]] = []  # (method, regex on the unquoted URL, status)
        self.requests = 0
        self.media: dict[str, list[int]] = {}  # object name -> bytes sent per download (ranged or whole)
        # When set, like GCS for a private bucket: a request without `Authorization: Bearer <bearer>` gets 401.
        self.bearer: str | None = None
        self.httpd: ThreadingHTTPServer | None = None
        self.url = ""
        self.clock_offset = 0.0  # the server's clock minus this machine's, seconds

    def now(self) -> float:
        """The server's clock (what GCS's `updated` and `Date` say): this machine's real clock plus the offset,
        whatever a test does to `time.time` in its own process (a client's faked clock is not the server's)."""
        return _SYSTEM_TIME() + self.clock_offset

    def backdate(self, bucket: str, name: str, seconds: float) -> None:
        """Make an object's last write `seconds` older by the server's clock."""
        with self.lock:
            obj = self.objects[(bucket, name)]
            t = datetime.datetime.strptime(obj.updated, "%Y-%m-%dT%H:%M:%S.%fZ") - datetime.timedelta(seconds=seconds)
            obj.updated = t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    # -- lifecycle ------------------------------------------------------------------------------------

    @classmethod
    def start(cls, port: int = 0, host: str = "127.0.0.1") -> "FakeGcs":
        fake = cls()
        handler = type("Handler", (_Handler,), {"fake": fake})
        fake.httpd = _Server((host, port), handler)
        fake.url = f"http://{host}:{fake.httpd.server_address[1]}"
        threading.Thread(target=fake.httpd.serve_forever, name="fake-gcs", daemon=True).start()
        return fake

    def stop(self) -> None:
        if self.httpd:
            self.httpd.shutdown()
            self.httpd.server_close()

    def fail_next(self, n: int, status: int = 503) -> None:
        """Answer the next `n` requests with `status` (transient-fault injection)."""
        with self.lock:
            self._faults += [status] * n

    def fail_after_next(self, method: str, n: int = 1, status: int = 503, match: str = "") -> None:
        """Carry out the next `n` requests of `method` (GET/POST/PUT/DELETE/PATCH) whose unquoted URL
        matches the regex `match` (e.g. "job/done/"), then answer `status`: a reply lost after success."""
        with self.lock:
            self._after_faults += [(method.upper(), match, status)] * n

    def _take_after_fault(self, method: str, url: str) -> int | None:
        with self.lock:
            for i, (m, rx, status) in enumerate(self._after_faults):
                if m == method and re.search(rx, url):
                    del self._after_faults[i]
                    return status
            return None

    # -- state transitions (all under self.lock) ------------------------------------------------------

    def _take_fault(self) -> int | None:
        with self.lock:
            self.requests += 1
            return self._faults.pop(0) if self._faults else None

    @staticmethod
    def check_preconditions(obj: _Object | None, q: dict[str, str]) -> None:
        gen = obj.generation if obj else 0
        if "ifGenerationMatch" in q and int(q["ifGenerationMatch"]) != gen:
            raise _Failed(412, f"ifGenerationMatch={q['ifGenerationMatch']} but generation is {gen}")
        if "ifGenerationNotMatch" in q and int(q["ifGenerationNotMatch"]) == gen:
            raise _Failed(412 if obj else 404, f"ifGenerationNotMatch={q['ifGenerationNotMatch']}")
        for k, want_equal in (("ifMetagenerationMatch", True), ("ifMetagenerationNotMatch", False)):
            if k in q:
                if obj is None:
                    raise _Failed(412, f"{k} on a missing object")
                if (int(q[k]) == obj.metageneration) != want_equal:
                    raise _Failed(412, f"{k}={q[k]} but metageneration is {obj.metageneration}")

    def write(self, bucket: str, name: str, data: bytes, content_type: str, q: dict[str, str]) -> _Object:
        with self.lock:
            current = self.objects.get((bucket, name))
            self.check_preconditions(current, q)
            self._next_generation += 1
            now = datetime.datetime.fromtimestamp(self.now(), datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            obj = _Object(bucket, name, data, self._next_generation, 1, content_type or "application/octet-stream", now)
            self.objects[(bucket, name)] = obj
            return obj

    def get(self, bucket: str, name: str, q: dict[str, str]) -> _Object:
        with self.lock:
            obj = self.objects.get((bucket, name))
            if obj is not None and "generation" in q and int(q["generation"]) != obj.generation:
                obj = None  # versioning is off: only the live generation exists
            if obj is None and not any(k.startswith("if") for k in q):
                raise _Failed(404, f"No such object: {bucket}/{name}")
            self.check_preconditions(obj, q)
            if obj is None:
                raise _Failed(404, f"No such object: {bucket}/{name}")
            return obj

    def delete(self, bucket: str, name: str, q: dict[str, str]) -> None:
        with self.lock:
            obj = self.objects.get((bucket, name))
            if obj is None:
                raise _Failed(404, f"No such object: {bucket}/{name}")
            self.check_preconditions(obj, q)
            del self.objects[(bucket, name)]

    def list(self, bucket: str, q: dict[str, str]) -> dict:
        prefix, delimiter = q.get("prefix", ""), q.get("delimiter", "")
        page_size = int(q.get("maxResults", "1000"))
        start = q.get("pageToken", "")
        with self.lock:
            names = sorted(n for (b, n) in self.objects if b == bucket and n.startswith(prefix))
            items, prefixes = [], set()
            for n in names:
                if start and n <= start:
                    continue
                if delimiter:
                    cut = n.find(delimiter, len(prefix))
                    if cut >= 0:
                        prefixes.add(n[: cut + len(delimiter)])
                        continue
                items.append(self.objects[(bucket, n)])
                if not delimiter and len(items) > page_size:
                    break  # a page is enough (prefixes, with a delimiter, are collected to the end)
        out: dict = {"kind": "storage#objects"}
        if len(items) > page_size:
            items = items[:page_size]
            out["nextPageToken"] = items[-1].name
        out["items"] = [o.resource(self.url) for o in items]
        if prefixes:
            out["prefixes"] = sorted(prefixes)
        return out


class _Handler(BaseHTTPRequestHandler):
    fake: FakeGcs
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out separately: no 40 ms delayed-ACK stall per request

    def log_message(self, *args):  # quiet
        pass

    def date_time_string(self, timestamp=None):  # the Date header: the server's clock
        return email.utils.formatdate(self.fake.now() if timestamp is None else timestamp, usegmt=True)

    # -- plumbing -------------------------------------------------------------------------------------

    def _query(self) -> tuple[str, dict[str, str]]:
        u = urlparse(self.path)
        return u.path, {k: v[-1] for k, v in parse_qs(u.query, keep_blank_values=True).items()}

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, body: bytes = b"", ctype: str = "application/json", headers: dict | None = None):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: dict, headers: dict | None = None):
        self._send(status, json.dumps(obj).encode(), headers=headers)

    def _error(self, status: int, message: str):
        self._json(
            status,
            {
                "error": {
                    "code": status,
                    "message": message,
                    "errors": [{"message": message, "reason": _REASONS.get(status, "error")}],
                }
            },
        )

    def _dispatch(self):
        body = self._body()  # always drain the request so keep-alive connections stay in sync
        fault = self.fake._take_fault()
        if fault:
            return self._error(fault, "injected fault")
        if self.fake.bearer is not None and self.headers.get("Authorization") != f"Bearer {self.fake.bearer}":
            return self._error(401, "Anonymous caller does not have storage.objects.get access")
        path, q = self._query()
        after = self.fake._take_after_fault(self.command, unquote(self.path))
        try:
            for method, rx, fn in _ROUTES:
                if method == self.command:
                    m = re.fullmatch(rx, path)
                    if m:
                        if after:  # do the work, lose the reply
                            real_send, self._send = self._send, lambda *a, **k: None
                            try:
                                fn(self, body, q, *[unquote(g) for g in m.groups()])
                            except _Failed:
                                pass
                            finally:
                                self._send = real_send
                            return self._error(after, "injected fault after the request was carried out")
                        return fn(self, body, q, *[unquote(g) for g in m.groups()])
            self._error(404, f"no route for {self.command} {path}")
        except _Failed as e:
            self._error(e.status, e.message)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _dispatch

    # -- routes ---------------------------------------------------------------------------------------

    def get_bucket(self, body, q, bucket):
        self._json(200, {"kind": "storage#bucket", "name": bucket, "id": bucket, "metageneration": "1"})

    def create_bucket(self, body, q):
        name = json.loads(body or b"{}").get("name", "")
        self._json(200, {"kind": "storage#bucket", "name": name, "id": name, "metageneration": "1"})

    def get_object(self, body, q, bucket, name, media=False):
        obj = self.fake.get(bucket, name, q)
        if q.get("alt") != "media" and not media:
            return self._json(200, obj.resource(self.fake.url))
        headers = {
            "x-goog-generation": str(obj.generation),
            "x-goog-metageneration": str(obj.metageneration),
            "x-goog-hash": obj.hash_header(),
            "x-goog-stored-content-length": str(len(obj.data)),
            "ETag": str(obj.generation),
        }
        data, status = obj.data, 200
        rng = self.headers.get("Range")
        if rng:
            m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
            if not m:
                raise _Failed(416, f"bad Range {rng!r}")
            size = len(obj.data)
            if m[1] == "":
                first, last = max(0, size - int(m[2])), size - 1
            else:
                first, last = int(m[1]), min(int(m[2]) if m[2] else size - 1, size - 1)
            if first >= size and size:
                raise _Failed(416, "range not satisfiable")
            data, status = obj.data[first : last + 1], 206
            headers["Content-Range"] = f"bytes {first}-{last}/{size}"
            del headers["x-goog-hash"]  # the hash describes the whole object
        with self.fake.lock:
            self.fake.media.setdefault(name, []).append(len(data))
        self._send(status, data, ctype=obj.content_type, headers=headers)

    def download_object(self, body, q, bucket, name):
        self.get_object(body, q, bucket, name, media=True)

    def delete_object(self, body, q, bucket, name):
        self.fake.delete(bucket, name, q)
        self._send(204)

    def list_objects(self, body, q, bucket):
        self._json(200, self.fake.list(bucket, q))

    def upload(self, body, q, bucket):
        kind = q.get("uploadType", "media")
        if kind == "media":
            name = q.get("name") or ""
            obj = self.fake.write(bucket, name, body, self.headers.get("Content-Type", ""), q)
            return self._json(200, obj.resource(self.fake.url))
        if kind == "multipart":
            meta, data, ctype = _parse_multipart(self.headers.get("Content-Type", ""), body)
            name = meta.get("name") or q.get("name") or ""
            obj = self.fake.write(bucket, name, data, meta.get("contentType") or ctype, q)
            return self._json(200, obj.resource(self.fake.url))
        if kind == "resumable":
            meta = json.loads(body or b"{}")
            upload_id = uuid.uuid4().hex
            with self.fake.lock:
                self.fake.uploads[upload_id] = {
                    "bucket": bucket,
                    "name": meta.get("name") or q.get("name", ""),
                    "q": q,
                    "data": bytearray(),
                    "ctype": meta.get("contentType", ""),
                }
            location = f"{self.fake.url}/upload/storage/v1/b/{bucket}/o?uploadType=resumable&upload_id={upload_id}"
            return self._send(200, b"", headers={"Location": location})
        raise _Failed(400, f"unknown uploadType {kind!r}")

    def upload_chunk(self, body, q, bucket):
        up = self.fake.uploads.get(q.get("upload_id", ""))
        if up is None:
            raise _Failed(404, "no such upload session")
        crange = self.headers.get("Content-Range", "")
        m = re.fullmatch(r"bytes (\*|(\d+)-(\d+))/(\*|\d+)", crange.strip()) if crange else None
        if crange and not m:
            raise _Failed(400, f"bad Content-Range {crange!r}")
        if m and m[2] is not None:
            if int(m[2]) != len(up["data"]):
                raise _Failed(400, f"chunk starts at {m[2]}, expected {len(up['data'])}")
        up["data"] += body
        total = m[4] if m else str(len(up["data"]))
        if total == "*" or int(total) > len(up["data"]):
            headers = {"Range": f"bytes=0-{len(up['data']) - 1}"} if up["data"] else {}
            return self._send(308, b"", headers=headers)
        obj = self.fake.write(up["bucket"], up["name"], bytes(up["data"]), up["ctype"], up["q"])
        with self.fake.lock:
            self.fake.uploads.pop(q.get("upload_id", ""), None)
        self._json(200, obj.resource(self.fake.url))


_OBJ = r"/storage/v1/b/([^/]+)/o/(.+)"
_ROUTES = [
    ("GET", r"/storage/v1/b/([^/]+)", _Handler.get_bucket),
    ("POST", r"/storage/v1/b", _Handler.create_bucket),
    ("GET", r"/storage/v1/b/([^/]+)/o", _Handler.list_objects),
    ("GET", _OBJ, _Handler.get_object),
    ("GET", r"/download" + _OBJ, _Handler.download_object),
    ("DELETE", _OBJ, _Handler.delete_object),
    ("POST", r"/upload/storage/v1/b/([^/]+)/o", _Handler.upload),
    ("PUT", r"/upload/storage/v1/b/([^/]+)/o", _Handler.upload_chunk),
]
_REASONS = {
    404: "notFound",
    412: "conditionNotMet",
    429: "rateLimitExceeded",
    503: "backendError",
    400: "invalid",
    416: "requestedRangeNotSatisfiable",
}


def _parse_multipart(content_type: str, body: bytes) -> tuple[dict, bytes, str]:
    """multipart/related: part 1 the JSON object resource, part 2 the media (binary-safe split)."""
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    if not m:
        raise _Failed(400, "multipart upload without a boundary")
    delim = b"--" + m[1].encode()
    parts = []
    for chunk in body.split(delim)[1:]:
        if chunk.startswith(b"--"):
            break
        head, _, payload = chunk.partition(b"\r\n\r\n")
        if payload.endswith(b"\r\n"):
            payload = payload[:-2]
        ctype = ""
        for line in head.decode("latin-1").split("\r\n"):
            if line.lower().startswith("content-type:"):
                ctype = line.split(":", 1)[1].strip()
        parts.append((ctype, payload))
    if len(parts) != 2:
        raise _Failed(400, f"multipart upload needs 2 parts, got {len(parts)}")
    return json.loads(parts[0][1] or b"{}"), parts[1][1], parts[1][0]


try:  # the fixture, when imported under pytest
    import pytest

    @pytest.fixture
    def fake_gcs(monkeypatch):
        """A started FakeGcs with STORAGE_EMULATOR_HOST pointing at it (child processes inherit it)."""
        fake = FakeGcs.start(port=0)
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", fake.url)
        monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "actfleet-test")
        yield fake
        fake.stop()
except ImportError:  # pragma: no cover
    pass


if __name__ == "__main__":
    import argparse
    import time

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--clock-offset", type=float, default=0.0, help="the server's clock minus this machine's, s")
    args = ap.parse_args()
    server = FakeGcs.start(port=args.port)
    server.clock_offset = args.clock_offset
    print(server.url, flush=True)
    while True:
        time.sleep(3600)
