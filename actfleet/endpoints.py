"""Which TPU API endpoints actfleet will talk to (docs/tpu-api.md, "Endpoint and credentials").

An https endpoint gets the operator's application default credentials, so an endpoint is a place a token is
sent: only Google's API hosts (any name under googleapis.com: tpu.googleapis.com, its mTLS and regional
names, private.googleapis.com / restricted.googleapis.com, Private Service Connect names like
tpu-NAME.p.googleapis.com) over https, and loopback (127.0.0.0/8, ::1, localhost; the tests' fakes and other
local stand-ins) over http or https. Anything else is refused by name, before any request is made.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

from actfleet.errors import ConfigError

GOOGLE_DOMAIN = "googleapis.com"
HOSTNAME = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*")
ALLOWED = f'https://*.{GOOGLE_DOMAIN} (e.g. "https://tpu.googleapis.com") or a loopback http(s)://127.0.0.1:PORT'


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def endpoint_problem(url: str) -> str | None:
    """Why `url` may not be a TPU API endpoint, or None when it may ("" means Google's default)."""
    if url == "":
        return None
    if not (url.isascii() and url.isprintable()) or " " in url:
        # urlsplit drops tabs and newlines before parsing; the client would not.
        return "must be printable ASCII without spaces"
    try:
        parts = urlsplit(url)
        host, _ = parts.hostname, parts.port  # .port raises on a port that is not a number in range
    except ValueError as e:
        return f"not a URL ({e})"
    if parts.scheme not in ("http", "https") or not host:
        return f"must be {ALLOWED}"
    if "@" in parts.netloc:  # userinfo: "https://tpu.googleapis.com@evil.example" is evil.example
        return "must not carry a user name or password"
    if parts.path not in ("", "/") or parts.query or parts.fragment or url.endswith(("?", "#")):
        return f"must be a scheme and host only, without a path or query ({ALLOWED})"
    if is_loopback(host):
        return None
    if not HOSTNAME.fullmatch(host):  # no backslash or percent tricks the HTTP stack might read otherwise
        return f"host {host!r} is not a DNS name; must be {ALLOWED}"
    if host.endswith("." + GOOGLE_DOMAIN) and parts.scheme == "https":
        return None
    if host.endswith("." + GOOGLE_DOMAIN):
        return "Google's endpoints only over https"
    return f"host {host!r} is neither a Google API host nor loopback; must be {ALLOWED}"


def check_endpoint(url: str, what: str) -> str:
    """`url` unchanged, or ConfigError (exit 2) naming `what`, e.g. '$ACTFLEET_TPU_ENDPOINT'."""
    problem = endpoint_problem(url)
    if problem is not None:
        raise ConfigError(f'{what} "{url}": {problem}')
    return url
