"""Small real release parts for tests: wheels made on the spot (valid PEP 427 zips with a RECORD, which pip
installs) and a hashed lock over them, so a release can be built and installed offline with --require-hashes."""

from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def make_wheel(
    directory: Path,
    name: str,
    version: str,
    files: dict[str, str | bytes],
    *,
    tag: str = "py3-none-any",
    console_scripts: dict[str, str] | None = None,
) -> Path:
    """A wheel `name-version-tag.whl` in `directory` holding `files` (archive path -> content)."""
    directory.mkdir(parents=True, exist_ok=True)
    dist = f"{name.replace('-', '_')}-{version}.dist-info"
    contents = {k: v.encode() if isinstance(v, str) else v for k, v in files.items()}
    contents[f"{dist}/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode()
    contents[f"{dist}/WHEEL"] = (
        f"Wheel-Version: 1.0\nGenerator: actfleet-tests\nRoot-Is-Purelib: true\nTag: {tag}\n".encode()
    )
    if console_scripts:
        lines = "".join(f"{k} = {v}\n" for k, v in console_scripts.items())
        contents[f"{dist}/entry_points.txt"] = f"[console_scripts]\n{lines}".encode()
    record = "".join(f"{k},{_record_hash(v)},{len(v)}\n" for k, v in contents.items()) + f"{dist}/RECORD,,\n"
    path = directory / f"{name.replace('-', '_')}-{version}-{tag}.whl"
    with zipfile.ZipFile(path, "w") as z:
        for k, v in contents.items():
            info = zipfile.ZipInfo(k, date_time=(2026, 1, 1, 0, 0, 0))
            info.external_attr = 0o755 << 16 if "/scripts/" in k else 0o644 << 16
            z.writestr(info, v)
        z.writestr(zipfile.ZipInfo(f"{dist}/RECORD", date_time=(2026, 1, 1, 0, 0, 0)), record)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def lock_text(pins: dict[str, tuple[str, list[Path]]]) -> str:
    """A uv-style hashed lock: name -> (version, files whose sha256s it lists)."""
    out = ["# test lock (uv pip compile --generate-hashes style)"]
    for name, (version, files) in sorted(pins.items()):
        hashes = " \\\n".join(f"    --hash=sha256:{sha256(f)}" for f in files)
        out.append(f"{name}=={version} \\\n{hashes}\n    # via test")
    return "\n".join(out) + "\n"
