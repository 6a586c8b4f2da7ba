"""reconcile_pass's act step without Terraform (fast): what it hands to the one apply, what it deletes
through the TPU API, and how it ends. The apply is a recorder standing in for actfleet.infra.terraform; the TPU API
is the fake, over the real client. The real-terraform version of these stories is test_reconcile_e2e.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest

from actfleet.config import load, parse
from actfleet.errors import ActfleetError
from actfleet.infra.lock import LOCK_KEY, ReconcileLock
from actfleet.infra.reconcile import REPORT_JSON_SCHEMA, managed_workers, reconcile_pass
from actfleet.infra.terraform_layout import FLEET, state_location
from actfleet.infra.tpu_api import TpuApi
from actfleet.store import open_store
from tests.conftest import write_fleet_toml
from tests.fakes.tpu_server import FakeTpuServer

A = "us-central1-a"
ACTFLEET = str(Path(sys.executable).parent / "actfleet")
OURS = {"actfleet-fleet": "rc", "managed-by": "actfleet"}


def make_cfg(tmp: Path, count: int = 3, **reconcile):
    return parse(
        {
            "fleet": {"id": "rc", "project": "fake-project", "region": "us-central1", "zones": {A: count}},
            "repo": {"url": "https://example.com/r.git", "commit": "d" * 40},
            "storage": {"bucket": "rc-activations"},
            "state": {"path": str(tmp / "state")},
            "job": {"model": "m", "input": "i", "layers": [1], "store": str(tmp / "store")},
            "reconcile": reconcile,
        }
    )


def parse_worker(name: str):
    from actfleet.config import Worker

    return Worker(name=name, zone=name[len("tpu-") :].rsplit("-", 1)[0], index=int(name.rsplit("-", 1)[1]))


def write_state(cfg, names) -> None:
    """A Terraform state document holding these workers (the shape `terraform apply` writes)."""
    path = Path(state_location(cfg, FLEET))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(
            {
                "version": 4,
                "resources": [
                    {
                        "mode": "managed",
                        "type": "terraform_data",
                        "name": "workers",
                        "each": "map",
                        "instances": [{"index_key": n, "attributes": {}} for n in names],
                    },
                    {"mode": "managed", "type": "terraform_data", "name": "other", "instances": [{"attributes": {}}]},
                ],
            }
        )
    )


class Recorder:
    def __init__(self, fail: str | None = None):
        self.calls, self.fail = [], fail

    def __call__(self, cfg, *, replace, targets, destroy, holds=None):
        self.calls.append({"replace": replace, "targets": targets, "destroy": destroy})
        self.holds = holds
        if self.fail:
            raise ActfleetError(self.fail)


@pytest.fixture
def fake():
    with FakeTpuServer.start(port=0) as fake:
        yield fake


def api_for(fake):
    # A short operation timeout: a pass that wrongly waits (a delete of a SUSPENDING resource) fails fast.
    return TpuApi("fake-project", fake.url, retries=1, initial_backoff=0.01, max_backoff=0.02, operation_timeout=20)


def w(i: int) -> str:
    return f"tpu-us-central1-a-{i}"


def test_managed_workers_reads_the_state_document(tmp_path):
    cfg = make_cfg(tmp_path)
    assert managed_workers(cfg) == frozenset()  # no state yet
    write_state(cfg, [w(0), w(1)])
    assert managed_workers(cfg) == {w(0), w(1)}
    Path(state_location(cfg, FLEET)).write_text("{not json")
    with pytest.raises(ActfleetError, match="unreadable"):
        managed_workers(cfg)


def test_one_apply_with_replace_for_managed_and_plain_create_for_new(tmp_path, fake):
    cfg = make_cfg(tmp_path, count=3)
    write_state(cfg, [w(0), w(1)])
    fake.create_qr_direct(A, w(0), project="fake-project", labels=OURS)
    fake.create_qr_direct(A, w(1), project="fake-project", labels=OURS)
    fake.preempt(A, w(1))
    apply = Recorder()
    report = reconcile_pass(cfg, api=api_for(fake), apply=apply)
    assert (report.outcome, report.exit_code) == ("repaired", 0)
    assert [(a.worker, a.kind) for a in report.actions] == [(w(0), "healthy"), (w(1), "replace"), (w(2), "create")]
    # w(2) is not in the state: the plain apply creates it; w(1) is, so it is replaced.
    assert apply.calls == [{"replace": [f'terraform_data.workers["{w(1)}"]'], "targets": [], "destroy": False}]
    jsonschema.validate(report.to_dict(), REPORT_JSON_SCHEMA)


def test_broken_resource_unknown_to_terraform_is_deleted_first_then_created_by_the_apply(tmp_path, fake):
    cfg = make_cfg(tmp_path, count=1)
    fake.create_qr_direct(A, w(0), project="fake-project", labels=OURS, state="SUSPENDED")
    apply = Recorder()
    report = reconcile_pass(cfg, api=api_for(fake), apply=apply)
    assert report.api_deletes["deleted"] == [w(0)]
    assert fake.queued_resource_state(A, w(0)) is None
    assert apply.calls == [{"replace": [], "targets": [], "destroy": False}]


def test_terraform_failure_is_reported_and_the_lock_released(tmp_path, fake):
    cfg = make_cfg(tmp_path, count=1)
    apply = Recorder(fail="terraform apply (fleet) failed: Error: local-exec provisioner error")
    report = reconcile_pass(cfg, api=api_for(fake), apply=apply)
    assert (report.outcome, report.exit_code) == ("failed", 1)
    assert report.terraform["error"].endswith("local-exec provisioner error")
    assert any("terraform apply failed" in e for e in report.errors)
    assert open_store(str(tmp_path / "state")).generation(LOCK_KEY) is None


def test_a_held_lock_means_nothing_is_observed_or_done(tmp_path, fake):
    cfg = make_cfg(tmp_path, count=1)
    holder = ReconcileLock.for_config(cfg, command="the other pass")
    holder.acquire()
    try:
        apply = Recorder()
        report = reconcile_pass(cfg, api=api_for(fake), apply=apply)
    finally:
        holder.release()
    assert (report.outcome, report.exit_code) == ("locked", 0)
    assert report.locked_by["command"] == "the other pass" and "the other pass" in report.locked_by["describe"]
    assert apply.calls == [] and fake.calls() == []
    jsonschema.validate(report.to_dict(), REPORT_JSON_SCHEMA)


def test_dry_run_decides_but_neither_locks_nor_acts(tmp_path, fake):
    cfg = make_cfg(tmp_path, count=2)
    fake.create_qr_direct(A, "tpu-us-central1-a-8", project="fake-project", labels=OURS)
    apply = Recorder()
    report = reconcile_pass(cfg, dry_run=True, api=api_for(fake), apply=apply)
    assert report.outcome == "planned" and report.lock is None
    assert report.counts == {"create": 2, "delete-orphan": 1}
    assert apply.calls == [] and fake.calls(method="DELETE") == [] and fake.calls(method="POST") == []


def test_failed_orphan_delete_fails_the_pass_but_the_apply_still_runs(tmp_path, fake):
    cfg = make_cfg(tmp_path, count=1)
    fake.create_qr_direct(A, "tpu-us-central1-a-8", project="fake-project", labels=OURS)
    fake.fail(zone=A, status=403, count=None, method="DELETE")
    apply = Recorder()
    report = reconcile_pass(cfg, api=api_for(fake), apply=apply)
    assert (report.outcome, report.exit_code) == ("failed", 1)
    assert "403" in report.api_deletes["failed"]["tpu-us-central1-a-8"]
    assert len(apply.calls) == 1  # the create of w(0) was not held up by the orphan


def test_unreadable_job_never_scales_down(tmp_path, fake):
    cfg = make_cfg(tmp_path, count=1, watch_job=True, scale_to_zero_when_done=True)
    cfg = cfg.replace("job", store="gs://")  # not a valid store URL
    fake.create_qr_direct(A, w(0), project="fake-project", labels=OURS)
    report = reconcile_pass(cfg, api=api_for(fake), apply=Recorder())
    assert report.job["complete"] is None and "could not read job" in report.job["error"]
    assert report.counts == {"healthy": 1}


def test_watch_reads_fleet_toml_again_every_pass_and_skips_a_pass_whose_config_is_broken(tmp_path, fake, monkeypatch):
    """`reconcile --watch`: an edit to fleet.toml between passes is the next pass's desired state; a
    broken file skips that pass (one line on stderr, no lock, no apply) and the watch goes on; interrupted
    right after such a pass, it exits 2 (bad input)."""
    from click.testing import CliRunner

    from actfleet.config import TPU_ENDPOINT_ENV
    from actfleet.infra import reconcile as reconcile_mod
    from actfleet.infra.commands import reconcile as command

    config = tmp_path / "fleet.toml"

    def good(count: int) -> str:
        return write_fleet_toml(
            tmp_path / "rendered.toml",
            id="rc",
            zones={A: count},
            commit="d" * 40,
            state=tmp_path / "state",
            bucket="rc-activations",
            job={"model": "m", "input": "i", "layers": [1], "store": str(tmp_path / "store")},
        ).read_text()

    broken = good(1).replace('region = "us-central1"', 'region = "us-central1"\nmode = "spot"')
    config.write_text(good(1))
    # What the file holds when each sleep between passes ends; after the last, Ctrl-C.
    edits = [good(2), broken, good(3), broken]
    lock_seen = []

    def step(seconds):
        assert seconds == 1
        lock_seen.append(open_store(str(tmp_path / "state")).generation(LOCK_KEY))
        if not edits:
            raise KeyboardInterrupt
        config.write_text(edits.pop(0))

    apply = Recorder()
    monkeypatch.setattr(command, "_sleep", step)
    monkeypatch.setattr(reconcile_mod, "terraform_apply", apply)
    monkeypatch.setenv(TPU_ENDPOINT_ENV, fake.url)
    result = CliRunner().invoke(command.reconcile, ["--config", str(config), "--json", "--watch", "1"])

    assert result.exit_code == 2, (result.output, result.exception)
    reports = [json.loads(line) for line in result.stdout.splitlines()]
    for report in reports:
        jsonschema.validate(report, REPORT_JSON_SCHEMA)
    # Three passes ran, each with the worker count the file held when it started.
    assert [[a["worker"] for a in r["actions"]] for r in reports] == [[w(0)], [w(0), w(1)], [w(0), w(1), w(2)]]
    assert [r["outcome"] for r in reports] == ["repaired"] * 3
    assert len(apply.calls) == 3  # the skipped passes applied nothing
    skipped = [line for line in result.stderr.splitlines() if "pass skipped" in line]
    assert len(skipped) == 2 and all("fleet.mode" in line or "spot" in line for line in skipped)
    assert lock_seen == [None] * 5  # every pass released the lock; a skipped one never took it


# ----------------------------------------------------------------------------------------------------
# Real states and real failures (issue 15): a controlled clock, the fake TPU API, real stores
# ----------------------------------------------------------------------------------------------------

from actfleet import work_queue as q  # noqa: E402
from actfleet.infra.qr_request import queued_resource_request  # noqa: E402
from actfleet.infra.terraform import TerraformError  # noqa: E402
from actfleet.infra.terraform_layout import worker_address  # noqa: E402


class Provisioners:
    """Stands in for `terraform apply` of the queued-mode fleet stack: per worker the apply touches, what its
    provisioners run (delete-qr before a -replace, then create-qr) through the same client, the workers it
    made (or tainted) written to the state document as Terraform would, and a failure raised as
    infra/terraform.py raises Terraform's, with each provisioner's `actfleet: ...` line in the output.
    (test_reconcile_e2e.py runs the real terraform.)"""

    def __init__(self, api):
        self.api, self.calls, self.tainted = api, [], set()

    def __call__(self, cfg, *, replace, targets, destroy, holds=None):
        self.calls.append({"replace": replace, "targets": targets, "destroy": destroy})
        self.holds = holds
        managed, lines = set(managed_workers(cfg)), []
        for worker in cfg.fleet.workers:
            address = worker_address(worker.name)
            if targets and address not in targets:
                continue
            # Terraform recreates a tainted resource on any apply that reaches it, asked or not.
            if worker.name in managed and address not in replace and worker.name not in self.tainted:
                continue
            try:
                if address in replace or worker.name in self.tainted:
                    self.api.delete_queued_resource(worker.zone, worker.name)
                self.api.create_queued_resource(
                    worker.zone, worker.name, queued_resource_request(cfg, worker, script="", unit="")
                )
                self.tainted.discard(worker.name)
            except ActfleetError as e:
                lines.append(f'terraform_data.workers["{worker.name}"] (local-exec): actfleet: {e}')
                self.tainted.add(worker.name)  # a failed create-time provisioner leaves it tainted
            managed.add(worker.name)
        write_state(cfg, sorted(managed))
        if lines:
            raise TerraformError(
                "terraform apply failed in fleet stack: Error: local-exec provisioner error", output="\n".join(lines)
            )


class Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, minutes: float) -> None:
        self.t += minutes * 60


def creates(fake, status=None, zone=None) -> int:
    return len(fake.calls(method="POST", path="/queuedResources$", status=status, zone=zone))


def test_suspending_is_waited_for_then_replaced_once_suspended(tmp_path, fake):
    cfg = make_cfg(tmp_path, count=1)
    api = api_for(fake)
    apply = Provisioners(api)
    assert reconcile_pass(cfg, api=api, apply=apply).outcome == "repaired"
    fake.configure(suspend_delay=3600)  # a suspension that takes a while
    fake.preempt(A, w(0))
    fake.clear_calls()
    report = reconcile_pass(cfg, api=api, apply=apply)
    [action] = report.actions
    assert (action.kind, report.outcome) == ("wait", "converged") and "never force-deleted" in action.reason
    assert fake.calls(method="DELETE") == [] and len(apply.calls) == 1  # nothing deleted, no apply
    fake.configure(suspend_delay=0)
    report = reconcile_pass(cfg, api=api, apply=apply)
    assert [(a.kind, a.cause) for a in report.actions] == [("replace", "preemption")]
    assert fake.qr_deletes() == [(w(0), "SUSPENDED")]
    assert fake.queued_resource_state(A, w(0)) == "ACTIVE"
    assert report.restarts["preemptions"] == 0  # counted by the pass that acted: the next report shows it
    assert reconcile_pass(cfg, api=api, apply=apply).restarts == {"preemptions": 1, "errors": 0, "by_class": {}}


def test_a_failed_queued_resources_reason_is_in_the_table_and_in_json(tmp_path, fake, monkeypatch):
    from click.testing import CliRunner

    from actfleet.config import TPU_ENDPOINT_ENV
    from actfleet.infra import reconcile as reconcile_mod
    from actfleet.infra.commands import reconcile as command

    config = write_fleet_toml(
        tmp_path / "fleet.toml",
        id="rc",
        zones={A: 1},
        state=tmp_path / "state",
        bucket="rc-activations",
        job={"model": "m", "input": "i", "layers": [1], "store": str(tmp_path / "store")},
    )
    fake.create_qr_direct(
        A,
        w(0),
        project="fake-project",
        labels=OURS,
        state="FAILED",
        error=("INVALID_ARGUMENT", "Accelerator type v5litepod-8 is not offered in us-central1-a"),
    )
    monkeypatch.setattr(reconcile_mod, "terraform_apply", Recorder())
    monkeypatch.setenv(TPU_ENDPOINT_ENV, fake.url)
    result = CliRunner().invoke(command.reconcile, ["--config", str(config), "--json", "--dry-run"])
    report = json.loads(result.stdout)
    jsonschema.validate(report, REPORT_JSON_SCHEMA)
    [action] = report["actions"]
    assert action["kind"] == "replace" and action["cause"] == "error"
    assert action["error"] == {
        "code": "INVALID_ARGUMENT",
        "class": "invalid-argument",
        "message": "Accelerator type v5litepod-8 is not offered in us-central1-a",
    }
    table = CliRunner().invoke(command.reconcile, ["--config", str(config), "--dry-run"]).stdout
    assert "queued resource FAILED: INVALID_ARGUMENT: Accelerator type v5litepod-8 is not offered" in table


def test_a_zone_whose_creates_keep_failing_is_retried_with_backoff_across_passes(tmp_path, fake):
    """One create per backoff step (5, 10, 20 min ...), not one per pass; the other zone is unaffected; the
    memory survives between passes and processes; the report says why and when the next attempt is."""
    # One fleet.toml for the passes in this process and the CLI's: the same config is the same release
    # (a different one would roll the workers, infra/rollout.py).
    config = write_fleet_toml(
        tmp_path / "fleet.toml",
        id="rc",
        state=tmp_path / "state",
        bucket="rc-activations",
        zones={A: 1},
        fleet={"workers": [w(0), "tpu-us-central1-b-0"]},
        job={"model": "m", "input": "i", "layers": [1], "store": str(tmp_path / "store")},
    )
    text = config.read_text().replace('zones = { "us-central1-a" = 1 }\n', "")
    config.write_text(text)
    cfg = load(config)
    api = api_for(fake)
    apply = Provisioners(api)
    fake.fail_creates("us-central1-b", "PERMISSION_DENIED", "Permission 'tpu.nodes.create' denied")
    clock = Clock(time.time())
    attempts_at = []  # minutes since the start at which zone b got a create
    for minute in range(0, 80):  # a pass every minute for 80 minutes
        if minute == 7:  # zone a needs an apply while zone b backs off: it must not retry b's create
            fake.preempt(A, w(0))
        before = creates(fake, zone="us-central1-b")
        report = reconcile_pass(cfg, api=api, apply=apply, clock=clock)
        if creates(fake, zone="us-central1-b") > before:
            attempts_at.append(minute)
        clock.advance(1)
    assert attempts_at == [0, 5, 15, 35, 75]  # 5, 10, 20, 40 minutes apart
    assert creates(fake, status=403) == 5 and fake.queued_resource_state(A, w(0)) == "ACTIVE"
    assert apply.calls[2] == {
        "replace": [worker_address(w(0))],
        "targets": [worker_address(w(0))],
        "destroy": False,
    }  # the minute-7 apply, limited to zone a's worker
    [_, b] = report.actions
    assert b.kind == "wait" and b.error["class"] == "permission" and "tpu.nodes.create" in b.error["message"]
    assert b.next_attempt == report.started_at - 4 * 60 + 60 * 60  # the 5th failure waits the full hour
    assert "create failed 5 times" in b.reason and "next attempt at" in b.reason
    assert report.restarts["errors"] == 5 and report.restarts["by_class"] == {"permission": 1}
    # Another process (the CLI, on the real clock) sees the same memory: not due, no terraform needed.
    env = {**os.environ, "ACTFLEET_TPU_ENDPOINT": fake.url}
    proc = subprocess.run(
        [ACTFLEET, "reconcile", "--config", str(config), "--json"], env=env, capture_output=True, text=True, timeout=300
    )
    doc = json.loads(proc.stdout)
    assert doc["outcome"] == "converged" and doc["terraform"]["ran"] is False, proc.stderr
    assert doc["actions"][1]["kind"] == "wait" and doc["actions"][1]["next_attempt"].endswith("Z")
    assert creates(fake) == 7  # 2 for zone a (created, replaced), 5 for zone b: none more


def test_a_stuck_suspended_queued_resource_is_deleted_again(tmp_path, fake):
    cfg = make_cfg(tmp_path, count=1)
    fake.create_qr_direct(A, w(0), project="fake-project", labels=OURS, state="SUSPENDED")
    fake.stick_delete(A, w(0), times=1)
    report = reconcile_pass(cfg, api=api_for(fake), apply=Recorder())
    assert report.api_deletes == {"deleted": [w(0)], "failed": {}}
    assert fake.qr_deletes() == [(w(0), "SUSPENDED"), (w(0), "SUSPENDED")]
    assert fake.queued_resource_state(A, w(0)) is None


def test_a_node_briefly_missing_from_a_listing_is_not_replaced(tmp_path, fake):
    cfg = make_cfg(tmp_path, count=1)
    api = api_for(fake)
    apply = Provisioners(api)
    clock = Clock(time.time())
    reconcile_pass(cfg, api=api, apply=apply, clock=clock)
    fake.hide_from_lists(A, w(0), lists=3)
    for _ in range(3):  # well past the node grace period, a pass each time
        clock.advance(10)
        report = reconcile_pass(cfg, api=api, apply=apply, clock=clock)
        assert [(a.kind, a.reason) for a in report.actions] == [("healthy", "queued resource ACTIVE, node READY")]
        assert report.confirmed == [w(0)]
    assert len(apply.calls) == 1 and fake.calls(method="DELETE") == []
    # Gone for real (a GET says so too): replaced once the grace period has passed.
    fake.state.nodes.clear()
    clock.advance(1)
    assert reconcile_pass(cfg, api=api, apply=apply, clock=clock).actions[0].kind == "pending"
    clock.advance(3)
    report = reconcile_pass(cfg, api=api, apply=apply, clock=clock)
    assert report.actions[0].kind == "replace" and "node is gone" in report.actions[0].reason


def test_a_long_lived_node_entering_repairing_is_not_over_the_provisioning_limit(tmp_path, fake):
    cfg = make_cfg(tmp_path, count=1, provision_timeout_minutes=30, on_provision_timeout="replace")
    api = api_for(fake)
    apply = Provisioners(api)
    clock = Clock(time.time())
    reconcile_pass(cfg, api=api, apply=apply, clock=clock)
    clock.advance(3 * 24 * 60)  # three days READY
    assert reconcile_pass(cfg, api=api, apply=apply, clock=clock).actions[0].kind == "healthy"
    fake.set_node_state(A, w(0), "REPAIRING")
    clock.advance(1)
    assert reconcile_pass(cfg, api=api, apply=apply, clock=clock).actions[0].kind == "pending"
    clock.advance(29)
    assert reconcile_pass(cfg, api=api, apply=apply, clock=clock).actions[0].kind == "pending"
    clock.advance(2)  # 31 min in REPAIRING: now it is over the limit
    report = reconcile_pass(cfg, api=api, apply=apply, clock=clock)
    assert report.actions[0].kind == "replace" and "REPAIRING for 31 min" in report.actions[0].reason


@pytest.fixture(params=["local", "gcs"])
def job_store(request, tmp_path):
    """The job's store, as workers and reconcile share it: a local directory, or GCS (the enforcing fake)."""
    if request.param == "local":
        yield str(tmp_path / "store")
        return
    from tests.fakes.gcs_server import FakeGcs

    fake_gcs = FakeGcs.start(port=0)
    old = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = fake_gcs.url
    _GCS_OF["gs://rc-activations/jobs"] = fake_gcs
    try:
        yield "gs://rc-activations/jobs"
    finally:
        _GCS_OF.pop("gs://rc-activations/jobs", None)
        if old is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = old
        fake_gcs.stop()


