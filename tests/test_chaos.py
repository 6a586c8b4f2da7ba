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

from actfleet import work_queue as q
from actfleet.store import open_store
from actfleet.worker.verify import verify
from tests.fakes import standin_extractor as sx

REPO = Path(__file__).resolve().parents[1]


class Proc:
    """A subprocess whose output lines are collected by a thread, with a wait-for-line helper."""

    def __init__(self, argv: list[str], env: dict | None = None):
        self.p = subprocess.Popen(
            argv,
            cwd=REPO,
            env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
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


def standin_worker(store_url, job, worker, data, delay, lease_s, drain_s, env: dict | None = None) -> Proc:
    return Proc(
        [
            sys.executable,
            "-m",
            "tests.fakes.standin_extractor",
            store_url,
            job,
            worker,
            str(data),
            str(delay),
            str(lease_s),
            str(drain_s),
        ],
        env,
    )


def prepare_standin(tmp_path, rows=40, unit_rows=20):
    data = sx.write_dataset(tmp_path / "data.jsonl", rows)
    store = open_store(str(tmp_path / "bucket"))
    q.prepare(
        store, "job", input=str(data), fingerprint=sx.fingerprint(data), rows=rows, unit_rows=unit_rows, options={}
    )
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
    assert verify(store, "job", clean=True).ok  # the abandoned attempt's shards are garbage


# ----------------------------------------------------------------------------------------------------
# Chaos: seeded SIGKILLs at every phase of the protocol
# ----------------------------------------------------------------------------------------------------

import random  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from actfleet.worker.shards import read_tensors  # noqa: E402  (reads bfloat16, which safetensors.numpy cannot)

PHASES = ("claimed", "computing", "uploading", "committing")


def run_chaos(start_worker, *, workers: int, kills: int, seed: int) -> dict:
    """Keep `workers` processes running; SIGKILL one at each phase in turn (seeded choice of victim and of
    a short delay after the event) until `kills` kills are done, replacing each killed worker; then let
    them finish. Returns counts per phase killed."""
    rng = random.Random(seed)
    live: dict[str, Proc] = {}
    seen: dict[str, int] = {}
    started = 0

    def spawn():
        nonlocal started
        name = f"chaos-{started}"
        started += 1
        live[name] = start_worker(name)
        seen[name] = 0

    for _ in range(workers):
        spawn()
    killed = {p: 0 for p in PHASES}
    deadline = time.monotonic() + 600  # a safety net against a hung test, not an assertion
    k = 0
    while k < kills and time.monotonic() < deadline:
        phase = PHASES[k % len(PHASES)]
        # the first worker (in a seeded order) that reaches this phase from now on dies in it
        victim, finished = None, False
        while victim is None and time.monotonic() < deadline:
            for name in sorted(live, key=lambda _: rng.random()):
                proc = live[name]
                with proc.cond:
                    new = proc.lines[seen[name] :]
                    seen[name] = len(proc.lines)
                if any(line.startswith(phase + " ") for line in new):
                    victim = name
                    break
                if "<eof>" in new:  # exited on its own: the job is complete (rc 0) or it crashed
                    assert proc.p.wait() == 0, "\n".join(proc.lines[-30:])
                    finished = True
                    break
            else:
                time.sleep(0.005)
            if finished:
                break
        if victim is None:
            break
        time.sleep(rng.uniform(0, 0.03))
        live[victim].p.kill()
        live[victim].p.wait()
        del live[victim]
        killed[phase] += 1
        k += 1
        spawn()
    for name, proc in live.items():
        assert proc.p.wait(timeout=600) == 0, "\n".join(proc.lines[-30:])
    return killed


def unit_tensors(store, job: str, unit: int) -> dict[str, np.ndarray]:
    rec = q.read_done(store, job, unit)
    parts = [read_tensors(store.read(f"{job}/{s.name}")[0])[0] for s in rec.shards]
    return {k: np.concatenate([p[k] for p in parts]) for k in (parts[0] if parts else {})}


def assert_bitwise_equal(store_a, store_b, job: str, units: int, job_b: str | None = None) -> None:
    """Each unit's tensors (through its done record) and skipped rows in job `job` of store_a equal those of
    job `job_b` (default: the same name) in store_b, bit for bit."""
    job_b = job_b or job
    for unit in range(units):
        a, b = unit_tensors(store_a, job, unit), unit_tensors(store_b, job_b, unit)
        assert sorted(a) == sorted(b)
        for name in a:
            assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, (unit, name)
            assert a[name].tobytes() == b[name].tobytes(), f"unit {unit} {name} differs"
        assert q.read_done(store_a, job, unit).skipped == q.read_done(store_b, job_b, unit).skipped


@pytest.mark.slow
def test_chaos_over_the_standin_extractor(tmp_path):
    """The protocol under 20 SIGKILLs, fast (no model): the real engine's version is below."""
    data = sx.write_dataset(tmp_path / "data.jsonl", 120, bad_every=13, empty_every=17)
    stores = {}
    for name in ("reference", "chaos"):
        stores[name] = open_store(str(tmp_path / name))
        q.prepare(
            stores[name], "job", input=str(data), fingerprint=sx.fingerprint(data), rows=120, unit_rows=4, options={}
        )
    ref = standin_worker(stores["reference"].url, "job", "ref", data, 0.0, 30, 25)
    assert ref.p.wait(timeout=300) == 0
    from tests.fakes.lease_audit import AUDIT_ENV, takeover_violations

    audit = {AUDIT_ENV: str(tmp_path / "takeovers.jsonl")}  # which stale lease each take-over replaced
    killed = run_chaos(
        lambda name: standin_worker(stores["chaos"].url, "job", name, data, 0.01, 1.0, 25, env=audit),
        workers=4,
        kills=20,
        seed=7,
    )
    assert sum(killed.values()) == 20 and all(killed.values()), killed
    assert not takeover_violations(tmp_path / "takeovers.jsonl")  # tests/test_chaos_takeover.py forces the race
    rep = verify(stores["chaos"], "job", clean=True)  # killed attempts leave garbage; nothing else may be wrong
    assert rep.ok, rep.problems
    assert_bitwise_equal(stores["chaos"], stores["reference"], "job", 30)


def actfleet_argv(*args: str) -> list[str]:
    return [sys.executable, "-c", "from actfleet.cli import main; main()", *args]


@pytest.mark.slow
def test_chaos_with_the_real_engine_on_a_tiny_model(tmp_path):
    """4 `actfleet work` processes on a tiny random Qwen2, 20 seeded SIGKILLs across claim, compute, upload
    and commit; then verify passes and the stored activations equal an uninterrupted run's, bit for bit."""
    from actfleet.demo.tiny_model import make_tiny_model

    model = make_tiny_model(tmp_path / "model", seed=3)
    data = tmp_path / "data.jsonl"
    rng = random.Random(11)
    words = "the fox grid answer shard token lease unit worker bucket".split()
    data.write_text(
        "".join(
            json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))}) + "\n"
            for _ in range(96)
        )
    )
    env = {"ACTFLEET_JAX_CACHE": str(tmp_path / "jax-cache")}  # restarted workers reuse compiled programs
    stores = {name: tmp_path / name for name in ("reference", "chaos")}
    from actfleet.hashing import sha256_file
    from actfleet.job_options import JobOptions
    from actfleet.worker.engine_extractor import count_input_rows

    opts = JobOptions(
        model=str(model),
        sites=("blocks.0.hook_resid_post", "blocks.1.hook_resid_post"),
        positions="non-special",
        compute_dtype="bfloat16",
        store_dtype="bfloat16",
        shard_mb=0.002,
    )  # tiny shards: several parts per unit
    for path in stores.values():
        q.prepare(
            open_store(str(path)),
            "job",
            input=str(data),
            fingerprint=sha256_file(data),
            rows=count_input_rows(str(data), opts),
            unit_rows=3,
            options=opts,
        )
    ref = Proc(
        actfleet_argv("work", "--store", str(stores["reference"]), "--job", "job", "--worker-id", "ref"), env=env
    )
    assert ref.p.wait(timeout=600) == 0, "\n".join(ref.lines[-20:])

    def start(name: str) -> Proc:
        return Proc(
            actfleet_argv(
                "work", "--store", str(stores["chaos"]), "--job", "job", "--worker-id", name, "--lease-seconds", "2"
            ),
            env=env,
        )

    killed = run_chaos(start, workers=4, kills=20, seed=5)
    assert sum(killed.values()) == 20 and all(killed.values()), killed
    chaos, reference = open_store(str(stores["chaos"])), open_store(str(stores["reference"]))
    rep = verify(chaos, "job", clean=True)  # killed attempts leave garbage; nothing else may be wrong
    assert rep.ok, rep.problems
    assert rep.units_done == 32
    assert_bitwise_equal(chaos, reference, "job", 32)
