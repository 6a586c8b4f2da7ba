"""A worker's release: the hash of what its queued-resource request holds (docs/operations.md, "Rollouts").

    release_id(config)  ->  "r3f9c2a61d0b4"

Every field a worker is created with (node spec, startup script and unit, metadata naming the commit, job
and store, labels, spot) goes into it, with the worker's own name and zone written as placeholders, so all
workers of one config share one release and any change that alters their request gives a new one. The
request carries it as the node label `actfleet-release` (the hash is taken without that label), which is
how reconcile observes which release each worker runs. Queued and gce mode roll (gce: the hash of
infra/gce_instance.py's release_request, carried as the instance label); vm mode has no release.

Not to be confused with the published release of a commit (infra/release.py, `actfleet release`): that is
the files a VM installs; this id also changes with the job, the unit or the metadata at one commit.
"""

from __future__ import annotations

import hashlib
import json

from actfleet.config import Config, Worker

RELEASE_LABEL = "actfleet-release"


def release_id(config: Config) -> str:
    """The release every worker of `config` is created at ("" in vm mode, or with no workers)."""
    from actfleet.infra.gce_instance import release_request
    from actfleet.infra.qr_request import queued_resource_request

    if config.fleet.mode not in ("queued", "gce") or not config.fleet.workers:
        return ""
    w: Worker = config.fleet.workers[0]
    request = (
        release_request(config, w) if config.fleet.mode == "gce" else queued_resource_request(config, w, release="")
    )
    text = json.dumps(request, sort_keys=True)
    text = text.replace(w.name, "{worker}").replace(w.zone, "{zone}")
    return "r" + hashlib.sha256(text.encode()).hexdigest()[:12]
