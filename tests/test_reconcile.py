"""reconcile_pass's act step without Terraform (fast): what it hands to the one apply, what it deletes
through the TPU API, and how it ends. The apply is a recorder standing in for actfleet.infra.terraform; the TPU API
is the fake, over the real client. The real-terraform version of these stories is test_reconcile_e2e.py."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from actfleet.config import parse
from actfleet.errors import ActfleetError
from actfleet.infra.lock import LOCK_KEY, ReconcileLock
from actfleet.infra.reconcile import REPORT_JSON_SCHEMA, managed_workers, reconcile_pass
from actfleet.infra.terraform_layout import FLEET, state_location
from actfleet.infra.tpu_api import TpuApi
from tests.conftest import write_fleet_toml
from tests.fakes.tpu_server import FakeTpuServer
from actfleet.store import open_store

A = "us-central1-a"
OURS = {"actfleet-fleet": "rc", "managed-by": "actfleet"}


def make_cfg(tmp: Path, count: int = 3, **reconcile):
    return parse({"fleet": {"id": "rc", "project": "fake-project", "region": "us-central1", "zones": {A: count}},
                  "repo": {"url": "https://example.com/r.git", "commit": "d" * 40},
                  "storage": {"bucket": "rc-activations"}, "state": {"path": str(tmp / "state")},
                  "job": {"model": "m", "input": "i", "layers": [1], "store": str(tmp / "store")},
                  "reconcile": reconcile})


def write_state(cfg, names) -> None:
    """A Terraform state document holding these workers (the shape `terraform apply` writes)."""
    path = Path(state_location(cfg, FLEET))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"version": 4, "resources": [
        {"mode": "managed", "type": "terraform_data", "name": "workers", "each": "map",
         "instances": [{"index_key": n, "attributes": {}} for n in names]},
        {"mode": "managed", "type": "terraform_data", "name": "other", "instances": [{"attributes": {}}]}]}))


class Recorder:
    def __init__(self, fail: str | None = None):
        self.calls, self.fail = [], fail

    def __call__(self, cfg, *, replace, targets, destroy):
        self.calls.append({"replace": replace, "targets": targets, "destroy": destroy})
        if self.fail:
            raise ActfleetError(self.fail)


@pytest.fixture
def fake():
    with FakeTpuServer.start(port=0) as fake:
        yield fake


def api_for(fake):
    return TpuApi("fake-project", fake.url, retries=1, initial_backoff=0.01, max_backoff=0.02)


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


def test_watch_reads_fleet_toml_again_every_pass_and_skips_a_pass_whose_config_is_broken(tmp_path, fake,
                                                                                          monkeypatch):
    """`reconcile --watch`: an edit to fleet.toml between passes is the next pass's desired state; a
    broken file skips that pass (one line on stderr, no lock, no apply) and the watch goes on; interrupted
    right after such a pass, it exits 2 (bad input)."""
    from click.testing import CliRunner

    from actfleet.config import TPU_ENDPOINT_ENV
    from actfleet.infra import reconcile as reconcile_mod
    from actfleet.infra.commands import reconcile as command

    config = tmp_path / "fleet.toml"

    def good(count: int) -> str:
        return write_fleet_toml(tmp_path / "rendered.toml", id="rc", zones={A: count}, commit="d" * 40,
                                state=tmp_path / "state", bucket="rc-activations",
                                job={"model": "m", "input": "i", "layers": [1], "store": str(tmp_path / "store")}
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
