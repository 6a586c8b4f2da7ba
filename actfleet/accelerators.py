"""Cloud TPU accelerator types: how many chips and how many hosts (TPU VMs) a type names.

    chips("v5litepod-8") == 8     hosts("v5litepod-8") == 1     hosts("v5litepod-16") == 4
    chips("v4-8") == 4            hosts("v4-16") == 2

The number after the dash counts TensorCores for v2, v3, v4 and v5p (two per chip from v4 on; v2/v3 chips
count as two cores each too) and chips for v5e ("v5litepod") and v6e, which have one TensorCore per chip.
How many TPU VMs a slice has, from Google's system architecture pages (cloud.google.com/tpu/docs/v4, /v5e,
/v5p, /v6e, read 2026-12):
- v2, v3, v4, v5p: 8 TensorCores (4 chips) per VM: v4-8 and v5p-8 are one VM, v4-16 two.
- v5e, v6e: a VM holds 1, 4 or 8 chips. v5litepod-1/-4/-8 and v6e-1/-4/-8 are one VM; from 16 chips up
  a slice is 4-chip VMs (4x4 = 4 VMs, ..., 16x16 = 64 VMs), as axlearn's infer_tpu_workers also counts.

On a multi-host slice every VM runs the startup script and the hosts run one worker together through
jax.distributed (worker/multihost.py, docs/jobs.md "Multi-host slices"); config accepts every known type.
"""

from __future__ import annotations

import re

_TYPE_RE = re.compile(r"(?P<family>v[0-9]+[a-z]*|tpu7x)-(?P<n>[0-9]+)")

# family -> (what the number counts, chips per VM in a multi-host slice, most chips on one VM)
_FAMILIES = {
    "v2": ("cores", 4, 4),
    "v3": ("cores", 4, 4),
    "v4": ("cores", 4, 4),
    "v5p": ("cores", 4, 4),
    "v5litepod": ("chips", 4, 8),
    "v6e": ("chips", 4, 8),
    # TPU7x (Ironwood): two TensorCores per chip (cloud.google.com/tpu/docs/tpu7x), four chips per VM
    # (kubernetes-engine/docs/concepts/tpu-ironwood: "each Ironwood (TPU7x) VM contains four chips"). The
    # "tpu7x-N" spelling counts TensorCores like v5p's; it is the name Google's xpk and GKE label values use,
    # not one the Cloud TPU API takes (that API "is not supported on TPU7x and later"): gce mode only.
    "tpu7x": ("cores", 4, 4),
}
FAMILIES = tuple(_FAMILIES)
CORES_PER_CHIP = 2  # v2, v3, v4, v5p, TPU7x: the type counts TensorCores, two per chip


class UnknownAccelerator(ValueError):
    pass


def _parse(accelerator_type: str) -> tuple[str, int]:
    m = _TYPE_RE.fullmatch(accelerator_type)
    if not m or m["family"] not in _FAMILIES or int(m["n"]) < 1:
        raise UnknownAccelerator(
            f'"{accelerator_type}": not a Cloud TPU accelerator type actfleet knows '
            f'(families: {", ".join(FAMILIES)}; e.g. "v5litepod-8", "v4-8")'
        )
    return m["family"], int(m["n"])


