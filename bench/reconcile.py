"""Benchmark: a converged reconcile pass at 2,000, 5,000 and 10,000 workers over 16 zones (goal: <= 2 s at 10,000).

The fake TPU API and the fake GCS each run in a process of their own (as the real services are elsewhere),
so the client's threads do not share an interpreter with the servers; all three share this machine's cores.
Each size is a converged fleet: every worker's queued resource ACTIVE with its node READY and labelled with
the current release, the fleet's Terraform state holding every worker, the job prepared in the (fake) bucket
and every worker's record in it, and the reconcile memory written by a previous pass.

Measured side by side in one run, on the same fakes (pages of 50: a zone of 625 workers takes 13 pages):
  pass        a whole `reconcile_pass` (lock, Terraform state, memory, list 16 zones in parallel, merge,
              worker records from the store, decide, report; no terraform run), median of --repeats
  observe     observe_fleet() alone: per zone, list queued resources and nodes, all zones in parallel
  peer-proto  the same lists through the generated client, every page parsed into protobuf (the code path
              before the lists read JSON), zones in parallel
  peer-zones  our lists, zone after zone (no parallelism)
  peer-read   every worker record read from the store (what a pass did before it kept the records it read,
              and what the first pass of a process still does: "cold pass")

Printed, never asserted. Run: .venv/bin/python bench/reconcile.py [--workers 2000,5000,10000] [--zones 16]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actfleet import work_queue as q  # noqa: E402
from actfleet.config import parse  # noqa: E402
from actfleet.infra.decide import Policy, decide  # noqa: E402
from actfleet.infra.observe import merge, observe_fleet  # noqa: E402
from actfleet.infra.reconcile import read_liveness, reconcile_pass  # noqa: E402
from actfleet.infra.release_id import RELEASE_LABEL, release_id  # noqa: E402
from actfleet.infra.terraform_layout import FLEET, WORKERS, state_location  # noqa: E402
from actfleet.infra.tpu_api import TpuApi, ZoneError, ZoneView, _node, _queued_resource  # noqa: E402
from actfleet.store import open_store  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def fake_process(*argv: str):
    """`python -m <fake> --port 0 ...` in its own process; yields the URL it prints."""
    proc = subprocess.Popen([sys.executable, "-m", *argv, "--port", "0"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        yield proc.stdout.readline().strip()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def plant(url: str, workers, labels: dict) -> None:
    """Every worker's queued resource and node, through the fake's control endpoint (one keep-alive connection)."""
    conn = http.client.HTTPConnection(url.split("//", 1)[1], timeout=60)
    for w in workers:
        body = json.dumps({"zone": w.zone, "id": w.name, "project": "fake-project", "labels": labels})
        conn.request("POST", "/_fake/create-qr", body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        r.read()
        if r.status != 200:
            raise SystemExit(f"fake TPU API: planting {w.name}: HTTP {r.status}")
    conn.close()


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
                "max_workers": max(1000, workers),
            },
            "repo": {"url": "https://example.com/actfleet.git", "commit": "c" * 40},
            "storage": {"bucket": "bench-activations"},
            "state": {"path": state_dir},
            "job": {"model": "tiny", "input": "data.jsonl", "layers": [1]},
        }
    )


def converged_fleet(cfg, tpu_url: str) -> None:
    """Plant the cloud, the Terraform state and the bucket of a converged fleet of `cfg`."""
    release = release_id(cfg)
    plant(tpu_url, cfg.fleet.workers, {**cfg.fleet.labels, RELEASE_LABEL: release})
    instances = [
        {"index_key": w.name, "attributes": {"triggers_replace": {"release": release}}} for w in cfg.fleet.workers
    ]
    state = {
        "version": 4,
        "resources": [{"mode": "managed", "type": "terraform_data", "name": WORKERS, "instances": instances}],
    }
    path = Path(state_location(cfg, FLEET))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(state))
    store = open_store(cfg.job.store)
    q.prepare(
        store, cfg.job.name, input="i", fingerprint="f" * 64, rows=len(cfg.fleet.workers) * 4, unit_rows=1, options={}
    )
    with ThreadPoolExecutor(16) as pool:
        list(
            pool.map(
                lambda w: q.write_worker_record(store, cfg.job.name, q.WorkerProgress(w.name, state="working")),
                cfg.fleet.workers,
            )
        )


def timed(fn, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def measure(n: int, zones: int, repeats: int, page_size: int) -> dict:
    with (
        fake_process("tests.fakes.tpu_server", "--page-size", str(page_size)) as tpu_url,
        fake_process("tests.fakes.gcs_server") as gcs_url,
        tempfile.TemporaryDirectory() as tmp,
    ):
        os.environ["STORAGE_EMULATOR_HOST"] = gcs_url
        cfg = config(n, zones, tmp, tpu_url)
        t0 = time.perf_counter()
        converged_fleet(cfg, tpu_url)
        setup = time.perf_counter() - t0
        api = TpuApi(cfg.fleet.project, tpu_url)
        zone_names = cfg.fleet.zones
        t0 = time.perf_counter()
        first = reconcile_pass(cfg, api=api)  # reads every record once, writes the memory, warms connections
        t_cold = time.perf_counter() - t0
        assert first.outcome == "converged", (first.outcome, first.errors)
        t_pass, report = timed(lambda: reconcile_pass(cfg, api=api), repeats)
        assert report.outcome == "converged" and not report.errors, report.errors
        assert report.workers["records"] == n and report.workers["judged"], report.workers
        assert sum(a.kind == "healthy" for a in report.actions) == n, report.counts
        t_observe, view = timed(lambda: observe_fleet(api, zone_names), repeats)
        t_records, _ = timed(lambda: read_liveness(cfg), repeats)
        policy = Policy.from_config(cfg)
        t_decide, _ = timed(lambda: decide(cfg.fleet.workers, view.observed, time.time(), policy), repeats)

        def peer_proto():
            def zone(z):
                c = api._client()
                qrs = [
                    _queued_resource(x, z)
                    for p in api._pages(z, c.list_queued_resources, z)
                    for x in p.queued_resources
                ]
                nodes = [_node(x, z) for p in api._pages(z, c.list_nodes, z) for x in p.nodes]
                return ZoneView(tuple(qrs), tuple(nodes))

            with ThreadPoolExecutor(32) as pool:
                return merge(dict(zip(zone_names, pool.map(zone, zone_names))))

        def peer_zones():
            answer = {}
            for z in zone_names:
                try:
                    answer[z] = ZoneView(api.list_queued_resources(z), api.list_nodes(z))
                except Exception as e:  # noqa: BLE001
                    answer[z] = ZoneError(str(e))
            return merge(answer)

        store = open_store(cfg.job.store)
        t_records_all, got = timed(lambda: q.read_worker_records(store, cfg.job.name), 1)
        assert len(got) == n
        t_proto, got = timed(peer_proto, 1)
        assert len(got[0]) == n
        t_zones, got = timed(peer_zones, 1)
        assert len(got[0]) == n
        os.environ.pop("STORAGE_EMULATOR_HOST", None)
    return dict(
        n=n,
        setup=setup,
        t_cold=t_cold,
        t_records_all=t_records_all,
        t_pass=t_pass,
        t_observe=t_observe,
        t_records=t_records,
        t_decide=t_decide,
        t_proto=t_proto,
        t_zones=t_zones,
        calls=report.api_calls,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", default="2000,5000,10000", help="comma-separated fleet sizes")
    ap.add_argument("--zones", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--page-size", type=int, default=50)
    a = ap.parse_args()
    sizes = [int(x) for x in a.workers.split(",") if x]
    print(
        f"reconcile benchmark: converged fleets over {a.zones} zones, fake TPU API pages of {a.page_size}; "
        f"ours median of {a.repeats}, peers once; {os.cpu_count()} cores"
    )
    print(
        f"{'workers':>8} {'pass':>7} {'observe':>8} {'records':>8} {'decide':>7} {'calls':>6} "
        f"{'peer-proto':>10} {'ratio':>6} {'peer-zones':>10} {'ratio':>6} {'peer-read':>9} {'ratio':>6} "
        f"{'cold pass':>9} {'setup':>7}"
    )
    for n in sizes:
        r = measure(n, a.zones, a.repeats, a.page_size)
        print(
            f"{n:>8} {r['t_pass']:>6.2f}s {r['t_observe']:>7.2f}s {r['t_records']:>7.2f}s {r['t_decide']:>6.2f}s "
            f"{r['calls']:>6} {r['t_proto']:>9.2f}s {r['t_proto'] / r['t_observe']:>5.1f}x "
            f"{r['t_zones']:>9.2f}s {r['t_zones'] / r['t_observe']:>5.1f}x "
            f"{r['t_records_all']:>8.2f}s {r['t_records_all'] / r['t_records']:>5.1f}x "
            f"{r['t_cold']:>8.2f}s {r['setup']:>6.1f}s",
            flush=True,
        )
    print("  pass: a whole converged reconcile_pass, median; observe/records/decide: its parts measured alone")
    print(
        "  ratio: peer's time / ours. peer-proto, peer-zones vs observe: the lists parsed into protobuf by the "
        "generated client (zones in parallel); our lists zone after zone. peer-read vs records: every worker "
        "record read (before a pass kept the records it read)"
    )
    print("  cold pass: a process's first pass (no records kept yet, every one is read: also a timer-run pass)")


if __name__ == "__main__":
    main()
