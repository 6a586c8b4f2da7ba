"""A rollout for real: `actfleet reconcile` passes applying the queued-mode fleet stack with the terraform
binary, provisioners calling `actfleet tpu create-qr/delete-qr` against the fake TPU API. A config change
(a new commit) must replace one wave per pass (var.holds keeps the others on the trigger their state holds),
never the whole fleet in one apply."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from actfleet.config import load
from actfleet.infra.reconcile import fleet_state_workers, reconcile_pass
from actfleet.infra.release_id import release_id
from actfleet.infra.terraform_layout import FLEET, state_location
from tests.conftest import write_fleet_toml
from tests.fakes.tpu_server import FakeTpuServer

pytestmark = pytest.mark.slow

ZONE = "us-central1-a"
NAMES = [f"tpu-us-central1-a-{i}" for i in range(3)]


def write(tmp: Path, commit: str) -> Path:
    path = write_fleet_toml(
        tmp / "fleet.toml",
        zones={ZONE: 3},
        state=tmp / "state",
        commit=commit,
        job={"store": str(tmp / "store")},
        # Records not judged (both rules off): a wave is replaced without a drain, READY counts as started.
        reconcile={"boot_timeout_minutes": 0, "heartbeat_timeout_minutes": 0},
    )
    path.write_text(path.read_text() + "[rollout]\nmax_unavailable = 1\n")
    return path


def released(fake) -> dict[str, str]:
    snap = fake.snapshot()
    out = {}
    for qr in snap["queuedResources"]:
        labels = qr["tpu"]["nodeSpec"][0]["node"]["labels"]
        out[qr["name"].rsplit("/", 1)[1]] = labels.get("actfleet-release", "")
    return out


def test_a_config_change_rolls_one_worker_per_pass(tmp_path, monkeypatch):
    monkeypatch.setenv("ACTFLEET_SYNTH_DIR", str(tmp_path / "synth"))
    with FakeTpuServer.start(port=0) as fake:
        monkeypatch.setenv("ACTFLEET_TPU_ENDPOINT", fake.url)
        cfg1 = load(write(tmp_path, "1" * 40))
        first = reconcile_pass(cfg1)
        assert first.outcome == "repaired", first.errors
        r1 = release_id(cfg1)
        assert released(fake) == {n: r1 for n in NAMES}

        cfg2 = load(write(tmp_path, "2" * 40))
        r2 = release_id(cfg2)
        assert r2 != r1
        for wave in (1, 2, 3):
            fake.clear_calls()
            report = reconcile_pass(cfg2)
            assert report.outcome == "repaired", report.errors
            assert len([c for c in fake.calls(method="DELETE") if c.status == 200]) == 1, wave
            assert len(fake.calls(method="POST", path=r"/queuedResources$")) == 1, wave  # one create
            now = released(fake)
            assert sorted(now.values()).count(r2) == wave, (wave, now)
            assert report.rollout["wave"] == wave and report.rollout["release"] == r2
            triggers = fleet_state_workers(cfg2)
            assert sorted(t["release"] if "release" in t else "" for t in triggers.values()).count(r2) == wave
        assert released(fake) == {n: r2 for n in NAMES}
        fake.clear_calls()
        assert reconcile_pass(cfg2).outcome == "converged"
        assert not fake.calls(method="POST") and not fake.calls(method="DELETE")
        state = json.loads(Path(state_location(cfg2, FLEET)).read_text())
        assert state["resources"][0]["instances"]