def chips(accelerator_type: str) -> int:
    """TPU chips in the slice: 'v4-8' -> 4, 'v5litepod-8' -> 8."""
    fam, n = _parse(accelerator_type)
    counts, _, _ = _FAMILIES[fam]
    return max(1, n // CORES_PER_CHIP) if counts == "cores" else n


def hosts(accelerator_type: str) -> int:
    """TPU VMs (hosts) in the slice: 'v4-8' -> 1, 'v4-16' -> 2, 'v5litepod-8' -> 1, 'v5litepod-16' -> 4."""
    fam, _ = _parse(accelerator_type)
    _, per_vm, most_on_one = _FAMILIES[fam]
    c = chips(accelerator_type)
    return 1 if c <= most_on_one else -(-c // per_vm)


# family -> the TPU VM software versions (runtime_version) its VMs boot, from cloud.google.com/tpu/docs/runtimes
# (read 2026-12; REFERENCE.md "Real TPU VMs"): v5e, v5p and v6e each have their own image; v2-v4 share the base.
RUNTIMES = {
    "v2": ("tpu-ubuntu2204-base",),
    "v3": ("tpu-ubuntu2204-base",),
    "v4": ("tpu-ubuntu2204-base",),
    "v5p": ("v2-alpha-tpuv5",),
    "v5litepod": ("v2-alpha-tpuv5-lite",),
    "v6e": ("v2-alpha-tpuv6e",),
    "tpu7x": (),  # none: the Cloud TPU API does not serve TPU7x (gce mode boots fleet.boot_image instead)
}
TPU_API_FAMILIES = tuple(f for f in FAMILIES if RUNTIMES[f])  # what queued and vm modes can ask the TPU API for


def family(accelerator_type: str) -> str:
    return _parse(accelerator_type)[0]


def runtimes(accelerator_type: str) -> tuple[str, ...]:
    """The runtime versions a slice of this type boots: 'v6e-8' -> ('v2-alpha-tpuv6e',)."""
    return RUNTIMES[family(accelerator_type)]


def quota_units(accelerator_type: str) -> int:
    """What one slice counts against its TPU quota: the type's number (TensorCores for v2-v4/v5p, chips for
    v5e/v6e, which quota counts one per chip): 'v5litepod-8' -> 8, 'v4-8' -> 8."""
    return _parse(accelerator_type)[1]


# --- Compute Engine (fleet.mode = "gce") ---------------------------------------------------------------
# Accelerator type -> the Compute Engine machine type of its one TPU VM instance. gce mode runs each worker
# as one instance, so only single-host slices are here; a multi-host slice is a managed instance group with
# a workload policy on Compute Engine (compute/docs/tpus/create-tpu-mig-multi-host-slice), not modelled.
# Sources (read 2026-12; "confirmed" = the name on a page of Google's, "unconfirmed" = seen only in tools):
# - compute/docs/tpus/tpu-machines: "Compute Engine supports the following TPU versions: TPU7x, TPU v6e,
#   TPU v5p" -- v5e is not among them, so v5litepod types are refused in gce mode (a real project's
#   `gcloud compute machine-types list --filter="name~^ct5lp"` could show otherwise).
# - ct6e-standard-1t / -4t, ct5p-hightpu-4t: AI-Hypercomputer/xpk (Google's own tool),
#   src/xpk/core/system_characteristics.py (gce_machine_type of v6e-1, v6e-4, v5p-8). Unconfirmed on a
#   Google docs page from here (the tpu-machines page's tables could not be read past its opening).
# - ct6e-standard-8t (v6e-8 on one 8-chip VM, as tpu/docs/v6e's "8 chips per host" allows): seen in GKE
#   serving guides and tools only -- unconfirmed.
# - tpu7x-standard-4t (4 chips per VM, kubernetes-engine/docs/concepts/tpu-ironwood): seen in xpk's output
#   and GKE examples -- unconfirmed as a Compute Engine instance machine type from a Google page.
MACHINE_TYPES = {
    "v6e-1": "ct6e-standard-1t",
    "v6e-4": "ct6e-standard-4t",
    "v6e-8": "ct6e-standard-8t",
    "v5p-8": "ct5p-hightpu-4t",
    "tpu7x-8": "tpu7x-standard-4t",
}

# Family -> zones Google lists TPUs of it in (cloud.google.com/tpu/docs/regions-zones, read 2026-12, the North
# America and Europe rows as excerpted; the list is the Cloud TPU service's, Compute Engine's own offering of
# the machine type per zone is only what a real project's `gcloud compute machine-types list` shows). Advice
# for docs and error hints, never a check: zones change faster than this table.
ZONES = {
    "tpu7x": ("us-central1-c", "us-central1-ai1a"),
    "v6e": ("us-central1-b", "us-east1-d", "us-east5-a", "us-east5-b", "europe-west4-a"),
    "v5p": ("us-central1-a", "us-east5-a"),
}


def machine_type(accelerator_type: str) -> str:
    """The Compute Engine machine type of a single-host slice: 'v6e-4' -> 'ct6e-standard-4t'. Anything else
    is UnknownAccelerator naming why (config refuses it in gce mode, exit 2)."""
    fam = family(accelerator_type)  # UnknownAccelerator for a type actfleet does not know at all
    if accelerator_type in MACHINE_TYPES:
        return MACHINE_TYPES[accelerator_type]
    if fam not in {family(t) for t in MACHINE_TYPES}:
        why = f"Compute Engine offers TPU VM instances of {', '.join(sorted({family(t) for t in MACHINE_TYPES}))} only"
    elif hosts(accelerator_type) > 1:
        why = "a multi-host slice, which Compute Engine runs as a managed instance group (not gce mode's instances)"
    else:
        why = "no Compute Engine machine type known for it"
    raise UnknownAccelerator(f'"{accelerator_type}": {why} (gce mode knows: {", ".join(MACHINE_TYPES)})')
