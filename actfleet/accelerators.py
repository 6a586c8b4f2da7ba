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

_TYPE_RE = re.compile(r"(?P<family>v[0-9]+[a-z]*)-(?P<n>[0-9]+)")

# family -> (what the number counts, chips per VM in a multi-host slice, most chips on one VM)
_FAMILIES = {
    "v2": ("cores", 4, 4),
    "v3": ("cores", 4, 4),
    "v4": ("cores", 4, 4),
    "v5p": ("cores", 4, 4),
    "v5litepod": ("chips", 4, 8),
    "v6e": ("chips", 4, 8),
}
FAMILIES = tuple(_FAMILIES)
CORES_PER_CHIP = 2  # v2, v3, v4, v5p: the type counts TensorCores, two per chip


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
}


def family(accelerator_type: str) -> str:
    return _parse(accelerator_type)[0]


def runtimes(accelerator_type: str) -> tuple[str, ...]:
    """The runtime versions a slice of this type boots: 'v6e-8' -> ('v2-alpha-tpuv6e',)."""
    return RUNTIMES[family(accelerator_type)]


def quota_units(accelerator_type: str) -> int:
    """What one slice counts against its TPU quota: the type's number (TensorCores for v2-v4/v5p, chips for
    v5e/v6e, which quota counts one per chip): 'v5litepod-8' -> 8, 'v4-8' -> 8."""
    return _parse(accelerator_type)[1]