_GCS_OF: dict = {}  # job_store URL -> its FakeGcs


def beat(store, job: str, worker: str, at: float, state: str = "working") -> None:
    """A worker's record written at `at` on the test's clock. Heartbeats are the store's write times (the
    worker's own clock is only reported), so the store's time of this write is set to `at`: the local
    store's is the file's mtime, the fake GCS's the object's `updated`."""
    q.write_worker_record(store, job, q.WorkerProgress(worker, state=state))
    key = q.worker_key(job, worker)
    fake = _GCS_OF.get(store.url)
    if fake is not None:
        fake.backdate(store.bucket_name, f"{store.prefix}/{key}", fake.now() - at)
    else:
        os.utime(store.local_path(key), (at, at))


def prepared(tmp_path, job_store, count=2):
    cfg = make_cfg(tmp_path, count=count).replace("job", store=job_store)
    store = open_store(job_store)
    q.prepare(store, cfg.job.name, input="i", fingerprint="f" * 64, rows=4, unit_rows=1, options={})
    return cfg, store


def test_a_node_that_never_started_work_is_replaced_after_the_boot_timeout(tmp_path, fake, job_store):
    cfg, store = prepared(tmp_path, job_store)
    api = api_for(fake)
    apply = Provisioners(api)
    clock = Clock(time.time())
    assert reconcile_pass(cfg, api=api, apply=apply, clock=clock).counts == {"create": 2}
    q.write_worker_record(store, cfg.job.name, q.WorkerProgress(w(0), state="working"))  # w(0) booted
    for minutes in (1, 14, 14):
        clock.advance(minutes)
        report = reconcile_pass(cfg, api=api, apply=apply, clock=clock)
        assert [a.kind for a in report.actions] == ["healthy", "pending"]
        beat(store, cfg.job.name, w(0), clock())
    assert report.workers["records"] == 1 and report.workers["judged"] and report.workers["error"] is None
    clock.advance(3)  # seen READY 31 min ago (the pass after its create), w(1) never wrote a record
    report = reconcile_pass(cfg, api=api, apply=apply, clock=clock)
    assert [a.kind for a in report.actions] == ["healthy", "replace"]
    assert report.actions[1].reason.startswith("never started work: READY for 31 min")
    assert apply.calls[-1]["replace"] == [worker_address(w(1))]
    assert fake.qr_deletes() == [(w(1), "ACTIVE")] and fake.queued_resource_state(A, w(1)) == "ACTIVE"


