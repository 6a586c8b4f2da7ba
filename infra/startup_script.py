"""Renders bootstrap/ into a TPU worker's instance metadata (docs/infrastructure.md, "Bootstrap").

The VM's guest agent runs the `startup-script` attribute on every boot; that script (bootstrap/startup.sh)
reads the other `actfleet-*` attributes written here: which repository and pinned commit to run, which
worker it is, where the fleet config lives, and the systemd unit to install.
"""

from __future__ import annotations

from importlib import resources

from actfleet.config import Config, Worker

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


def worker_metadata(
    config: Config, worker: Worker, *, script: str | None = None, unit: str | None = None
) -> dict[str, str]:
    """The metadata attributes of one worker. `script`/`unit` default to the files in bootstrap/; the stack
    passes references to one shared copy instead so the synthesized JSON does not repeat them per worker."""
    return {
        "startup-script": startup_script() if script is None else script,
        "actfleet-unit": worker_unit() if unit is None else unit,
        "actfleet-worker": worker.name,
        "actfleet-fleet": config.fleet.id,
        "actfleet-repo-url": config.repo.url,
        "actfleet-commit": config.repo.commit,
        "actfleet-config": config_url(config),
        "actfleet-job": config.job.name,
        "actfleet-store": config.job.store,
    }
