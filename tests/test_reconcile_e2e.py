"""reconcile end to end: the real `terraform` binary applies the queued-mode fleet stack, whose provisioners
call `actfleet tpu create-qr/delete-qr` against the fake TPU API; `actfleet reconcile` runs as a process.

One fleet (8 workers over 2 zones) is shared by the whole module, because every terraform run costs
seconds on a small machine: the first test brings it up, and every later test starts from a converged
fleet, breaks it in one way, runs one pass and checks the fake's call log. Terraform invocations are
counted through a logging wrapper (ACTFLEET_TERRAFORM).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from urllib.parse import parse_qs

import jsonschema
import pytest

from actfleet.config import load
from actfleet.infra.reconcile import REPORT_JSON_SCHEMA, managed_workers, reconcile_pass
from actfleet.infra.tpu_api import TpuApi
from tests.conftest import write_fleet_toml
from tests.fakes.tpu_server import FakeTpuServer

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
ACTFLEET = str(Path(sys.executable).parent / "actfleet")
A, B = "us-central1-a", "us-central1-b"


def worker(zone: str, i: int) -> str:
    return f"tpu-us-central1-{zone[-1]}-{i}"


class Fleet:
    """The module's fleet: a config file, a fake TPU API, and helpers to run and inspect passes."""

    def __init__(self, tmp: Path, fake: FakeTpuServer):
        self.tmp, self.fake = tmp, fake
        self.config = tmp / "fleet.toml"
        self.tf_log = tmp / "terraform-invocations.log"
        real = shutil.which("terraform")
        assert real, "these tests need the terraform binary on PATH"
        shim = tmp / "terraform-logged"
        shim.write_text(f'#!/bin/sh\necho "$1" >> "{self.tf_log}"\nexec "{real}" "$@"\n')
        shim.chmod(shim.stat().st_mode | stat.S_IXUSR)
        self.env = {
            **os.environ,
            "ACTFLEET_TPU_ENDPOINT": fake.url,
            "ACTFLEET_SYNTH_DIR": str(tmp / "synth"),
            "ACTFLEET_TERRAFORM": str(shim),
            "CHECKPOINT_DISABLE": "1",
        }
        self.env.pop("ACTFLEET_CONFIG", None)
        self.write_config({A: 4, B: 4})

    def write_config(self, zones: dict[str, int]) -> None:
        # The job is watched from the start (not prepared: never complete) so the scale-to-zero test at the
        # end needs no new synth.
        write_fleet_toml(
            self.config,
            id="e2e",
            zones=zones,
            commit="a" * 40,
            state=self.tmp / "state",
            bucket="e2e-activations",
            job={"model": "tiny", "input": "data.jsonl", "layers": [1], "store": str(self.tmp / "store")},
            reconcile={"watch_job": True, "scale_to_zero_when_done": True},
        )

    def reconcile(self, *args: str, check: bool = True) -> tuple[int, dict]:
        proc = subprocess.run(
            [ACTFLEET, "reconcile", "--config", str(self.config), "--json", *args],
            cwd=self.tmp,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        try:
            report = json.loads(proc.stdout)
        except ValueError:
            raise AssertionError(f"no JSON report (rc {proc.returncode}): {proc.stdout}\n{proc.stderr}")
        jsonschema.validate(report, REPORT_JSON_SCHEMA)
        if check:
            assert proc.returncode == report["exit_code"], proc.stderr
        return proc.returncode, report

    def terraform_runs(self) -> list[str]:
        """Terraform subcommands run since fresh(), in order (init, apply, ...)."""
        return self.tf_log.read_text().split() if self.tf_log.exists() else []

    def applies(self) -> list[str]:
        """The runs that change anything (a new synth is also `init`-ed once, which changes nothing)."""
        return [run for run in self.terraform_runs() if run != "init"]

    def mutations(self, verb: str) -> list[str]:
        """Resource ids of successful creates ("POST") or deletes ("DELETE") of queued resources."""
        method = {"create": "POST", "delete": "DELETE"}[verb]
        calls = self.fake.calls(method=method, path="/queuedResources")
        return sorted(c.resource or parse_qs(c.query)["queuedResourceId"][0] for c in calls if c.status == 200)

    def states(self) -> dict[str, str | None]:
        snap = self.fake.snapshot()
        return {q["name"].rsplit("/", 1)[1]: q["state"]["state"] for q in snap["queuedResources"]}

    def node_states(self) -> dict[str, str]:
        return {n["name"].rsplit("/", 1)[1]: n["state"] for n in self.fake.snapshot()["nodes"]}

    def fresh(self) -> None:
        self.fake.clear_calls()
        self.fake.clear_faults()
        self.tf_log.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reconcile-e2e")
    with FakeTpuServer.start(port=0) as fake:
        yield Fleet(tmp, fake)


EIGHT = sorted([worker(A, i) for i in range(4)] + [worker(B, i) for i in range(4)])


def test_eight_workers_over_two_zones_come_up_in_one_apply(fleet):
    rc, report = fleet.reconcile()
    assert rc == 0, report["errors"]
    assert report["outcome"] == "repaired"
    assert report["counts"] == {"create": 8}
    assert fleet.applies() == ["apply"]
    assert fleet.mutations("create") == EIGHT
    assert fleet.states() == {n: "ACTIVE" for n in EIGHT}
    assert report["job"] == {"watched": True, "complete": False, "error": None}  # not prepared yet
    assert managed_workers(load(fleet.config)) == frozenset(EIGHT)


def test_converged_pass_runs_no_terraform_and_imports_no_cdktf(fleet):
    fleet.fresh()
    rc, report = fleet.reconcile()
    assert (rc, report["outcome"], report["counts"]) == (0, "converged", {"healthy": 8})
    assert fleet.terraform_runs() == []
    assert not report["terraform"]["ran"]
    assert fleet.mutations("create") == fleet.mutations("delete") == []
    # In a process of its own: what a converged pass imports.
    probe = textwrap.dedent(f"""
        import sys
        from actfleet.config import load
        from actfleet.infra.reconcile import reconcile_pass
        r = reconcile_pass(load({str(fleet.config)!r}))
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("cdktf", "constructs", "jsii", "jax", "torch")
                       or m == "actfleet.infra.terraform" or m == "actfleet.infra.synth_cache")
        print(r.outcome, heavy)
    """)
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=fleet.tmp,
        env=fleet.env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout.strip()
    assert out == "converged []"
    assert fleet.terraform_runs() == []


def test_three_preempted_come_back_in_one_pass_with_three_deletes_and_three_creates(fleet):
    fleet.fresh()
    victims = [worker(A, 1), worker(A, 3), worker(B, 0)]
    for name in victims:
        fleet.fake.preempt(name.replace("tpu-", "").rsplit("-", 1)[0], name)
    assert {n: s for n, s in fleet.states().items() if s != "ACTIVE"} == {n: "SUSPENDED" for n in victims}
    rc, report = fleet.reconcile()
    assert (rc, report["outcome"]) == (0, "repaired"), report["errors"]
    assert report["counts"] == {"healthy": 5, "replace": 3}
    assert sorted(report["terraform"]["replace"]) == sorted(f'terraform_data.workers["{n}"]' for n in victims)
    assert fleet.applies() == ["apply"]
    assert fleet.mutations("delete") == sorted(victims)
    assert fleet.mutations("create") == sorted(victims)
    assert fleet.states() == {n: "ACTIVE" for n in EIGHT}
    assert set(fleet.node_states().values()) == {"READY"}


def test_queued_resource_deleted_behind_terraforms_back_is_recreated(fleet):
    fleet.fresh()
    gone = worker(B, 2)
    assert fleet.fake.delete_direct(B, gone)
    rc, report = fleet.reconcile()
    assert (rc, report["outcome"]) == (0, "repaired"), report["errors"]
    assert [(a["worker"], a["kind"]) for a in report["actions"] if a["kind"] != "healthy"] == [(gone, "create")]
    # Terraform still held it, so it is recreated with -replace (its destroy-time delete is a no-op).
    assert report["terraform"]["replace"] == [f'terraform_data.workers["{gone}"]']
    assert fleet.mutations("create") == [gone]
    assert fleet.states()[gone] == "ACTIVE"


def test_orphan_with_the_fleet_label_is_deleted_and_foreign_resources_left_alone(fleet):
    fleet.fresh()
    fleet.fake.create_qr_direct(
        A, "tpu-us-central1-a-9", project="fake-project", labels={"actfleet-fleet": "e2e", "managed-by": "actfleet"}
    )
    fleet.fake.create_qr_direct(A, "someone-elses-tpu", project="fake-project", labels={"team": "other"})
    rc, report = fleet.reconcile()
    assert (rc, report["outcome"]) == (0, "repaired"), report["errors"]
    assert [(a["worker"], a["kind"]) for a in report["actions"] if a["kind"] != "healthy"] == [
        ("tpu-us-central1-a-9", "delete-orphan")
    ]
    assert report["api_deletes"]["deleted"] == ["tpu-us-central1-a-9"]
    assert fleet.terraform_runs() == []  # orphans are not Terraform's: no apply needed
    assert "tpu-us-central1-a-9" not in fleet.states() and "someone-elses-tpu" in fleet.states()
    fleet.fake.delete_direct(A, "someone-elses-tpu")


def test_one_zone_answering_503_does_not_stop_the_other_zones_repair(fleet):
    fleet.fresh()
    fleet.fake.preempt(A, worker(A, 0))
    fleet.fake.preempt(B, worker(B, 1))
    fleet.fake.fail(zone=A, status=503, count=None)  # zone A's API is down for the whole pass
    cfg = load(fleet.config)
    os.environ["ACTFLEET_TERRAFORM"] = fleet.env["ACTFLEET_TERRAFORM"]
    os.environ["ACTFLEET_SYNTH_DIR"] = fleet.env["ACTFLEET_SYNTH_DIR"]
    os.environ["ACTFLEET_TPU_ENDPOINT"] = fleet.fake.url
    try:
        # In-process with a short retry budget (the CLI's client retries for about a minute).
        api = TpuApi(cfg.fleet.project, fleet.fake.url, retries=2, initial_backoff=0.01, max_backoff=0.05)
        report = reconcile_pass(cfg, api=api)
    finally:
        for k in ("ACTFLEET_TERRAFORM", "ACTFLEET_SYNTH_DIR", "ACTFLEET_TPU_ENDPOINT"):
            os.environ.pop(k, None)
    assert report.outcome == "repaired" and report.exit_code == 1  # repaired what it could see; says so
    assert list(report.unreachable) == [A] and "503" in report.unreachable[A]
    kinds = {a.worker: a.kind for a in report.actions}
    assert kinds[worker(B, 1)] == "replace"
    # The apply is limited to what this pass decided, so nothing in the unseen zone is touched.
    assert report.terraform["targets"] == [f'terraform_data.workers["{worker(B, 1)}"]']
    assert {kinds[worker(A, i)] for i in range(4)} == {"wait"}
    assert fleet.mutations("delete") == fleet.mutations("create") == [worker(B, 1)]
    assert fleet.states()[worker(B, 1)] == "ACTIVE" and fleet.states()[worker(A, 0)] == "SUSPENDED"
    # The zone comes back: the next pass repairs it.
    fleet.fresh()
    rc, report = fleet.reconcile()
    assert (rc, report["counts"]) == (0, {"healthy": 7, "replace": 1})
    assert fleet.mutations("create") == [worker(A, 0)]


def test_a_stockout_zone_does_not_stall_the_pass(fleet):
    fleet.fresh()
    fleet.fake.set_stockout(A, True)
    fleet.fake.preempt(A, worker(A, 2))
    fleet.fake.preempt(B, worker(B, 3))
    rc, report = fleet.reconcile()
    assert (rc, report["outcome"], report["counts"]) == (0, "repaired", {"healthy": 6, "replace": 2})
    assert fleet.states()[worker(B, 3)] == "ACTIVE"
    assert fleet.states()[worker(A, 2)] == "WAITING_FOR_RESOURCES"
    # The next pass sees it waiting for capacity: pending, nothing to do, no terraform.
    fleet.fresh()
    rc, report = fleet.reconcile()
    assert (rc, report["outcome"]) == (0, "converged")
    pending = [a for a in report["actions"] if a["kind"] == "pending"]
    assert [(a["worker"], a["reason"]) for a in pending] == [(worker(A, 2), "queued resource WAITING_FOR_RESOURCES")]
    assert fleet.terraform_runs() == []
    fleet.fake.set_stockout(A, False)
    assert fleet.states()[worker(A, 2)] == "ACTIVE"


def test_two_concurrent_reconciles_produce_exactly_one_apply(fleet):
    fleet.fresh()
    fleet.fake.preempt(A, worker(A, 1))
    fleet.fake.preempt(B, worker(B, 2))
    # Slow the deletes so the first pass is still applying when the second one looks at the lock.
    fleet.fake.fail(status=None, count=None, method="DELETE", delay=2.0)
    cmd = [ACTFLEET, "reconcile", "--config", str(fleet.config), "--json"]
    procs = [
        subprocess.Popen(cmd, cwd=fleet.tmp, env=fleet.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [(p.wait(timeout=600), json.loads(p.communicate()[0])) for p in procs]
    assert [rc for rc, _ in results] == [0, 0]
    outcomes = sorted(r["outcome"] for _, r in results)
    assert outcomes == ["locked", "repaired"]
    locked = next(r for _, r in results if r["outcome"] == "locked")
    winner = next(r for _, r in results if r["outcome"] == "repaired")
    assert locked["locked_by"]["pid"] == winner["lock"]["pid"]
    assert fleet.applies() == ["apply"]
    assert fleet.mutations("create") == sorted([worker(A, 1), worker(B, 2)])


def test_terraform_failure_exits_1_with_its_error_and_releases_the_lock(fleet):
    fleet.fresh()
    fleet.fake.preempt(B, worker(B, 0))
    fleet.fake.fail(zone=B, status=403, count=None, method="POST")  # creates are refused
    proc = subprocess.run(
        [ACTFLEET, "reconcile", "--config", str(fleet.config)],
        cwd=fleet.tmp,
        env=fleet.env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 1
    assert "terraform apply" in proc.stderr and "403" in proc.stderr, proc.stderr
    assert "FAILED" in proc.stdout
    cfg = load(fleet.config)
    assert not (Path(cfg.state.path) / "reconcile.lock").exists()
    fleet.fresh()
    # The next pass backs off (5 minutes): no terraform run, the provisioner's reason read from Terraform's
    # output, the next attempt's time.
    rc, report = fleet.reconcile()
    assert (rc, report["outcome"]) == (0, "converged"), report["errors"]
    [held] = [a for a in report["actions"] if a["kind"] != "healthy"]
    assert (held["worker"], held["kind"]) == (worker(B, 0), "wait") and held["next_attempt"]
    assert held["error"]["code"] == "PERMISSION_DENIED" and held["error"]["class"] == "permission"
    assert "The caller does not have permission" in held["error"]["message"]
    assert fleet.terraform_runs() == [] and fleet.mutations("create") == []
    rc, report = fleet.reconcile("--retry-now")  # the permission fixed: retry without waiting
    assert (rc, report["outcome"]) == (0, "repaired"), report["errors"]
    assert fleet.states()[worker(B, 0)] == "ACTIVE"


def test_worker_added_to_the_config_is_created_and_one_removed_is_destroyed(fleet):
    fleet.fresh()
    fleet.write_config({A: 5, B: 3})
    rc, dry = fleet.reconcile("--dry-run")
    assert (rc, dry["outcome"]) == (0, "planned")
    assert fleet.terraform_runs() == [] and fleet.mutations("create") == []
    rc, report = fleet.reconcile()
    assert (rc, report["outcome"]) == (0, "repaired"), report["errors"]
    changed = [(a["worker"], a["kind"]) for a in report["actions"] if a["kind"] != "healthy"]
    assert changed == [(worker(A, 4), "create"), (worker(B, 3), "remove")]
    assert report["terraform"]["replace"] == []  # a plain apply does both
    assert fleet.applies() == ["apply"]
    assert fleet.mutations("create") == [worker(A, 4)]
    assert fleet.mutations("delete") == [worker(B, 3)]
    assert worker(B, 3) not in fleet.states() and fleet.states()[worker(A, 4)] == "ACTIVE"
    assert worker(B, 3) not in managed_workers(load(fleet.config))


def test_watch_runs_a_pass_every_interval_as_json_lines(fleet):
    fleet.fresh()
    proc = subprocess.Popen(
        [ACTFLEET, "reconcile", "--config", str(fleet.config), "--json", "--watch", "1"],
        cwd=fleet.tmp,
        env=fleet.env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        passes = [json.loads(proc.stdout.readline()) for _ in range(2)]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert [p["outcome"] for p in passes] == ["converged", "converged"]
    assert passes[0]["started_at"] <= passes[1]["started_at"]
    assert fleet.terraform_runs() == []


def test_complete_job_scales_the_fleet_to_zero(fleet):
    from actfleet.store import open_store
    from actfleet.work_queue import DoneRecord, claim, commit, prepare

    fleet.fresh()
    store = open_store(str(fleet.tmp / "store"))
    prepare(store, "default", input="data.jsonl", fingerprint="f" * 64, rows=2, unit_rows=1, options={})
    for unit in range(2):
        lease = claim(store, "default", unit, worker(A, 0), 60)
        commit(
            store,
            lease,
            DoneRecord(
                unit=unit,
                start=unit,
                stop=unit + 1,
                worker=worker(A, 0),
                attempt=1,
                rows_stored=1,
                tokens=5,
                skipped={},
                shards=[],
                committed_at=1.0,
                seconds=1.0,
            ),
            60,
        )
    rc, report = fleet.reconcile()
    assert (rc, report["outcome"]) == (0, "repaired"), report["errors"]
    assert report["job"] == {"watched": True, "complete": True, "error": None}
    assert {a["kind"] for a in report["actions"]} == {"remove"}
    assert report["terraform"]["command"] == "destroy" and fleet.applies() == ["destroy"]
    assert sorted(fleet.mutations("delete")) == sorted(
        [worker(A, i) for i in range(5)] + [worker(B, i) for i in range(3)]
    )
    assert fleet.states() == {}
    assert managed_workers(load(fleet.config)) == frozenset()
    fleet.fresh()
    rc, report = fleet.reconcile()  # and it stays at zero: nothing desired, nothing to do
    assert (rc, report["outcome"], report["actions"]) == (0, "converged", [])
    assert fleet.terraform_runs() == []
