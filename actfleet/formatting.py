"""Small formatters shared by several commands' outputs: bytes, UTC times, one-line error text."""

from __future__ import annotations

import time


def human_bytes(n: float) -> str:
    """1234567 -> '1.2 MB' (decimal units, as the GCS console and `gcloud storage du` print them)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def iso_utc(t: float) -> str:
    """Epoch seconds -> '2026-12-02T05:11:46Z' (what records and --json carry)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def one_line(e: object, limit: int = 500) -> str:
    """An exception (or any text) folded to one line for a table cell or a JSON field, at most `limit` chars."""
    return " ".join(str(e).split())[:limit]
