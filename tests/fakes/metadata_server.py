"""A GCE metadata server stand-in on loopback: instance attributes over HTTP, only to requests that carry
`Metadata-Flavor: Google` (as the real one insists), with a log of what was asked and answered."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterator


@contextmanager
def serve_attributes(lookup: Callable[[str], "bytes | None"]) -> Iterator[tuple[str, list[tuple[str, int]]]]:
    """Yields (the attributes URL, [(key, status), ...] served); `lookup(key)` gives an attribute's bytes or None
    (404)."""
    served: list[tuple[str, int]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            key = self.path.rsplit("/", 1)[-1]
            body = lookup(key) if self.headers.get("Metadata-Flavor") == "Google" else None
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
