"""Benchmark: apply, roll and destroy a queued-mode fleet with the real terraform binary, its provisioners
running the real `actfleet tpu create-qr` / `delete-qr --no-wait` against the fake TPU API answering with
the real API's kind of latency; wall time per phase. Goal (issue 24): a full roll of 1,000 under 15 min.

Per run, in a fresh state and synth folder: synth (cdktf), init, apply N workers, roll (a new commit changes
every worker's request; reconcile passes replace `[rollout] max_unavailable` workers a wave, default 10%,
the next wave once the previous one is READY: the worker-record rules are off, as with no job running, so
READY counts as started), destroy (terraform destroy; its deletes are asked for, not waited out) and gone
(until the fake holds no queued resource). Measured side by side in one run: ours, `[rollout]
terraform_parallelism` = 50 (our default), and the peer, 10 (Terraform's default).

The fake answers every call after --latency-ms (the real API: ~0.1-0.5 s a call) and runs the lifecycle on
the real API's clock divided by --time-scale: ACCEPTED->PROVISIONING 30 s, PROVISIONING->ACTIVE 180 s, a
delete 60 s (typical of v5e spot fills and deletes as seen in practice: not a documented figure). Each
provisioner is a Python process: on a small machine the processes, not the API, can bound an apply, so the
per-process cost (`actfleet tpu create-qr` start-up) is printed too.

Printed, never asserted. Run: .venv/bin/python bench/fleet_apply.py [--workers 1000] [--zones 4]
  [--time-scale 10] [--latency-ms 200] [--parallelism 50,10]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actfleet.config import load  # noqa: E402
from actfleet.infra.reconcile import reconcile_pass  # noqa: E402
from actfleet.infra.release_id import RELEASE_LABEL, release_id  # noqa: E402
from actfleet.infra.synth_cache import synth  # noqa: E402
from actfleet.infra.terraform import fleet_stack  # noqa: E402
from tests.conftest import write_fleet_toml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REAL = {"accept": 30.0, "provision": 180.0, "delete": 60.0}  # seconds on the real API's clock (see above)


@contextlib.contextmanager
def fake_tpu(scale: float, latency_ms: float):
    args = [
        "--accept-delay", str(REAL["accept"] / scale),
        "--provision-delay", str(REAL["provision"] / scale),
        "--delete-delay", str(REAL["delete"] / scale),
    ]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.tpu_server", "--port", "0", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        url = proc.stdout.readline().strip()
        post(url, "config", {"latency": latency_ms / 1000})
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def post(url: str, name: str, body: dict) -> None:
    req = urllib.request.Request(
        f"{url}/_fake/{name}",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    urllib.request.urlopen(req, timeout=30).read()


def fake_state(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/_fake/state", timeout=120) as r:
        return json.loads(r.read())


def write(tmp: Path, workers: int, zones: int, parallelism: int, commit: str):
    letters = "abcdefghijklmnopqrstuvwxyz"[:zones]
    per_zone = {f"us-central1-{c}": workers // zones + (1 if i < workers % zones else 0) for i, c in enumerate(letters)}
    path = write_fleet_toml(
        tmp / "fleet.toml",
        zones={z: n for z, n in per_zone.items() if n},
        state=tmp / "state",
        commit=commit,
        fleet={"max_workers": max(1000, workers)},
        job={"store": str(tmp / "store")},
        reconcile={"boot_timeout_minutes": 0, "heartbeat_timeout_minutes": 0},
    )
    path.write_text(path.read_text() + f"[rollout]\nterraform_parallelism = {parallelism}\n")
    return load(path)


def released(url: str) -> dict[str, tuple[str, str]]:
    out = {}
    for qr in fake_state(url)["queuedResources"]:
        labels = qr["tpu"]["nodeSpec"][0]["node"]["labels"]
        out[qr["name"].rsplit("/", 1)[1]] = (labels.get(RELEASE_LABEL, ""), qr["state"]["state"])
    return out


def run(workers: int, zones: int, parallelism: int, scale: float, latency_ms: float, log) -> dict:
    times: dict[str, float] = {}
    with fake_tpu(scale, latency_ms) as url, tempfile.TemporaryDirectory() as tmp_:
        tmp = Path(tmp_)
        os.environ["ACTFLEET_TPU_ENDPOINT"] = url
        os.environ["ACTFLEET_SYNTH_DIR"] = str(tmp / "synth")
        cfg1 = write(tmp, workers, zones, parallelism, "1" * 40)
        t0 = time.perf_counter()
        synth(cfg1)
        times["synth"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        tf = fleet_stack(cfg1)  # the synth is cached now: this is the init
        times["init"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        tf.apply()
        times["apply"] = time.perf_counter() - t0
        log(f"  p={parallelism}: applied {workers} in {times['apply']:.1f} s")
        # Roll: a new commit changes every request; passes until every worker runs the new release, ACTIVE.
        cfg2 = write(tmp, workers, zones, parallelism, "2" * 40)
        r2 = release_id(cfg2)
        t0, passes, waves = time.perf_counter(), 0, set()
        while True:
            report = reconcile_pass(cfg2)
            passes += 1
            if report.errors and report.outcome == "failed":
                raise SystemExit(f"roll: pass {passes} failed: {report.errors}")
            waves.add(report.rollout.get("wave"))
            now = released(url)
            if len(now) == workers and all(v == (r2, "ACTIVE") for v in now.values()) and report.outcome == "converged":
                break
            if report.outcome == "converged":  # nothing to do this pass: the wave is still provisioning
                time.sleep(1.0)
        times["roll"] = time.perf_counter() - t0
        log(f"  p={parallelism}: rolled in {times['roll']:.1f} s, {passes} passes")
        t0 = time.perf_counter()
        fleet_stack(cfg2).destroy()
        times["destroy"] = time.perf_counter() - t0
        while fake_state(url)["queuedResources"]:
            time.sleep(0.5)
        times["gone"] = time.perf_counter() - t0
        times["passes"] = passes
        times["waves"] = len([w for w in waves if w])
    return times


def process_cost(n: int = 5) -> float:
    """Median wall seconds of one `actfleet tpu create-qr` (start-up, one create, exit) against a fake with
    no latency: what each provisioner costs this machine."""
    actfleet = str(Path(sys.executable).with_name("actfleet"))
    times = []
    with fake_tpu(1e9, 0) as url:
        for i in range(n):
            request = {
                "tpu": {
                    "nodeSpec": [
                        {
                            "parent": "projects/fake-project/locations/us-central1-a",
                            "nodeId": f"p-{i}",
                            "node": {"acceleratorType": "v5litepod-8", "runtimeVersion": "v2-alpha-tpuv5-lite"},
                        }
                    ]
                },
                "spot": {},
            }
            env = {**os.environ, "ACTFLEET_TPU_ENDPOINT": url, "ACTFLEET_TPU_REQUEST": json.dumps(request)}
            t0 = time.perf_counter()
            subprocess.run(
                [actfleet, "tpu", "create-qr", "--project", "fake-project", "--zone", "us-central1-a", "--id", f"p-{i}"],
                env=env, check=True, capture_output=True,
            )  # fmt: skip
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=1000)
    ap.add_argument("--zones", type=int, default=4)
    ap.add_argument("--time-scale", type=float, default=10.0, help="the real lifecycle's seconds divided by this")
    ap.add_argument("--latency-ms", type=float, default=200.0, help="every API answer's delay (not scaled)")
    ap.add_argument("--parallelism", default="50,10", help="ours first, then the peer (comma-separated)")
    a = ap.parse_args()
    runs = [int(p) for p in a.parallelism.split(",")]

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    per_process = process_cost()
    print(
        f"fleet apply benchmark: {a.workers} workers over {a.zones} zones, real terraform, provisioners "
        f"`actfleet tpu create-qr/delete-qr`; fake TPU API: {a.latency_ms:.0f} ms a call, lifecycle "
        f"(accept {REAL['accept']:.0f} s, provision {REAL['provision']:.0f} s, delete {REAL['delete']:.0f} s) "
        f"/ {a.time_scale:g}; {os.cpu_count()} cores"
    )
    print(f"  one provisioner process (actfleet tpu create-qr, start to exit): {per_process:.2f} s")
    results = {p: run(a.workers, a.zones, p, a.time_scale, a.latency_ms, log) for p in runs}
    phases = ["synth", "init", "apply", "roll", "destroy", "gone"]
    print(f"  {'parallelism':>11} " + " ".join(f"{ph:>8}" for ph in phases) + "  passes waves")
    for p, t in results.items():
        print(f"  {p:>11} " + " ".join(f"{t[ph]:>7.1f}s" for ph in phases) + f"  {t['passes']:>6} {t['waves']:>5}")
    if len(runs) > 1:
        ours, peer = results[runs[0]], results[runs[1]]
        print(
            f"  parallelism {runs[0]} vs {runs[1]}: apply {peer['apply'] / ours['apply']:.1f}x, "
            f"roll {peer['roll'] / ours['roll']:.1f}x, destroy {peer['destroy'] / ours['destroy']:.1f}x faster"
        )
    print(
        f"  the roll on the real clock is about roll x {a.time_scale:g} where the lifecycle dominates, and the "
        "roll itself where the processes do (see the per-process cost)"
    )


if __name__ == "__main__":
    main()
