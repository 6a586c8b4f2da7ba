"""Benchmark: one gce-mode observation of a fleet through the fake Compute Engine API: API calls and seconds.

The fake runs in a process of its own with a per-answer latency (as the real API is elsewhere). Measured side
by side in one run, on the same fake and instances (the fleet's label filter on, pages of 500):
  ours        ComputeApi.observe(): one list per zone, all zones in parallel (the default)
  aggregated  ComputeApi(observe_via="aggregated"): aggregatedList, page after page
  peer-serial the same per-zone lists, zone after zone (no parallelism)

Printed, never asserted. Run: .venv/bin/python bench/gce_observe.py [--workers 2000] [--zones 16] [--latency 0.05]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actfleet.infra.compute_api import ComputeApi  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LABELS = {"actfleet-fleet": "bench", "managed-by": "actfleet"}


@contextlib.contextmanager
def fake_compute_process(latency: float):
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.compute_server", "--port", "0", "--latency", str(latency)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc.stdout.readline().strip()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def control(url: str, name: str, body: dict) -> None:
    req = urllib.request.Request(f"{url}/_fake/{name}", data=json.dumps(body).encode(), method="POST")
    urllib.request.urlopen(req, timeout=60).read()


def measure(fn, repeats: int) -> tuple[float, int]:
    times, calls = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        calls = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), calls


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workers", type=int, default=2000)
    p.add_argument("--zones", type=int, default=16)
    p.add_argument("--latency", type=float, default=0.05, help="seconds the fake adds to every answer")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    zones = [f"us-central1-{c}" for c in "abcdefghijklmnopqrstuvwxyz"[: a.zones]]
    with fake_compute_process(0.0) as url:
        for i in range(a.workers):
            zone = zones[i % len(zones)]
            control(url, "insert", {"zone": zone, "name": f"w-{i}", "project": "fake-project", "labels": LABELS})
        control(url, "config", {"latency": a.latency})

        def run(via: str, serial: bool = False):
            api = ComputeApi("fake-project", url, fleet_id="bench", observe_via=via)
            if serial:
                seen = sum(len(api.list_instances(z)) for z in zones)
            else:
                seen = sum(len(v.nodes) for v in api.observe(zones).values())
            assert seen == a.workers, seen
            return api.calls

        rows = {
            "ours (per zone, parallel)": measure(lambda: run("zones"), a.repeats),
            "aggregated list": measure(lambda: run("aggregated"), a.repeats),
            "peer-serial (per zone, one by one)": measure(lambda: run("zones", serial=True), a.repeats),
        }
    print(f"{a.workers} instances in {a.zones} zones, {a.latency * 1000:.0f} ms per answer, median of {a.repeats}")
    ours = rows["ours (per zone, parallel)"][0]
    for name, (seconds, calls) in rows.items():
        print(f"  {name:36s} {calls:4d} API calls  {seconds:6.2f} s  ({seconds / ours:4.1f}x ours)")


if __name__ == "__main__":
    main()
