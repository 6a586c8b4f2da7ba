"""Renders bootstrap/ into a TPU worker's instance metadata (docs/infrastructure.md, "Bootstrap").

The VM's guest agent runs the `startup-script` attribute on every boot; that script (bootstrap/startup.sh)
reads the other `actfleet-*` attributes written here: which release (pinned commit) to install from the
bucket, which worker it is, where the fleet config lives, and the systemd unit to install. The repository's
URL is not among them: a VM never fetches the repository (a private one works, and no credential-bearing URL
reaches a VM or its logs).
"""

from __future__ import annotations

import re
from importlib import resources

from actfleet.config import Config, Worker
from actfleet.errors import ConfigError

# bootstrap/ is package data (actfleet.bootstrap): found the same way in a checkout, an editable install
# and a wheel installed anywhere.
BOOTSTRAP_FILES = ("startup.sh", "actfleet-worker.service")


def bootstrap_dir():
    return resources.files("actfleet.bootstrap")


def bootstrap_file(name: str) -> bytes:
    return bootstrap_dir().joinpath(name).read_bytes()


def startup_script() -> str:
    return bootstrap_file("startup.sh").decode()


def worker_unit() -> str:
    return bootstrap_file("actfleet-worker.service").decode()


def config_object_name(config: Config) -> str:
    """Where the base stack uploads fleet.toml inside the activations bucket (workers read it at boot)."""
    return f"actfleet/{config.fleet.id}/fleet.toml"


def config_url(config: Config) -> str:
    return f"gs://{config.storage.bucket}/{config_object_name(config)}"


def release_object_prefix(config: Config) -> str:
    """Where `actfleet release` publishes the pinned commit's release inside the activations bucket (with "/")."""
    return f"actfleet/releases/{config.repo.commit}/"


def release_url(config: Config) -> str:
    return f"gs://{config.storage.bucket}/{release_object_prefix(config)}"


# The attributes startup.sh writes into files (worker.env, paths): one printable line each, so that no value can
# add a line (`LD_PRELOAD=...`) to the worker's environment file. startup.sh checks the same on the VM.
_ONE_LINE = re.compile(r"[\x21-\x7e]+")
MULTILINE_KEYS = ("startup-script", "actfleet-unit")


def worker_metadata(
    config: Config, worker: Worker, *, script: str | None = None, unit: str | None = None
) -> dict[str, str]:
    """The metadata attributes of one worker. `script`/`unit` default to the files in bootstrap/; the stack
    passes references to one shared copy instead so the synthesized JSON does not repeat them per worker."""
    values = {
        "actfleet-worker": worker.name,
        "actfleet-fleet": config.fleet.id,
        "actfleet-commit": config.repo.commit,
        "actfleet-release": release_url(config),
        "actfleet-config": config_url(config),
        "actfleet-job": config.job.name,
        "actfleet-store": config.job.store,
    }
    for key, value in values.items():
        if not _ONE_LINE.fullmatch(value):
            raise ConfigError(
                f"{config.source}: instance metadata {key} = {value!r}: must be one line of printable characters "
                f"without spaces (it is written into the worker's environment file)"
            )
    return {
        "startup-script": startup_script() if script is None else script,
        "actfleet-unit": worker_unit() if unit is None else unit,
        **values,
    }
