"""Benchmark: how fast `actfleet work` gets out of the way (issue 23 item 4, issue 27 item 10).

Stand-in worker processes (tests/fakes/standin_extractor.py: the real work loop, no model) on a local store.

1. Draining. SIGTERM with --drain-seconds D; the seconds from the signal to the exit, side by side:
     peer   a worker in the middle of a unit of quick batches (0.2 s each, 40 per unit): the loop sees the
            deadline after a batch and abandons the unit;
     ours   a worker blocked in one engine step that does not return (an hour-long batch): only the drain
            watchdog (DRAIN_GRACE_S after the deadline) can end it.
2. Lingering. Two workers over a job of units that take about a second each, leases of L seconds: the wall time
   from start to the last worker's exit, against the peer "time of the last commit" (the work itself). Before
   the fix, the worker that finished first slept a third of a lease (L/3) after its last unit.

A worker still running 60 s after the signal is killed and printed as inf. With --real, also `actfleet work` on a tiny random Qwen2 (the real engine), SIGTERM
during its uploads with --drain-seconds D: the seconds to its exit, against the peer D itself.
Printed, never asserted. Run: .venv/bin/python bench/worker_liveness.py [--drain 1] [--lease 60] [--real]
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from actfleet import work_queue as q  # noqa: E402
from actfleet.store import open_store  # noqa: E402
from tests.fakes import standin_extractor as sx  # noqa: E402


def worker(store: str, name: str, data: Path, delay: float, lease: float, drain: float) -> subprocess.Popen:
    argv = [sys.executable, "-m", "tests.fakes.standin_extractor", store, "job", name, str(data)]
    return subprocess.Popen(
        [*argv, str(delay), str(lease), str(drain)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def until_line(p: subprocess.Popen, prefix: str) -> None:
    for line in p.stdout:
        if line.startswith(prefix):
            return
    raise RuntimeError(f"worker exited before {prefix!r}")


def job(tmp: Path, rows: int, unit_rows: int) -> tuple[str, Path]:
    data = sx.write_dataset(tmp / "data.jsonl", rows)
    store = open_store(str(tmp / "store"))
    q.prepare(
        store, "job", input=str(data), fingerprint=sx.fingerprint(data), rows=rows, unit_rows=unit_rows, options={}
    )
    return store.url, data


def drain_seconds(delay: float, drain: float, rows: int) -> float:
    with tempfile.TemporaryDirectory() as d:
        store, data = job(Path(d), rows, rows)
        p = worker(store, "w1", data, delay, 60, drain)
        until_line(p, "computing")
        time.sleep(0.5)
        t = time.perf_counter()
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:  # still blocked a minute later (the loop before the watchdog)
            p.kill()
            p.wait()
            return float("inf")
        return time.perf_counter() - t


def linger(lease: float, units: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as d:
        store_url, data = job(Path(d), 4 * units, 4)
        t = time.time()
        procs = [worker(store_url, f"w{i}", data, 1.0, lease, 20) for i in range(2)]
        for p in procs:
            p.communicate(timeout=600)
        wall = time.time() - t
        store = open_store(store_url)
        last = max(json.loads(store.read(k)[0])["committed_at"] for k in store.list("job/done/"))
        return wall, last - t


def real_drain(drain: float) -> float:
    import threading

    from actfleet.demo.tiny_model import make_tiny_model
    from actfleet.hashing import sha256_file
    from actfleet.job_options import JobOptions
    from actfleet.worker.engine_extractor import count_input_rows

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        model = make_tiny_model(d / "model", seed=3)
        data = d / "data.jsonl"
        data.write_text("".join(json.dumps({"text": "the fox grid shard " * (1 + i % 5)}) + "\n" for i in range(3000)))
        opts = JobOptions(model=str(model), sites=("blocks.0.hook_resid_post",), shard_mb=0.002)
        rows = count_input_rows(str(data), opts)
        q.prepare(
            open_store(str(d / "store")),
            "job",
            input=str(data),
            fingerprint=sha256_file(data),
            rows=rows,
            unit_rows=1000,
            options=opts,
        )
        argv = ["work", "--store", str(d / "store"), "--job", "job", "--worker-id", "w1", "--drain-seconds", str(drain)]
        p = subprocess.Popen(
            [sys.executable, "-c", "from actfleet.cli import main; main()", *argv],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for line in p.stderr:
            if line.startswith("uploading"):
                break
        threading.Thread(target=p.stderr.read, daemon=True).start()  # keep its stderr pipe from filling
        t = time.perf_counter()
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=120)
        return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--drain", type=float, default=1.0)
    ap.add_argument("--lease", type=float, default=60.0)
    ap.add_argument("--units", type=int, default=5)
    ap.add_argument("--real", action="store_true", help="also the real engine on a tiny model (slower)")
    a = ap.parse_args()
    if a.real:
        secs = real_drain(2.0)
        print(f"real engine, drain 2.0 s: SIGTERM -> exit {secs:.2f} s; ratio to the drain {secs / 2.0:.2f}")
    peer = drain_seconds(0.2, a.drain, 160)
    ours = drain_seconds(3600.0, a.drain, 8)
    print(
        f"drain {a.drain:.1f} s: SIGTERM -> exit  peer (quick batches) {peer:.2f} s   ours (blocked step) {ours:.2f} s"
    )
    print(f"  ratio blocked/quick {ours / peer:.2f}  (bound: drain + DRAIN_GRACE_S 2 s + release)")
    wall, work = linger(a.lease, a.units)
    print(
        f"linger: 2 workers, {a.units} units of ~1 s, lease {a.lease:.0f} s: last commit {work:.1f} s, last exit "
        f"{wall:.1f} s; ratio {wall / work:.2f} (before: up to lease/3 = {a.lease / 3:.0f} s more)"
    )


if __name__ == "__main__":
    main()
