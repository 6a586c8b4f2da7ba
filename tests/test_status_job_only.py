"""`actfleet status --store URL --job NAME` with no fleet.toml anywhere: the job's progress, per-worker records,
throughput and ETA, from a local store and from a gs:// one (the fake GCS) (issue 23, item 5)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from actfleet.store import open_store
from actfleet.work_queue import WorkerProgress, prepare, write_worker_record
from tests.fakes.gcs_server import fake_gcs  # noqa: F401  (fixture)
from tests.test_status import commit_units

ACTFLEET = str(Path(sys.executable).parent / "actfleet")


def run(cwd: Path, *args) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "ACTFLEET_CONFIG"}  # STORAGE_EMULATOR_HOST passes on
    return subprocess.run([ACTFLEET, "status", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def a_job_in(url: str) -> None:
    store = open_store(url)
    prepare(store, "j", input="data.jsonl", fingerprint="f" * 64, rows=40, unit_rows=10, options={})
    commit_units(store, "j", "w-0", range(0, 3), tokens_each=1000)  # each took 2 s: one unit to go
    write_worker_record(store, "j", WorkerProgress("w-0", state="working", current_unit=3))


@pytest.mark.parametrize("where", ["dir", "gs"])
def test_status_of_a_job_without_a_fleet_toml(tmp_path, where, request):
    if where == "gs":
        request.getfixturevalue("fake_gcs")  # STORAGE_EMULATOR_HOST: the gs:// store talks to the fake
        url = "gs://acts/jobs"
    else:
        url = str(tmp_path / "store")
    a_job_in(url)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()  # no fleet.toml here, and ACTFLEET_CONFIG unset
    r = run(cwd, "--store", url, "--job", "j", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert (doc["job"]["units_done"], doc["job"]["units_total"], doc["job"]["tokens"]) == (3, 4, 3000)
    w = {x["worker"]: x for x in doc["workers"]}["w-0"]
    assert (w["units_done"], w["tokens"], w["current_unit"], w["work_state"]) == (3, 3000, 3, "working")
    t = doc["throughput"]
    assert t["tokens_per_s"] > 0 and t["eta_s"] == pytest.approx(t["seconds"] / 3)  # 1 unit left at 3 per span
    human = run(cwd, "--store", url, "--job", "j")
    assert human.returncode == 0, human.stderr
    out = human.stdout
    assert "3/4 units (75.0%)" in out and "3,000 tokens" in out and "tokens/s" in out and "eta: " in out
    assert "w-0" in out and "healthy" not in out  # no fleet, so no health column claims


def test_without_a_fleet_toml_or_a_store_is_one_line(tmp_path):
    r = run(tmp_path, "--job", "j")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "no --store given" in r.stderr and "--store URL --job NAME" in r.stderr
    r = run(tmp_path, "--store", str(tmp_path / "nothing"), "--job", "j", "--json")
    doc = json.loads(r.stdout)
    assert r.returncode == 0 and doc["job"]["prepared"] is False  # an empty store: nothing prepared yet
