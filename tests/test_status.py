"""`actfleet status`: fleet only, fleet + work queue, an unreachable zone, --watch, and what it imports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from actfleet.config import load
from actfleet.infra.commands.status import take_snapshot
from actfleet.infra.tpu_api import TpuApi
from actfleet.store import open_store
from actfleet.work_queue import DoneRecord, ShardInfo, WorkerProgress, claim, commit, prepare, write_worker_record
from tests.conftest import write_fleet_toml
from tests.fakes.tpu_server import FakeTpuServer

ROOT = Path(__file__).resolve().parents[1]
ACTFLEET = str(Path(sys.executable).parent / "actfleet")
A, B = "us-central1-a", "us-central1-b"
OURS = {"actfleet-fleet": "st", "managed-by": "actfleet"}


@pytest.fixture
def setup(tmp_path):
    with FakeTpuServer.start(port=0) as fake:
        config = write_fleet_toml(
            tmp_path / "fleet.toml",
            id="st",
            zones={A: 2, B: 1},
            commit="b" * 40,
            bucket="st-activations",
            fleet={"tpu_endpoint": fake.url},
            job={"name": "j1", "model": "tiny", "input": "data.jsonl", "layers": [1], "store": str(tmp_path / "store")},
        )
        # tpu-us-central1-a-0 healthy, a-1 preempted, b-0 missing
        fake.create_qr_direct(A, "tpu-us-central1-a-0", project="fake-project", labels=OURS)
        fake.create_qr_direct(A, "tpu-us-central1-a-1", project="fake-project", labels=OURS)
        fake.preempt(A, "tpu-us-central1-a-1")
        env = {**os.environ, "ACTFLEET_TPU_ENDPOINT": fake.url}
        env.pop("ACTFLEET_CONFIG", None)
        yield fake, config, env, tmp_path


def run_status(config, env, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [ACTFLEET, "status", "--config", str(config), *args], env=env, capture_output=True, text=True, timeout=120
    )


def commit_units(store, job: str, worker: str, units: range, tokens_each: int) -> None:
    for unit in units:
        lease = claim(store, job, unit, worker, 60)
        now = time.time()
        name = f"shards/{unit:06d}-0000.{lease.tag}.safetensors"
        store.put(f"{job}/{name}", b"s" * 100)  # commit checks the listed shards are there
        record = DoneRecord(
            unit=unit,
            start=unit * 10,
            stop=unit * 10 + 10,
            worker=worker,
            attempt=1,
            rows_stored=10,
            tokens=tokens_each,
            skipped={},
            shards=[ShardInfo(name, 100, "0" * 64, tokens_each)],
            committed_at=now,
            seconds=2.0,
        )
        assert commit(store, lease, record, 60)


def by_worker(doc) -> dict:
    return {r["worker"]: r for r in doc["workers"]}


def test_fleet_only_shows_states_and_what_reconcile_would_do(setup):
    fake, config, env, _ = setup
    proc = run_status(config, env, "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["schema"] == "actfleet.status/v1"
    rows = by_worker(doc)
    assert (
        rows["tpu-us-central1-a-0"]["qr_state"],
        rows["tpu-us-central1-a-0"]["node_state"],
        rows["tpu-us-central1-a-0"]["health"],
    ) == ("ACTIVE", "READY", "healthy")
    assert (rows["tpu-us-central1-a-1"]["qr_state"], rows["tpu-us-central1-a-1"]["health"]) == ("SUSPENDED", "replace")
    assert (rows["tpu-us-central1-b-0"]["qr_state"], rows["tpu-us-central1-b-0"]["health"]) == (None, "create")
    assert doc["job"]["prepared"] is False and doc["throughput"] == {}
    human = run_status(config, env)
    assert human.returncode == 0
    for words in (
        "worker",
        "queued resource",
        "last heartbeat",
        "tpu-us-central1-a-1",
        "SUSPENDED",
        "workers: 1/3 healthy",
        "job j1: not prepared",
    ):
        assert words in human.stdout, human.stdout


def test_fleet_and_work_queue_progress_per_worker_with_totals_and_throughput(setup):
    fake, config, env, tmp = setup
    store = open_store(str(tmp / "store"))
    prepare(store, "j1", input="data.jsonl", fingerprint="f" * 64, rows=40, unit_rows=10, options={})
    commit_units(store, "j1", "tpu-us-central1-a-0", range(0, 3), tokens_each=1000)
    write_worker_record(store, "j1", WorkerProgress("tpu-us-central1-a-0", state="working", current_unit=3))
    proc = run_status(config, env, "--json")
    doc = json.loads(proc.stdout)
    a0 = by_worker(doc)["tpu-us-central1-a-0"]
    assert (a0["units_done"], a0["tokens"], a0["shards"], a0["current_unit"]) == (3, 3000, 3, 3)
    assert a0["last_heartbeat"] is not None and a0["health"] == "healthy"
    assert (doc["job"]["units_done"], doc["job"]["units_total"], doc["job"]["tokens"]) == (3, 4, 3000)
    assert doc["throughput"]["tokens_per_s"] > 0
    human = run_status(config, env).stdout
    assert "3/4 units (75.0%)" in human and "3,000 tokens" in human and "tokens/s" in human


def test_unreachable_zone_is_reported_and_the_rest_still_shown(setup):
    fake, config, env, tmp = setup
    fake.fail(zone=A, status=503, count=None)
    cfg = load(config)
    api = TpuApi(cfg.fleet.project, fake.url, retries=1, initial_backoff=0.01, max_backoff=0.02)
    snap = take_snapshot(cfg, api=api)
    assert list(snap.unreachable) == [A]
    rows = {r["worker"]: r for r in snap.rows}
    assert rows["tpu-us-central1-a-0"]["health"] == "wait"
    assert rows["tpu-us-central1-b-0"]["health"] == "create"


def test_api_down_entirely_still_shows_the_job(setup):
    fake, config, env, tmp = setup
    cfg = load(config)
    store = open_store(str(tmp / "store"))
    prepare(store, "j1", input="data.jsonl", fingerprint="f" * 64, rows=20, unit_rows=10, options={})
    commit_units(store, "j1", "tpu-us-central1-b-0", range(0, 2), tokens_each=7)

    class DownApi:
        calls = 0

        def observe(self, zones):
            raise RuntimeError("TPU API: no Google Cloud credentials found")

    snap = take_snapshot(cfg, api=DownApi())
    assert "no Google Cloud credentials" in snap.fleet_error
    assert snap.job["complete"] is True
    assert {r["worker"]: r["units_done"] for r in snap.rows}["tpu-us-central1-b-0"] == 2


def test_watch_json_refreshes_with_recent_throughput(setup):
    fake, config, env, tmp = setup
    store = open_store(str(tmp / "store"))
    prepare(store, "j1", input="data.jsonl", fingerprint="f" * 64, rows=100, unit_rows=10, options={})
    commit_units(store, "j1", "tpu-us-central1-a-0", range(0, 1), tokens_each=500)
    proc = subprocess.Popen(
        [ACTFLEET, "status", "--config", str(config), "--json", "--watch", "0.5"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        first = json.loads(proc.stdout.readline())
        commit_units(store, "j1", "tpu-us-central1-a-0", range(1, 3), tokens_each=500)
        for _ in range(40):  # a refresh that has seen the new commits
            doc = json.loads(proc.stdout.readline())
            if doc["job"]["tokens"] == 1500:
                break
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert first["job"]["tokens"] == 500 and doc["job"]["tokens"] == 1500
    assert "recent_tokens_per_s" in doc["throughput"]


def test_status_imports_no_cdktf_terraform_jax_or_torch(setup):
    fake, config, env, _ = setup
    probe = textwrap.dedent(f"""
        import sys
        from click.testing import CliRunner
        from actfleet.cli import cli
        r = CliRunner().invoke(cli, ["status", "--config", {str(config)!r}, "--json"])
        assert r.exit_code == 0, r.output
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("cdktf", "constructs", "jsii", "jax", "torch",
                       "transformers", "flax") or m in ("actfleet.infra.terraform", "actfleet.infra.synth_cache"))
        print(heavy)
    """)
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
