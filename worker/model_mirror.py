"""The hub model a job reads, mirrored once into its store at `prepare`, so workers never reach the hub.

    {store}/models/{org}--{name}/{commit}/{file}     every file the job's model pin lists

Keyed by the commit the revision resolved to (a moving "main" cannot change under a job); each file is
uploaded only if absent (a second job on the same commit uploads nothing). The pin records the mirror's URL
next to each file's sha256 (worker/pinning.py ModelPin.mirror); workers load from the mirror and check every
file against its hash, as for any model. A model given as a path or gs:// prefix is used where it is.
"""

from __future__ import annotations

import dataclasses

from actfleet.store import MODEL_MIRROR, Store, join
from actfleet.worker import model_files


def mirror_key(repo_id: str, commit: str) -> str:
    return join(MODEL_MIRROR, repo_id.replace("/", "--"), commit)


def mirror_model(store: Store, repo_id: str, model_dir, pin) -> str:
    """Upload the pinned files of a hub snapshot under the store; returns the mirror's URL (store.url/key)."""
    key = mirror_key(repo_id, pin.revision)
    for rel in sorted(pin.files):
        name = join(key, rel)
        if store.generation(name) is None:
            store.put(name, model_dir / rel)
    return f"{store.url.rstrip('/')}/{key}"


def mirrored(pinned, repo_id: str, store: Store):
    """JobInputs with the model mirrored into `store` when it came from the hub (else unchanged)."""
    from actfleet.worker.pinning import ModelPin

    pin = ModelPin.from_json(pinned.model_pin)
    if not model_files.is_hub_id(repo_id) or pin.revision is None:
        return pinned
    url = mirror_model(store, repo_id, pinned.model_dir, pin)
    return dataclasses.replace(pinned, model_pin=dataclasses.replace(pin, mirror=url).to_json())
