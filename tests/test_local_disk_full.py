"""`actfleet local` when a worker finds its disk full (exit 74): it stops at once, with no restart of that
worker, the others stopped cleanly (SIGTERM, they drain), and one line naming the worker, its error, its log
and the full filesystem (exit 74, documented).

Real child processes and signals, the real process driver and decide(), over a prepared local store; the
workers are Python one-liners (one says what `actfleet work` says on a full disk and exits 74)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from actfleet import work_queue as q
from actfleet.demo.command import _drive, _Run, _View
from actfleet.demo.process_fleet import Chaos, ProcessFleet, local_workers, popen_logged
from actfleet.errors import EXIT_DISK_FULL, DiskFull
from actfleet.store import open_store

DRAINS = (
    "import signal, sys, time\n"
    "def bye(*a):\n"
    "    print('got SIGTERM: drained', flush=True); sys.exit(0)\n"
    "signal.signal(signal.SIGTERM, bye)\n"
    "print('working', flush=True)\n"
    "time.sleep(120)\n"
)


def test_a_worker_whose_disk_is_full_stops_the_run_at_once_and_the_others_cleanly(tmp_path):
    store_dir = tmp_path / "store"
    store = open_store(str(store_dir))
    q.prepare(store, "job", input="i", fingerprint="f" * 64, rows=4, unit_rows=1, options={})
    full = (
        f"actfleet: disk full: storing job/shards/000000-0000.safetensors in {store_dir}/job/shards: "
        "No space left on device (ENOSPC); free space (or raise the quota) and run it again"
    )
    started: list[tuple[str, int, subprocess.Popen]] = []

    def spawn(worker, incarnation, log_path):
        if worker.name == "local-0":  # once the others are working (their SIGTERM handler is in place)
            others = [str(tmp_path / "logs" / f"local-{i}.log") for i in (1, 2)]
            script = (
                "import os, sys, time\n"
                f"while not all(os.path.exists(p) and 'working' in open(p).read() for p in {others!r}):\n"
                "    time.sleep(0.05)\n"
                f"print({full!r}, file=sys.stderr); sys.exit({EXIT_DISK_FULL})"
            )
        else:
            script = DRAINS
        proc = popen_logged([sys.executable, "-c", script], log_path)
        started.append((worker.name, incarnation, proc))
        return proc

    fleet = ProcessFleet(
        local_workers(3), spawn, log_dir=tmp_path / "logs", stop_grace_s=30, stop_on=frozenset({EXIT_DISK_FULL})
    )
    try:
        with pytest.raises(DiskFull) as e:
            _drive(fleet, Chaos(0.0), store, "job", _Run(started=time.monotonic(), tokens_at_start=0), _View(True))
    finally:
        for *_, proc in started:  # a failing test must not leave sleepers behind
            if proc.poll() is None:
                proc.kill()
    line = str(e.value)
    assert e.value.exit_code == EXIT_DISK_FULL == 74
    assert "\n" not in line
    assert line.startswith("worker local-0 stopped: disk full: storing job/shards/"), line
    assert f"log {tmp_path / 'logs' / 'local-0.log'}" in line and "(ENOSPC)" in line
    # The filesystem named is the store's (the first absolute path in the worker's error), not a key's tail.
    assert f"the filesystem of {store_dir}/job/shards (mounted at /" in line and " free" in line, line
    # local-0 was started once and never again; nobody else was restarted either.
    assert sorted((n, i) for n, i, _ in started) == [("local-0", 1), ("local-1", 1), ("local-2", 1)]
    # The others were stopped cleanly: SIGTERM, they drained and exited 0 (no SIGKILL); nothing is left running.
    for name, _, proc in started:
        if name == "local-0":
            continue
        assert proc.returncode == 0, (name, proc.returncode)
        assert "got SIGTERM: drained" in (tmp_path / "logs" / f"{name}.log").read_text()
    assert fleet.slots == {}


def test_the_exit_code_is_documented_in_the_help():
    from click.testing import CliRunner

    from actfleet.demo.command import local

    out = CliRunner().invoke(local, ["--help"]).output
    assert "74" in out and "disk" in out
