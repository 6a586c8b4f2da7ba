"""Renders bootstrap/ into a TPU worker's instance metadata (DESIGN section 7).

The VM's guest agent runs the `startup-script` attribute on every boot; that script (bootstrap/startup.sh)
reads the other `actfleet-*` attributes written here: which repository and pinned commit to run, which
worker it is, where the fleet config lives, and the systemd unit to install.
"""

from __future__ import annotations

from pathlib import Path

from actfleet.config import Config, Worker

BOOTSTRAP_DIR = Path(__file__).resolve().parent.parent / "bootstrap"
STARTUP_SCRIPT = BOOTSTRAP_DIR / "startup.sh"
WORKER_UNIT = BOOTSTRAP_DIR / "actfleet-worker.service"


def startup_script() -> str:
    return STARTUP_SCRIPT.read_text()


def worker_unit() -> str:
    return WORKER_UNIT.read_text()


def config_object_name(config: Config) -> str:
    """Where the base stack uploads fleet.toml inside the activations bucket (workers read it at boot)."""
    return f"actfleet/{config.fleet.id}/fleet.toml"


def config_url(config: Config) -> str:
    return f"gs://{config.storage.bucket}/{config_object_name(config)}"


def worker_metadata(config: Config, worker: Worker, *, script: str | None = None,
                    unit: str | None = None) -> dict[str, str]:
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
