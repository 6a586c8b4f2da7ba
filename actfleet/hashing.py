"""sha256 over streams, in bounded chunks: dataset fingerprints, model files, shard checksums."""

from __future__ import annotations

import hashlib
from typing import BinaryIO

CHUNK = 1 << 22  # 4 MiB: large enough to be fast, small enough for any machine


def sha256_stream(f: BinaryIO) -> str:
    h = hashlib.sha256()
    for chunk in iter(lambda: f.read(CHUNK), b""):
        h.update(chunk)
    return h.hexdigest()


def sha256_file(path) -> str:
    with open(path, "rb") as f:
        return sha256_stream(f)
