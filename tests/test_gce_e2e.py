"""gce mode end to end: the real `terraform` binary applies the fleet stack's `google_compute_instance` workers
through the google provider STAND-IN (tests/fakes/google_provider: the real hashicorp/google cannot be
downloaded here) against the fake Compute Engine API (tests/fakes/compute_server.py); `actfleet reconcile`
runs as a process and observes the fake through google-cloud-compute.

One fleet (8 workers over 2 zones) for the module, as in tests/test_reconcile_e2e.py: it comes up in one
pass, one worker is preempted (spot, STOP: TERMINATED) and the next pass replaces it with exactly 1 delete +
1 insert, a plan shows attribute-level diffs, and a destroy takes it to 0.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from actfleet.config import COMPUTE_ENDPOINT_ENV, load
from actfleet.infra.reconcile import managed_workers
from actfleet.infra.terraform_layout import held_gce_spec, worker_address
from tests.conftest import write_fleet_toml
from tests.fakes.compute_server import FakeComputeServer
from tests.fakes.google_provider.install import install

pytestmark = pytest.mark.slow

ACTFLEET = str(Path(sys.executable).parent / "actfleet")
A, B = "us-central1-a", "us-central1-b"
EIGHT = sorted([f"tpu-us-central1-{z[-1]}-{i}" for z in (A, B) for i in range(4)])
IMAGE = "projects/example-images/global/images/family/example-tpu-vm"


class Fleet:
    def __init__(self, tmp: Path, fake: FakeComputeServer):
        assert shutil.which("terraform"), "these tests need the terraform binary on PATH"
        self.tmp, self.fake = tmp, fake
        self.config = write_fleet_toml(
            tmp / "fleet.toml",
            id="gce",
            zones={A: 4, B: 4},
            commit="b" * 40,
            state=tmp / "state",
            bucket="gce-activations",
            fleet={"mode": "gce", "boot_image": IMAGE, "accelerator_type": "v6e-4"},
            job={"model": "tiny", "input": "data.jsonl", "layers": [1], "store": str(tmp / "store")},
        )
        self.env = {
            **os.environ,
            COMPUTE_ENDPOINT_ENV: fake.url,
            "ACTFLEET_SYNTH_DIR": str(tmp / "synth"),
            "TF_CLI_CONFIG_FILE": str(install(tmp / "tf")),
            "CHECKPOINT_DISABLE": "1",
        }
        self.env.pop("ACTFLEET_CONFIG", None)

    def reconcile(self) -> dict:
        proc = subprocess.run(
            [ACTFLEET, "reconcile", "--config", str(self.config), "--json"],
            cwd=self.tmp,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        try:
            report = json.loads(proc.stdout)
        except ValueError:
            raise AssertionError(f"no JSON report (rc {proc.returncode}): {proc.stdout}\n{proc.stderr}")
        assert proc.returncode == report["exit_code"] == 0, (report["errors"], proc.stderr[-3000:])
        return report

    def inserts(self) -> int:
        """Successful instance inserts (a POST on a zone's collection names no instance in its path)."""
        return len(self.fake.calls(method="POST", path=r"/instances$", status=200))

    def deletes(self) -> list[str]:
        return sorted(c.resource or "?" for c in self.fake.calls(method="DELETE", path="/instances/", status=200))

    def statuses(self) -> dict[str, str]:
        return {i["name"]: i["status"] for i in self.fake.snapshot()["instances"]}

    def terraform(self):
        """The fleet stack as reconcile runs it, with this module's environment."""
        from actfleet.infra.terraform import fleet_stack

        old = dict(os.environ)
        os.environ.update(self.env)
        try:
            return fleet_stack(load(self.config))
        finally:
            os.environ.clear()
            os.environ.update(old)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gce-e2e")
    with FakeComputeServer.start(port=0) as fake:
        yield Fleet(tmp, fake)


def test_eight_gce_workers_over_two_zones_come_up_in_one_pass(fleet):
    report = fleet.reconcile()
    assert report["outcome"] == "repaired" and report["counts"] == {"create": 8}
    assert fleet.inserts() == 8 and fleet.deletes() == []
    assert fleet.statuses() == {n: "RUNNING" for n in EIGHT}
    assert managed_workers(load(fleet.config)) == frozenset(EIGHT)
    body = fleet.fake.instance(A, "tpu-us-central1-a-0")
    assert body["scheduling"]["provisioningModel"] == "SPOT"
    assert body["scheduling"]["instanceTerminationAction"] == "STOP"
    assert not body["networkInterfaces"][0].get("accessConfigs")  # no external IP
    assert body["machineType"].endswith("/machineTypes/ct6e-standard-4t")


def test_a_preempted_worker_is_replaced_with_one_delete_and_one_insert(fleet):
    victim = "tpu-us-central1-b-2"
    fleet.fake.clear_calls()
    before = fleet.fake.instance(B, victim)["id"]
    fleet.fake.preempt(B, victim)
    assert fleet.statuses()[victim] == "TERMINATED"  # STOP: the instance stays, and says why it stopped
    report = fleet.reconcile()
    assert report["outcome"] == "repaired" and report["terraform"]["replace"] == [worker_address(victim, "gce")]
    assert (fleet.deletes(), fleet.inserts()) == ([victim], 1)
    assert fleet.fake.instance(B, victim)["id"] != before  # a new instance under the same name
    assert fleet.statuses() == {n: "RUNNING" for n in EIGHT}


def test_plan_shows_attribute_level_diffs(fleet):
    """A held spec that differs from the config (what a PR's plan or a rollout's next wave meets): metadata
    and labels are in-place updates of exactly the changed keys; the release's disk labels force a replace."""
    tf = fleet.terraform()
    state = json.loads(tf.run("show", "-json", stream=False))
    # Every worker held at what its state holds (the rollout's holds: no change), but two.
    held = {r["index"]: held_gce_spec(r["values"]) for r in state["values"]["root_module"]["resources"]}
    assert sorted(held) == EIGHT and None not in held.values()
    one, two = "tpu-us-central1-a-1", "tpu-us-central1-b-3"
    held[one]["metadata"]["actfleet-job"] = "older-job"
    held[one]["labels"]["team"] = "old"
    held[two]["disk_labels"]["actfleet-release"] = "r000000000000"
    (tf.dir / "holds.auto.tfvars.json").write_text(json.dumps({"holds": held}))
    try:
        tf.run("plan", "-input=false", "-no-color", "-out=diff.plan", stream=False)
        plan = json.loads(tf.run("show", "-json", "diff.plan", stream=False))
    finally:
        (tf.dir / "holds.auto.tfvars.json").unlink()
    changes = {c["index"]: c for c in plan["resource_changes"] if c["change"]["actions"] != ["no-op"]}
    assert sorted(changes) == [one, two]
    update = changes[one]["change"]
    assert update["actions"] == ["update"]
    before, after = update["before"], update["after"]
    assert after["metadata"]["actfleet-job"] == "older-job" != before["metadata"]["actfleet-job"]
    assert {k for k in after["metadata"] if after["metadata"][k] != before["metadata"].get(k)} == {"actfleet-job"}
    assert after["labels"] == before["labels"] | {"team": "old"}
    replace = changes[two]
    assert replace["change"]["actions"] == ["delete", "create"]
    assert ["boot_disk"] in replace["change"]["replace_paths"]
    assert fleet.statuses() == {n: "RUNNING" for n in EIGHT}  # a plan changes nothing


def test_destroy_takes_the_fleet_to_zero_and_a_vanished_instance_leaves_the_state(fleet):
    """One instance deleted behind Terraform's back (what DELETE-on-preemption would do): the provider's Read
    answers "gone" on the 404, so the destroy's refresh drops it and deletes only the other seven."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import compute_v1

    gone = "tpu-us-central1-a-3"
    client = compute_v1.InstancesClient(
        transport="rest", client_options={"api_endpoint": fleet.fake.url}, credentials=AnonymousCredentials()
    )
    client.delete(project="fake-project", zone=A, instance=gone).result(timeout=60)
    fleet.fake.clear_calls()
    fleet.terraform().destroy()
    assert fleet.statuses() == {}
    assert fleet.deletes() == [n for n in EIGHT if n != gone]
    assert fleet.fake.calls(method="DELETE", path=f"/instances/{gone}$") == []  # dropped at refresh, not deleted
    assert managed_workers(load(fleet.config)) == frozenset()