def test_a_stalled_worker_is_replaced_after_the_heartbeat_timeout(tmp_path, fake, job_store):
    cfg, store = prepared(tmp_path, job_store)
    api = api_for(fake)
    apply = Provisioners(api)
    reconcile_pass(cfg, api=api, apply=apply)
    for i in (0, 1):
        q.write_worker_record(store, cfg.job.name, q.WorkerProgress(w(i), state="working"))
    clock = Clock(time.time())
    clock.advance(10)
    beat(store, cfg.job.name, w(0), clock())  # w(0) keeps beating
    clock.advance(6)  # w(1)'s last heartbeat is 16 min old
    report = reconcile_pass(cfg, api=api, apply=apply, clock=clock)
    assert [a.kind for a in report.actions] == ["healthy", "replace"]
    assert report.actions[1].reason == "stalled: last heartbeat 16 min ago (heartbeat timeout 15 min)"
    assert report.actions[1].error["class"] == "stalled"
    assert apply.calls[-1]["replace"] == [worker_address(w(1))]


def test_an_unreadable_store_is_reported_and_replaces_nothing(tmp_path, fake, monkeypatch):
    from tests.fakes.gcs_server import FakeGcs

    gcs = FakeGcs.start(port=0)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs.url)
    try:
        cfg, store = prepared(tmp_path, "gs://rc-activations/jobs", count=1)
        api = api_for(fake)
        apply = Provisioners(api)
        reconcile_pass(cfg, api=api, apply=apply)
        gcs.fail_next(10_000, 403)  # the store refuses every read from now on
        clock = Clock(time.time() + 3600)  # long past both timeouts, no record ever written
        report = reconcile_pass(cfg, api=api, apply=apply, clock=clock)
    finally:
        gcs.stop()
    assert [a.kind for a in report.actions] == ["healthy"] and "not judged" in report.actions[0].reason
    assert report.workers["error"] and "403" in report.workers["error"] and report.exit_code == 1
    assert any("boot and heartbeat not judged" in e for e in report.errors)
    assert len(apply.calls) == 1
