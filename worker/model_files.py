"""Find a model's files: a local directory, a `gs://bucket/prefix` (downloaded once to a cache), or the hub.

Whatever the source, the result is a local directory with config.json, the tokenizer and safetensors
weights, checked up front so a missing or corrupt model fails at start with one line naming what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from actfleet.errors import InputError, disk_full_error, is_disk_full

# actfleet.worker.models.FAMILIES, listed here so checking a directory imports no JAX (a test keeps them equal).
SUPPORTED_MODEL_TYPES = ("gemma2", "gemma3", "gemma3_text", "gpt2", "gpt_neox", "llama", "mistral", "qwen2", "qwen3")


def cache_root() -> Path:
    return Path(os.environ.get("ACTFLEET_MODEL_CACHE") or Path.home() / ".cache" / "actfleet" / "models")


def resolve(model_ref: str, *, revision: str = "main") -> Path:
    """A checked local model directory for `model_ref` (path, file:// URL, gs:// prefix or hub id)."""
    if model_ref.startswith("gs://"):
        path = _download_gcs(model_ref)
    elif model_ref.startswith("file://"):
        path = Path(model_ref[len("file://") :])
    elif not is_hub_id(model_ref):
        path = Path(model_ref)
    else:
        path = _download_hub(model_ref, revision)
    check(path, model_ref)
    return path


def is_hub_id(model_ref: str) -> bool:
    """ "org/name" that is not a local path: a Hugging Face hub model id."""
    if model_ref.startswith(("gs://", "file://", ".", "/")) or model_ref.count("/") != 1:
        return False
    return not Path(model_ref).exists()


def check(path: Path, ref: str | None = None) -> None:
    """Raise InputError naming the first thing a usable model directory lacks."""
    ref = ref or str(path)
    if not path.is_dir():
        raise InputError(f"model {ref}: no such directory")
    config = path / "config.json"
    if not config.is_file():
        raise InputError(f"model {ref}: config.json is missing")
    try:
        conf = json.loads(config.read_text())
        model_type = conf["model_type"]
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"model {ref}: config.json is corrupt ({type(e).__name__}: {e})") from None
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise InputError(
            f"model {ref}: model_type {model_type!r} is not supported ({', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    if not (path / "tokenizer.json").is_file() and not (path / "vocab.json").is_file():
        raise InputError(f"model {ref}: tokenizer.json is missing")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError) as e:
            raise InputError(f"model {ref}: model.safetensors.index.json is corrupt ({e})") from None
        for f in sorted(files):
            if not (path / f).is_file():
                raise InputError(f"model {ref}: weight file {f} (listed in the index) is missing")
    elif not (path / "model.safetensors").is_file():
        raise InputError(f"model {ref}: model.safetensors is missing (only safetensors weights are loaded)")


def _download_gcs(url: str) -> Path:
    from google.cloud import storage

    from actfleet.store import parse_gs

    bucket_name, prefix = parse_gs(url, "model")
    try:
        client = storage.Client()
        blobs = [
            b for b in client.list_blobs(bucket_name, prefix=prefix + "/" if prefix else "") if not b.name.endswith("/")
        ]
        if not blobs:
            raise InputError(f"model {url}: no objects under that prefix")
        # One cache entry per set of object generations: a replaced object is a new entry, never a stale hit.
        generations = hashlib.sha256(json.dumps(sorted((b.name, int(b.generation)) for b in blobs)).encode())
        dest = cache_root() / "gcs" / bucket_name / prefix / f"@{generations.hexdigest()[:16]}"
        done = dest / ".complete"
        if done.is_file():
            return dest
        for blob in blobs:
            target = _inside(dest, blob.name[len(prefix) :].lstrip("/"), url)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.part")
            blob.download_to_filename(str(tmp))  # this generation (the listing's): if replaced since, it fails
            tmp.replace(target)
    except InputError:
        raise
    except Exception as e:  # google.api_core errors, auth errors: one line
        if is_disk_full(e):  # this machine's cache is full: not bad input (exit 74, not 2)
            raise disk_full_error(e, f"caching model {url} in") from None
        raise InputError(f"model {url}: cannot download ({type(e).__name__}: {e})") from None
    done.write_text("")
    return dest


def _inside(dest: Path, rel: str, url: str) -> Path:
    """dest/rel, refusing object names that would land outside the cache (`..` parts, absolute names)."""
    parts = rel.split("/")
    target = (dest / rel).resolve()
    if not rel or any(p in ("", ".", "..") for p in parts) or not target.is_relative_to(dest.resolve()):
        raise InputError(f"model {url}: object name {rel!r} would be written outside the model cache; refusing")
    return target


def _download_hub(repo_id: str, revision: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                repo_id, revision=revision, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]
            )
        )
    except Exception as e:
        if is_disk_full(e):  # this machine's cache is full: not bad input (exit 74, not 2)
            raise disk_full_error(e, f"caching model {repo_id} in") from None
        raise InputError(
            f"model {repo_id}: not a local directory and not downloadable from the hub ({type(e).__name__})"
        ) from None
