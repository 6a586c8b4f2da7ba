"""`actfleet local`: the process fleet driven by decide(), chaos, and the whole system end to end.

The driver tests use real child processes (a Python one-liner that sleeps, or exits with a given code), real
signals and the real decide(); the end-to-end tests run `actfleet local` itself as a subprocess on the tiny
random model and check its summary against the shards on disk, read back with worker.reader.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infra.decide import CREATE, REMOVE, REPLACE
from infra.local_driver import Chaos, ProcessFleet, local_workers, popen_logged

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------
# The process fleet and decide()
# ----------------------------------------------------------------------------------------------------


def sleeper(seconds: float = 60.0, code: int = 0):
    """A spawn function whose workers sleep, then exit with `code`; it records what it started."""
    started = []

    def spawn(worker, incarnation, log_path):
        started.append((worker.name, incarnation))
        script = f"import sys, time; print('{worker.name} #{incarnation}', flush=True); time.sleep({seconds}); " \
                 f"sys.exit({code})"
        return popen_logged([sys.executable, "-c", script], log_path)

    return spawn, started


def wait_exit(fleet: ProcessFleet, name: str) -> None:
    fleet.slots[name].proc.wait(timeout=30)


def wait_for_log(path: Path, text: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not (path.is_file() and text in path.read_text()):
        assert time.monotonic() < deadline, f"{path} never said {text!r}"
        time.sleep(0.05)


@pytest.fixture
def fleet_of(tmp_path):
    fleets = []

    def make(n, spawn, **kw):
        f = ProcessFleet(local_workers(n), spawn, log_dir=tmp_path / "logs", stop_grace_s=5, **kw)
        fleets.append(f)
        return f

    yield make
    for f in fleets:
        f.stop_all()


def test_first_pass_creates_every_worker_and_a_second_changes_nothing(fleet_of):
    spawn, started = sleeper()
    fleet = fleet_of(3, spawn)
    acted = fleet.reconcile()
    assert [(a.worker, a.kind) for a in acted] == [("local-0", CREATE), ("local-1", CREATE), ("local-2", CREATE)]
    assert sorted(fleet.running()) == ["local-0", "local-1", "local-2"]
    assert fleet.reconcile() == []
    assert started == [("local-0", 1), ("local-1", 1), ("local-2", 1)]
    assert fleet.restarts == 0


def test_a_killed_worker_is_a_preempted_node_and_is_replaced_under_its_name(fleet_of, tmp_path):
    spawn, started = sleeper()
    fleet = fleet_of(3, spawn)
    fleet.reconcile()
    wait_for_log(tmp_path / "logs" / "local-1.log", "local-1 #1")
    old_pid = fleet.slots["local-1"].proc.pid
    assert fleet.kill("local-1")
    wait_exit(fleet, "local-1")
    acted = fleet.reconcile()
    assert [(a.worker, a.kind, a.reason) for a in acted] == [("local-1", REPLACE, "node PREEMPTED")]
    assert fleet.slots["local-1"].proc.pid != old_pid and fleet.slots["local-1"].incarnation == 2
    assert started[-1] == ("local-1", 2)
    assert fleet.restarts == 1 and fleet.failures == 0  # the driver's own kill is chaos, not a failure
    assert sorted(fleet.running()) == ["local-0", "local-1", "local-2"]
    # Both incarnations wrote to the worker's one log.
    wait_for_log(tmp_path / "logs" / "local-1.log", "local-1 #2")


def test_a_crashing_worker_is_replaced_and_counted_as_a_failure(fleet_of):
    spawn, _ = sleeper(seconds=0, code=3)
    fleet = fleet_of(1, spawn)
    fleet.reconcile()
    wait_exit(fleet, "local-0")
    acted = fleet.reconcile()
    assert [(a.kind, a.reason) for a in acted] == [(REPLACE, "node TERMINATED")]
    assert fleet.failures == 1 and fleet.restarts == 1
    assert any(e.kind == "exit" and e.detail == "exited with code 3" for e in fleet.events)


def test_job_complete_scales_the_fleet_to_zero_and_stops_running_workers(fleet_of):
    spawn, _ = sleeper()
    fleet = fleet_of(2, spawn)
    fleet.reconcile()
    procs = [s.proc for s in fleet.slots.values()]
    acted = fleet.reconcile(job_complete=lambda: True)
    assert sorted((a.worker, a.kind) for a in acted) == [("local-0", REMOVE), ("local-1", REMOVE)]
    assert fleet.slots == {} and all(p.poll() is not None for p in procs)
    assert fleet.reconcile(job_complete=True) == []  # nothing left, nothing created
    assert fleet.restarts == 0


def test_a_worker_that_finished_because_the_job_is_done_is_not_restarted(fleet_of):
    spawn, started = sleeper(seconds=0, code=0)
    fleet = fleet_of(2, spawn)
    fleet.reconcile()
    for name in list(fleet.slots):
        wait_exit(fleet, name)
    # job_complete is asked after observing, as the real loop does
    acted = fleet.reconcile(job_complete=lambda: True)
    assert {a.kind for a in acted} == {REMOVE}
    assert fleet.restarts == 0 and fleet.failures == 0 and len(started) == 2


def test_stop_all_terminates_every_worker_and_kills_those_that_ignore_sigterm(fleet_of):
    def spawn(worker, incarnation, log_path):
        ignore = "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); " if worker.index == 0 else ""
        return popen_logged([sys.executable, "-c", ignore + "print('up', flush=True); import time; time.sleep(60)"],
                            log_path)

    fleet = fleet_of(2, spawn)
    fleet.stop_grace_s = 1.0
    fleet.reconcile()
    procs = {n: s.proc for n, s in fleet.slots.items()}
    wait_for_log(fleet.log_dir / "local-0.log", "up")  # the stubborn one has installed its handler
    wait_for_log(fleet.log_dir / "local-1.log", "up")
    fleet.stop_all()
    assert procs["local-0"].returncode == -signal.SIGKILL
    assert procs["local-1"].returncode == -signal.SIGTERM
    assert fleet.slots == {}


# ----------------------------------------------------------------------------------------------------
# Chaos
# ----------------------------------------------------------------------------------------------------


def test_chaos_is_seeded_and_its_rate_is_per_worker_per_second():
    names = [f"local-{i}" for i in range(4)]
    draws_a = Chaos(0.05, seed=7)
    draws_b = Chaos(0.05, seed=7)
    seq_a = [draws_a.victims(names, 0.5) for _ in range(200)]
    seq_b = [draws_b.victims(names, 0.5) for _ in range(200)]
    assert seq_a == seq_b and any(seq_a)
    assert [Chaos(0.05, seed=8).victims(names, 0.5) for _ in range(200)] != seq_a
    # 4 workers x 2,000 s at 5%/s: about 400 kills; a binomial's 5 sigma is about 49
    c = Chaos(0.05, seed=1)
    kills = sum(len(c.victims(names, 1.0)) for _ in range(2000))
    assert 350 <= kills <= 450
    # the rate is per second whatever the tick: 0.25 s ticks give the same expectation
    c = Chaos(0.05, seed=2)
    kills = sum(len(c.victims(names, 0.25)) for _ in range(8000))
    assert 350 <= kills <= 450


def test_chaos_zero_never_kills_and_a_bad_rate_is_refused():
    assert all(Chaos(0.0).victims(["a", "b"], 10.0) == [] for _ in range(100))
    with pytest.raises(ValueError, match="chaos rate 1.5"):
        Chaos(1.5)
