"""The worker unit's sandbox (bootstrap/actfleet-worker.service; docs/infrastructure.md, "The worker unit's sandbox"):
the directives libtpu and JAX tolerate are set, the ones that would cut the worker off its TPU are not, and the
real `systemd-analyze security --offline=true` parses every line and scores the unit OK."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.test_bootstrap import UNIT, unit_file

# Measured with systemd 252's systemd-analyze: 7.8 EXPOSED before the sandbox, 1.9 OK with it.
MAX_EXPOSURE = 2.0

REQUIRED = {
    "NoNewPrivileges": "true",
    "ProtectSystem": "strict",
    "ProtectHome": "true",
    "PrivateTmp": "true",
    "RestrictSUIDSGID": "true",
    "ProtectControlGroups": "true",
    "ProtectKernelModules": "true",
    "ProtectKernelTunables": "true",
    "ProtectKernelLogs": "true",
    "ProtectHostname": "true",
    "ProtectProc": "invisible",
    "PrivateMounts": "true",
    "RestrictNamespaces": "true",
    "RestrictRealtime": "true",
    "LockPersonality": "true",
    "RemoveIPC": "true",
    "CapabilityBoundingSet": "",
    "AmbientCapabilities": "",
    "UMask": "0077",
    "SystemCallErrorNumber": "EPERM",
    "SystemCallArchitectures": "native",
}
# Each would stop the real worker: the TPU's device nodes (/dev/accel*, /dev/vfio/*) closed by a device policy
# (ProtectClock implies DeviceAllow=char-rtc r, which closes all others), XLA's JIT, /proc/meminfo, the network.
ABSENT = (
    "PrivateDevices",
    "DevicePolicy",
    "DeviceAllow",
    "ProtectClock",
    "MemoryDenyWriteExecute",
    "ProcSubset",
    "PrivateUsers",
    "PrivateNetwork",
    "IPAddressDeny",
    "IPAddressAllow",
)


def service() -> dict[str, list[str]]:
    return unit_file(UNIT)["Service"]


@pytest.mark.parametrize("key", sorted(REQUIRED))
def test_the_unit_sets_the_sandbox_libtpu_tolerates(key):
    assert service().get(key) == [REQUIRED[key]], key


@pytest.mark.parametrize("key", ABSENT)
def test_the_unit_leaves_the_tpu_and_the_network_reachable(key):
    assert key not in service(), f"{key}= would cut the worker off its TPU, its JIT, /proc or its network"


def test_sockets_and_system_calls_keep_what_the_worker_uses():
    s = service()
    (families,) = s["RestrictAddressFamilies"]
    # INET/INET6: the store, the hub, the metadata server; NETLINK: getifaddrs() (jax.distributed, libtpu DCN).
    assert set(families.split()) == {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}
    # An allow-list first (the later "~" lines subtract from it), never subtracting @resources: libtpu needs
    # mbind, set_mempolicy and sched_setaffinity from it.
    assert s["SystemCallFilter"][0] == "@system-service"
    assert all(f.startswith("~") and "@resources" not in f for f in s["SystemCallFilter"][1:])
    assert s["LimitMEMLOCK"] == ["infinity"]  # pinned host memory for DMA, without CAP_IPC_LOCK


SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (apt-get install systemd)")
def test_systemd_analyze_parses_the_unit_and_scores_it_ok(tmp_path):
    # As the bootstrap installs it on a VM (@ROOT@ is "" there); --offline needs no running systemd.
    unit = tmp_path / "actfleet-worker.service"
    unit.write_text(UNIT.read_text().replace("@ROOT@", ""))
    out = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    # A misspelt or unsupported directive is only a warning ("Unknown key name ..., ignoring"): none allowed.
    assert str(unit) not in out.stderr, out.stderr
    m = re.search(r"Overall exposure level for actfleet-worker\.service: (\d+\.\d+) (\w+)", out.stdout)
    assert m, out.stdout[-500:]
    assert float(m.group(1)) <= MAX_EXPOSURE, out.stdout
    assert m.group(2) == "OK"
