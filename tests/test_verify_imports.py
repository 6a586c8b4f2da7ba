"""`actfleet verify` reads the shards' index tensors and checksums, never an activation: it loads neither
JAX nor ml_dtypes (about a CPU second to import, for its numpy casts). `verify --clean` runs in loops (the
chaos tests, a researcher's watch), so each run's start-up is paid many times.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import ml_dtypes

from actfleet import work_queue as q
from actfleet.store import open_store
from actfleet.worker.shards import read_tensors
from actfleet.worker.work_loop import Worker
from tests.fakes import standin_extractor as sx

REPO = Path(__file__).resolve().parents[1]

REPORT = (
    "import atexit, sys\n"
    "atexit.register(lambda: print('loaded', *sorted(m for m in ('jax', 'ml_dtypes') if m in sys.modules)))\n"
    "from actfleet.cli import main\n"
    "main()\n"
)


class Bfloat16Standin(sx.StandinExtractor):
    """The stand-in, storing its activations as bfloat16 (as the real engine does by default)."""

    def run(self, rows):
        for b in super().run(rows):
            yield dataclasses.replace(b, acts={k: a.astype(ml_dtypes.bfloat16) for k, a in b.acts.items()})


def test_verify_of_a_bfloat16_job_imports_neither_jax_nor_ml_dtypes(tmp_path):
    data = sx.write_dataset(tmp_path / "data.jsonl", 12)
    store = open_store(str(tmp_path / "bucket"))
    q.prepare(store, "job", input=str(data), fingerprint=sx.fingerprint(data), rows=12, unit_rows=4, options={})
    assert Worker(store, q.read_job(store, "job"), Bfloat16Standin(data), "w", lease_seconds=30).run().job_complete
    shard = q.read_done(store, "job", 0).shards[0].name
    tensors, _ = read_tensors(store.read(f"job/{shard}")[0])
    assert "bfloat16" in {str(a.dtype) for a in tensors.values()}  # the activations verify must not decode
    r = subprocess.run(
        [sys.executable, "-c", REPORT, "verify", "--store", store.url, "--job", "job"],
        cwd=REPO,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0 and "verified: OK" in r.stdout, r.stdout + r.stderr
    assert r.stdout.splitlines()[-1] == "loaded", r.stdout
