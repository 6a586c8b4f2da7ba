"""A loopback fake of the Google REST endpoints `actfleet preflight` reads, answering as the real ones do:

- Service Usage `GET /v1/projects/P/services/S` -> {"name", "state": "ENABLED" | "DISABLED"} (unknown: DISABLED,
  as the real API reports a service never enabled);
- Compute `GET /compute/v1/projects/P/global/networks/N` -> the network, or 404 {"error": {...}};
- Cloud Quotas `GET /v1/projects/P/locations/global/services/tpu.googleapis.com/quotaInfos/ID` -> a QuotaInfo
  whose `dimensionsInfos` hold a default (no dimensions) and per-zone values as int64 strings; 404 unknown id;
- IAM `POST /v1/projects/P/serviceAccounts/E:testIamPermissions` -> {"permissions": [the granted subset]}
  (an empty object when none is granted, as the real API answers), 404 for an account that does not exist;
- `deny(path_regex, status)`: answer matching requests with an error (e.g. 403 for a caller without
  serviceusage.services.get); a call log.

Use: `with FakeGoogleApis.start() as fake: os.environ["ACTFLEET_GOOGLE_API_ENDPOINT"] = fake.url`.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote


class FakeGoogleApis:
    def __init__(self):
        self.enabled: set[str] = set()
        self.networks: set[str] = set()  # "projects/P/global/networks/N"
        self.quotas: dict[str, dict[str, int]] = {}  # quota id -> {zone or "": value}
        self.accounts: set[str] = set()
        self.act_as: set[str] = set()  # accounts the caller may act as
        self.denied: list[tuple[str, int]] = []
        self.calls: list[tuple[str, str, int]] = []
        self.httpd: ThreadingHTTPServer | None = None
        self.url = ""

    @classmethod
    def start(cls) -> "FakeGoogleApis":
        fake = cls()
        handler = type("Handler", (_Handler,), {"fake": fake})
        fake.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        fake.url = f"http://127.0.0.1:{fake.httpd.server_address[1]}"
        threading.Thread(target=fake.httpd.serve_forever, daemon=True).start()
        return fake

    def stop(self) -> None:
        if self.httpd:
            self.httpd.shutdown()
            self.httpd.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def deny(self, path_regex: str, status: int = 403) -> None:
        self.denied.append((path_regex, status))

    def ready(self, project: str, network: str, zones: dict[str, int], quota_id: str, account: str) -> None:
        """A project where every preflight check passes for a fleet needing `zones` (zone -> units)."""
        self.enabled |= {f"{s}.googleapis.com" for s in ("compute", "tpu", "iam", "cloudresourcemanager", "storage")}
        self.networks.add(f"projects/{project}/global/networks/{network}")
        self.quotas[quota_id] = {"": 0, **zones}
        self.accounts.add(account)
        self.act_as.add(account)


class _Handler(BaseHTTPRequestHandler):
    fake: FakeGoogleApis

    def log_message(self, *args):
        pass

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.fake.calls.append((self.command, self.path, status))
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        self._send(status, {"error": {"code": status, "message": message, "status": "ERROR"}})

    def _route(self) -> None:
        path = unquote(self.path.split("?")[0])
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}") if length else {}
        for rx, status in self.fake.denied:
            if re.search(rx, path):
                return self._error(status, "The caller does not have permission")
        fake = self.fake
        if m := re.fullmatch(r"/v1/projects/([^/]+)/services/([^/]+)", path):
            state = "ENABLED" if m[2] in fake.enabled else "DISABLED"
            return self._send(200, {"name": f"projects/123/services/{m[2]}", "state": state})
        if m := re.fullmatch(r"/compute/v1/(projects/[^/]+/global/networks/[^/]+)", path):
            if m[1] not in fake.networks:
                return self._error(404, f"The resource '{m[1]}' was not found")
            return self._send(200, {"kind": "compute#network", "name": m[1].rsplit("/", 1)[1]})
        if m := re.fullmatch(
            r"/v1/projects/([^/]+)/locations/global/services/tpu\.googleapis\.com/quotaInfos/(\w+)", path
        ):
            values = fake.quotas.get(m[2])
            if values is None:
                return self._error(404, f"quota {m[2]} not found")
            infos = [{"dimensions": {"zone": z} if z else {}, "details": {"value": str(v)}} for z, v in values.items()]
            return self._send(200, {"quotaId": m[2], "service": "tpu.googleapis.com", "dimensionsInfos": infos})
        if m := re.fullmatch(r"/v1/projects/([^/]+)/serviceAccounts/([^/:]+):testIamPermissions", path):
            if m[2] not in fake.accounts:
                return self._error(404, f"Unknown service account {m[2]}")
            granted = [p for p in body.get("permissions", []) if m[2] in fake.act_as]
            return self._send(200, {"permissions": granted} if granted else {})
        self._error(404, f"no route for {self.command} {path}")

    do_GET = do_POST = _route
