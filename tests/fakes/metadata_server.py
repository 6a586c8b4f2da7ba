"""A GCE metadata server stand-in on loopback: instance attributes over HTTP, only to requests that carry
`Metadata-Flavor: Google` (as the real one insists), with a log of what was asked and answered; with `token`,
also the attached service account's access token at .../instance/service-accounts/default/token (JSON, as
the real server answers it)."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterator


@contextmanager
def serve_attributes(
    lookup: Callable[[str], "bytes | None"], token: str | None = None
) -> Iterator[tuple[str, list[tuple[str, int]]]]:
    """Yields (the attributes URL, [(key, status), ...] served); `lookup(key)` gives an attribute's bytes or None
    (404); the token is served as key "token"."""
    import json

    token_json = (
        None if token is None else json.dumps({"access_token": token, "expires_in": 3599, "token_type": "Bearer"})
    )
    served: list[tuple[str, int]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            key = self.path.rsplit("/", 1)[-1]
            if self.path.endswith("/instance/service-accounts/default/token"):
                body = None if token_json is None else token_json.encode()
            elif "/instance/attributes/" in self.path:
                body = lookup(key)
            else:
                body = None
            if self.headers.get("Metadata-Flavor") != "Google":
                status, body = 403, b"missing Metadata-Flavor header"
            elif body is None:
                status, body = 404, b"not found"
            else:
                status = 200
            served.append((key, status))
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/computeMetadata/v1/instance/attributes", served
    finally:
        server.shutdown()
