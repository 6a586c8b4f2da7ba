"""Synthesized stacks, cached by what determines them, so that only a real change pays for cdktf.

Importing the jsii runtime and the provider bindings costs 15-25 s. The synthesized Terraform JSON is a
pure function of: the parsed config (plus the config file's text, which the base stack uploads), the TPU
endpoint in effect, where state lives, which `actfleet` the provisioners run, the files in bootstrap/, and
the infra code that builds the stacks. Their hash is the cache key:

    .actfleet/synth/<key>/stacks/base/cdk.tf.json
    .actfleet/synth/<key>/stacks/fleet/cdk.tf.json

A hit touches nothing but the file system: this module never imports cdktf itself (a test checks that).
Entries are written to a temporary directory and renamed into place, so readers never see half a synth.
Old entries are pruned (see KEEP_ENTRIES).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata as pkg_metadata
from pathlib import Path

from actfleet import accelerators
from actfleet.config import Config
from actfleet.infra.startup_script import BOOTSTRAP_FILES, bootstrap_dir
from actfleet.infra.synth_inputs import actfleet_command, config_text
from actfleet.infra.terraform_layout import FLEET, state_dir

SYNTH_DIR_ENV = "ACTFLEET_SYNTH_DIR"
DEFAULT_SYNTH_DIR = ".actfleet/synth"
# After a new synth, entries beyond the 8 most recently used AND unused for a day are removed (their
# .terraform dirs are not small); the age guard keeps an entry a long-running reconcile still applies from.
KEEP_ENTRIES = 8
PRUNE_AFTER_SECONDS = 86400

_INFRA = Path(__file__).resolve().parent
# Everything whose content changes the synthesized JSON (the bootstrap files are read as package data).
SYNTH_SOURCES = (
    tuple(
        _INFRA / name
        for name in (
            "stacks.py",
            "terraform_layout.py",
            "synth_inputs.py",
            "qr_request.py",
            "startup_script.py",
            "synth_cache.py",
            "bucket_access.py",
            "gce_instance.py",
            "release_id.py",
        )
    )
    + (Path(accelerators.__file__),)
    + tuple(bootstrap_dir() / name for name in BOOTSTRAP_FILES)
)
PINNED_PACKAGES = ("cdktf", "cdktf-cdktf-provider-google", "cdktf-cdktf-provider-google-beta")


@dataclass(frozen=True)
class Synth:
    key: str
    dir: Path  # contains stacks/{base,fleet}/cdk.tf.json
    cached: bool  # True when this call found it in the cache (no cdktf imported)
    seconds: float

    def stack_dir(self, name: str) -> Path:
        return self.dir / "stacks" / name


def synth_root(cache_dir: str | os.PathLike | None = None) -> Path:
    return Path(cache_dir or os.environ.get(SYNTH_DIR_ENV) or DEFAULT_SYNTH_DIR).resolve()


def cache_key(config: Config) -> str:
    h = hashlib.sha256()
    parts = {
        "config": _jsonable(dataclasses.asdict(dataclasses.replace(config, source=""))),
        "config_text": config_text(config),
        "endpoint": config.fleet.endpoint(),
        "compute_endpoint": config.fleet.compute_endpoint_url(),  # gce mode's provider endpoint
        "state_dir": str(state_dir(config)),
        "actfleet": actfleet_command(),
        "packages": {name: _version(name) for name in PINNED_PACKAGES},
    }
    h.update(json.dumps(parts, sort_keys=True).encode())
    for path in SYNTH_SOURCES:
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:20]


def synth(config: Config, *, cache_dir: str | os.PathLike | None = None, force: bool = False) -> Synth:
    """The synthesized stacks for `config`: from the cache, or built now (importing cdktf) and cached."""
    start = time.perf_counter()
    root = synth_root(cache_dir)
    key = cache_key(config)
    final = root / key
    if not force and (final / "stacks" / FLEET / "cdk.tf.json").is_file():
        os.utime(final)  # most recently used: kept by prune()
        return Synth(key, final, True, time.perf_counter() - start)

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
    try:
        _synth_into(config, tmp)
        (tmp / "actfleet-synth.json").write_text(
            json.dumps(
                {
                    "key": key,
                    "config": config.source,
                    "mode": config.fleet.mode,
                    "workers": len(config.fleet.workers),
                    "synthesized_at": time.time(),
                },
                indent=1,
            )
        )
        if force and final.exists():
            shutil.rmtree(final)
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished the same synth first: theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune(root, keep=KEEP_ENTRIES, protect=final)
    return Synth(key, final, False, time.perf_counter() - start)


def _synth_into(config: Config, outdir: Path) -> None:
    from actfleet.infra.stacks import build_app  # the expensive import (jsii + provider bindings)

    app = build_app(
        config, outdir, state_dir=state_dir(config), config_text=config_text(config), actfleet=actfleet_command()
    )
    app.synth()


def prune(root: Path, *, keep: int, protect: Path, min_age: float = PRUNE_AFTER_SECONDS) -> None:
    entries = sorted(
        (p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    now = time.time()
    for old in entries[keep:]:
        if old != protect and now - old.stat().st_mtime > min_age:
            shutil.rmtree(old, ignore_errors=True)


def _version(name: str) -> str:
    try:
        return pkg_metadata.version(name)
    except pkg_metadata.PackageNotFoundError:
        return "absent"


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
