"""Lease contention: 16 claimer processes race over 200 units; every unit is committed exactly once and no
claimer crashes. Runs against the filesystem store (a temp dir) and against the GCS store talking to our
ENFORCING fake GCS server (tests/fakes/gcs_server.py; gcp-storage-emulator would not enforce the
preconditions, see test_gcs_fake.py).

Claimers also abandon some units without releasing them (as a killed worker would), so expired leases are
taken over with generation matches while others are claiming.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from actfleet import work_queue as q
from actfleet.store import open_store
from tests.fakes.gcs_server import fake_gcs  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[1]
CLAIMERS, UNITS, LEASE_S = 16, 200, 1.0


def claimer_main(store_url: str, job: str, worker: str, out: str, seed: int) -> None:
    """One claimer process: claim -> (sometimes abandon) -> commit, until every unit is done."""
    store = open_store(store_url)
    spec = q.read_job(store, job)
    rng = random.Random(seed)
    committed, abandoned, takeovers = [], 0, 0
    while True:
        nxt = q.next_unit(store, spec, worker, LEASE_S, offset=rng.randrange(spec.units))
        if nxt.all_done:
            break
        if nxt.lease is None:
            time.sleep(min(nxt.wait_seconds, 0.2))
            continue
        lease = nxt.lease
        takeovers += lease.attempt > 1
        if rng.random() < 0.05:  # die holding the lease: someone must take it over after expiry
            abandoned += 1
            continue
        start, stop = spec.unit_range(lease.unit)
        rec = q.DoneRecord(
            unit=lease.unit,
            start=start,
            stop=stop,
            worker=worker,
            attempt=lease.attempt,
            rows_stored=stop - start,
            tokens=1,
            skipped={},
            shards=[],
            committed_at=time.time(),
            seconds=0.0,
        )
        try:
            if q.commit(store, lease, rec, LEASE_S):
                committed.append(lease.unit)
        except q.LeaseLost:
            pass
    Path(out).write_text(json.dumps({"committed": committed, "abandoned": abandoned, "takeovers": takeovers}))


def run_contention(store_url: str, tmp_path: Path, env: dict) -> None:
    store = open_store(store_url)
    q.prepare(store, "race", input="x", fingerprint="0" * 64, rows=UNITS, unit_rows=1, options={})
    procs = []
    for i in range(CLAIMERS):
        out = tmp_path / f"claimer-{i}.json"
        code = (
            f"from tests.test_leases import claimer_main; "
            f"claimer_main({store_url!r}, 'race', 'w{i}', {str(out)!r}, {i})"
        )
        procs.append(
            (out, subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True))
        )
    committed = []
    stats = {"abandoned": 0, "takeovers": 0}
    for out, p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, f"claimer crashed:\n{err}"
        r = json.loads(out.read_text())
        committed += r["committed"]
        stats["abandoned"] += r["abandoned"]
        stats["takeovers"] += r["takeovers"]
    assert sorted(committed) == list(range(UNITS)), "every unit committed by exactly one claimer"
    assert list(store.list("race/done/")) == [q.done_key("race", u) for u in range(UNITS)]
    assert q.job_complete(store, "race")
    # Abandoned leases can only have been finished by a takeover: that path ran under contention too.
    assert stats["abandoned"] > 0 and stats["takeovers"] >= 1


def _env() -> dict:
    return dict(os.environ)


@pytest.mark.slow
def test_contention_on_the_filesystem_store(tmp_path):
    run_contention(str(tmp_path / "bucket"), tmp_path, _env())


@pytest.mark.slow
def test_contention_on_the_gcs_store_against_the_enforcing_fake(tmp_path, fake_gcs):
    run_contention("gs://race-bucket/prefix", tmp_path, _env())  # env carries STORAGE_EMULATOR_HOST
