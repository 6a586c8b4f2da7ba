"""actfleet.accelerators: chips and TPU VMs per accelerator type, as Google's architecture pages give them."""

from __future__ import annotations

import pytest

from actfleet import accelerators


@pytest.mark.parametrize(
    "accelerator, chips, hosts",
    [
        ("v2-8", 4, 1),
        ("v2-32", 16, 4),
        ("v3-8", 4, 1),
        ("v4-8", 4, 1),
        ("v4-16", 8, 2),
        ("v4-32", 16, 4),  # cores: two per chip, four chips per VM
        ("v5p-8", 4, 1),
        ("v5p-16", 8, 2),
        ("v5litepod-1", 1, 1),
        ("v5litepod-4", 4, 1),
        ("v5litepod-8", 8, 1),  # chips: one VM holds up to 8
        ("v5litepod-16", 16, 4),
        ("v5litepod-256", 256, 64),  # from 16 chips up: 4-chip VMs
        ("v6e-1", 1, 1),
        ("v6e-8", 8, 1),
        ("v6e-16", 16, 4),
        ("v6e-256", 256, 64),
    ],
)
def test_chips_and_hosts(accelerator, chips, hosts):
    assert accelerators.chips(accelerator) == chips
    assert accelerators.hosts(accelerator) == hosts


@pytest.mark.parametrize("bad", ["v5e-8", "v4", "tpu-v4-8", "v4-0", "v7x-8"])
def test_unknown_types_are_refused_naming_the_families(bad):
    with pytest.raises(accelerators.UnknownAccelerator, match="families: v2, v3, v4, v5p, v5litepod, v6e"):
        accelerators.hosts(bad)
