"""Benchmark: observe + decide for 1,000 desired workers over 8 zones against the fake TPU API.

The fake runs in a process of its own (as the real API is elsewhere), so the client's threads do not
share an interpreter with the server. Measured side by side in one run, on the same fake (pages of 50, so
every zone's lists take 3 pages):
  ours       observe_fleet(): per zone, list queued resources and nodes (all zones in parallel), then decide()
  peer-zones the same lists, zone after zone (no parallelism)
  peer-gets  one GET per worker, one after another: what the replaced system's monitor loop did per node
and a whole converged `reconcile_pass` (lock, state read, observe, decide; no terraform).

Printed, never asserted. Run: .venv/bin/python bench/reconcile.py [--workers 1000] [--zones 8] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import contextlib  # noqa: E402
import urllib.request  # noqa: E402

from actfleet.config import parse  # noqa: E402
from actfleet.infra.decide import Policy, decide  # noqa: E402
from actfleet.infra.observe import merge, observe_fleet  # noqa: E402
from actfleet.infra.reconcile import reconcile_pass  # noqa: E402
from actfleet.infra.tpu_api import TpuApi, ZoneError, ZoneView  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def fake_tpu_process(page_size: int):
    """`python -m tests.fakes.tpu_server --port 0` in its own process; yields its URL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.tpu_server", "--port", "0", "--page-size", str(page_size)],
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
    req = urllib.request.Request(
        f"{url}/_fake/{name}",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    urllib.request.urlopen(req, timeout=30).read()


def config(workers: int, zones: int, state_dir: str, endpoint: str):
    letters = "abcdefghijklmnopqrstuvwxyz"[:zones]
    per_zone = {f"us-central1-{c}": workers // zones + (1 if i < workers % zones else 0) for i, c in enumerate(letters)}
    return parse(
        {
            "fleet": {
                "id": "bench",
                "project": "fake-project",
                "region": "us-central1",
                "zones": per_zone,
                "tpu_endpoint": endpoint,
            },
            "repo": {"url": "https://example.com/actfleet.git", "commit": "c" * 40},
            "storage": {"bucket": "bench-activations"},
            "state": {"path": state_dir},
            "job": {"model": "tiny", "input": "data.jsonl", "layers": [1]},
        }
    )


def timed(fn, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=1000)
    ap.add_argument("--zones", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--page-size", type=int, default=50)
    ap.add_argument("--latency-ms", type=float, default=50.0, help="round trip added per call in the last round")
    a = ap.parse_args()

    with fake_tpu_process(a.page_size) as url, tempfile.TemporaryDirectory() as tmp:
        cfg = config(a.workers, a.zones, tmp, url)
        labels = cfg.fleet.labels
        for w in cfg.fleet.workers:
            control(url, "create-qr", {"zone": w.zone, "id": w.name, "project": "fake-project", "labels": labels})
        zones = cfg.fleet.zones
        policy = Policy.from_config(cfg)
        api = TpuApi(cfg.fleet.project, url)
        observe_fleet(api, zones)  # warm up: clients and connections per thread

        def ours():
            view = observe_fleet(api, zones)
            return view, decide(cfg.fleet.workers, view.observed, time.time(), policy)

        def peer_zones():
            answer = {}
            for z in zones:
                try:
                    answer[z] = ZoneView(api.list_queued_resources(z), api.list_nodes(z))
                except Exception as e:  # noqa: BLE001
                    answer[z] = ZoneError(str(e))
            observed = merge(answer)[0]
            return decide(cfg.fleet.workers, observed, time.time(), policy)

        def peer_gets():
            return [api.get_queued_resource(w.zone, w.name) for w in cfg.fleet.workers]

        calls0 = api.calls
        t_ours, (view, actions) = timed(ours, a.repeats)
        calls_ours = (api.calls - calls0) // a.repeats
        assert sum(1 for x in actions if x.kind == "healthy") == a.workers, "the fleet should be all healthy"
        t_decide, _ = timed(lambda: decide(cfg.fleet.workers, view.observed, time.time(), policy), a.repeats)
        calls0 = api.calls
        t_zones, _ = timed(peer_zones, a.repeats)
        calls_zones = (api.calls - calls0) // a.repeats
        calls0 = api.calls
        t_gets, _ = timed(peer_gets, max(1, a.repeats // 2))
        calls_gets = (api.calls - calls0) // max(1, a.repeats // 2)
        t_pass, report = timed(lambda: reconcile_pass(cfg, api=api), a.repeats)
        assert report.outcome == "converged", report.errors
        # The same two list strategies with a real API's round trip added to every call.
        control(url, "fail", {"status": None, "count": None, "delay": a.latency_ms / 1000})
        t_ours_lat, _ = timed(ours, a.repeats)
        t_zones_lat, _ = timed(peer_zones, a.repeats)

    print(
        f"reconcile benchmark: {a.workers} workers over {a.zones} zones, fake TPU API pages of {a.page_size}, "
        f"median of {a.repeats}"
    )
    print(f"  observe+decide (zones in parallel):   {t_ours * 1000:8.1f} ms  {calls_ours:5d} API calls")
    print(f"    of which decide():                  {t_decide * 1000:8.1f} ms")
    print(
        f"  peer: same lists, zone after zone:    {t_zones * 1000:8.1f} ms  {calls_zones:5d} API calls  "
        f"-> ours is {t_zones / t_ours:.1f}x faster"
    )
    print(
        f"  peer: one GET per worker:             {t_gets * 1000:8.1f} ms  {calls_gets:5d} API calls  "
        f"-> ours is {t_gets / t_ours:.1f}x faster, {calls_gets / max(calls_ours, 1):.0f}x fewer calls"
    )
    print(
        f"  with {a.latency_ms:.0f} ms per API call: zones in parallel {t_ours_lat * 1000:.0f} ms, zone after zone "
        f"{t_zones_lat * 1000:.0f} ms -> ours is {t_zones_lat / t_ours_lat:.1f}x faster"
    )
    print(
        f"  converged reconcile pass (lock, state, observe, decide; no terraform): {t_pass * 1000:.1f} ms, "
        f"{report.api_calls} API calls"
    )


if __name__ == "__main__":
    main()
