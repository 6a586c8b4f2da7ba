"""Processes killed and stopped for real: SIGTERM drain and SIGKILL chaos.

The drain tests run the real work loop in subprocesses over the stand-in extractor
(tests/fakes/standin_extractor.py), to control timing; the chaos test runs `actfleet work` on a tiny random
Qwen2 model (the real engine) and compares the result bit for bit with an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.fakes import standin_extractor as sx
from worker import queue as q
from worker.store import open_store
from worker.verify import verify

REPO = Path(__file__).resolve().parents[1]


class Proc:
    """A subprocess whose output lines are collected by a thread, with a wait-for-line helper."""

    def __init__(self, argv: list[str], env: dict | None = None):
        self.p = subprocess.Popen(argv, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.p.stdout:
            with self.cond:
                self.lines.append(line.rstrip("\n"))
                self.cond.notify_all()
        with self.cond:
            self.lines.append("<eof>")
            self.cond.notify_all()

    def wait_for(self, predicate, timeout=120) -> str | None:
        """The first line (from now on or already seen) matching predicate; None at EOF or timeout."""
        with self.cond:
            i = 0
            while True:
                while i < len(self.lines):
                    line = self.lines[i]
                    i += 1
                    if line == "<eof>":
                        return None
                    if predicate(line):
                        return line
                if not self.cond.wait(timeout):
                    return None


def standin_worker(store_url, job, worker, data, delay, lease_s, drain_s) -> Proc:
    return Proc([sys.executable, "-m", "tests.fakes.standin_extractor", store_url, job, worker, str(data),
                 str(delay), str(lease_s), str(drain_s)])


def prepare_standin(tmp_path, rows=40, unit_rows=20):
    data = sx.write_dataset(tmp_path / "data.jsonl", rows)
    store = open_store(str(tmp_path / "bucket"))
    q.prepare(store, "job", input=str(data), fingerprint=sx.fingerprint(data), rows=rows, unit_rows=unit_rows,
              options={})
    return store, data


@pytest.mark.parametrize("drain_s, finishes", [(60.0, True), (0.0, False)])
def test_sigterm_stops_claiming_and_ends_the_current_unit_cleanly(tmp_path, drain_s, finishes):
    store, data = prepare_standin(tmp_path)
    w = standin_worker(store.url, "job", "w1", data, 0.1, 30, drain_s)  # 5 batches of 0.1 s per unit
    line = w.wait_for(lambda s: s.startswith("computing"))
    unit = json.loads(line.split(" ", 1)[1])["unit"]
    w.p.send_signal(signal.SIGTERM)
    assert w.p.wait(timeout=120) == 0
    result = json.loads(w.wait_for(lambda s: s.startswith("result")).split(" ", 1)[1])
    assert result["stopped_by_signal"] and not result["job_complete"]
    # it claimed nothing after the signal
    assert sum(1 for s in w.lines if s.startswith("claimed")) == 1
    assert list(store.list("job/leases/")) == []  # committed (lease released) or abandoned (lease released)
    assert (store.generation(q.done_key("job", unit)) is not None) == finishes
    assert result["units_committed"] == int(finishes) and result["units_abandoned"] == int(not finishes)
    # no waiting for a lease to expire: a new worker finishes the job at once, and it verifies
    w2 = standin_worker(store.url, "job", "w2", data, 0.0, 30, 25)
    assert w2.p.wait(timeout=120) == 0
    assert verify(store, "job").ok
