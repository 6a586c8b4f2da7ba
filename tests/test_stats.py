"""Activation statistics (issue 23 item 1): every committed unit carries count, sums and sums of squares per
site; `actfleet stats` totals them exactly once (only the objects done records list), and the totals equal a
float64 recomputation from the stored shards, also after SIGKILLs and take-overs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from actfleet import work_queue as q
from actfleet.errors import InputError
from actfleet.store import open_store
from actfleet.worker.reader import ActivationDataset, iter_batches, load_stats
from actfleet.worker.shards import INDEX_TENSORS, SOURCE_TENSORS
from actfleet.worker.stats import NoStatistics, SiteStats, UnitStats, job_totals
from actfleet.worker.verify import verify
from actfleet.worker.work_loop import Worker
from tests.fakes import standin_extractor as sx
from tests.test_chaos import prepare_standin, run_chaos, standin_worker

CLI = [sys.executable, "-c", "from actfleet.cli import main; main()"]


def recomputed(location: str) -> dict[str, SiteStats]:
    """float64 statistics of every stored row at `location`, from the shards themselves."""
    rows: dict[str, list[np.ndarray]] = {}
    for b in iter_batches(location):
        for site in set(b) - set(INDEX_TENSORS) - set(SOURCE_TENSORS):
            rows.setdefault(site, []).append(b[site])
    return {site: SiteStats.of_rows(np.concatenate(parts), gram=True) for site, parts in rows.items()}


def assert_totals_match(location: str, *, gram: bool = False) -> None:
    totals, want = load_stats(location), recomputed(location)
    assert sorted(totals.sites) == sorted(want)
    for site, s in totals.sites.items():
        w = want[site]
        assert s.count == w.count  # exact: a unit counted twice (or not at all) fails here
        np.testing.assert_allclose(s.sum, w.sum, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(s.sumsq, w.sumsq, rtol=1e-5)
        assert s.sqnorm == pytest.approx(w.sqnorm, rel=1e-5)
        assert s.norm == pytest.approx(w.norm, rel=1e-5)
        if gram:
            np.testing.assert_allclose(s.gram, w.gram, rtol=1e-4, atol=1e-3)
        m = s.summary()
        assert m["norm_scaling_factor"] == pytest.approx(np.sqrt(w.d) / (w.norm / w.count), rel=1e-5)


def run_standin(store, data, worker="w1", **kw):
    spec = q.read_job(store, "job")
    return Worker(store, spec, sx.StandinExtractor(Path(data), worker=worker), worker, **kw).run()


def test_a_unit_redone_after_a_take_over_is_counted_once(tmp_path):
    store, data = prepare_standin(tmp_path, rows=40, unit_rows=10)
    # Attempt 1 at unit 0 computes and uploads its statistics, then dies before committing (lease expires).
    dead = q.claim(store, "job", 0, "dead", 0.05)
    ex = sx.StandinExtractor(Path(data))
    moments = UnitStats()
    for batch in ex.run(list(ex.rows(0, 10))):
        moments.add_batch(batch)
    store.put(q.stats_key("job", 0, dead.tag), moments.to_bytes())
    time.sleep(0.1)
    assert run_standin(store, data).job_complete  # takes unit 0 over: attempt 2 writes its own object
    objects = [k for k in store.list("job/stats/") if k.split("/")[-1].startswith("000000")]
    assert len(objects) == 2  # both attempts' statistics are in the store...
    assert_totals_match(str(tmp_path / "bucket" / "job"))  # ...and unit 0 counts once
    assert q.read_done(store, "job", 0).attempt == 2
    # The dead attempt's statistics are garbage (no done record lists them), like its shards; --clean removes
    # them and leaves the committed ones, which still sum the same.
    dead_stats = q.stats_key("job", 0, dead.tag)
    assert [(p.kind, p.key) for p in verify(store, "job").problems] == [("garbage", dead_stats)]
    assert verify(store, "job", clean=True).cleaned == [dead_stats] and store.generation(dead_stats) is None
    assert verify(store, "job").ok
    assert_totals_match(str(tmp_path / "bucket" / "job"))


@pytest.mark.slow
def test_totals_equal_a_float64_recomputation_after_chaos_kills(tmp_path):
    data = sx.write_dataset(tmp_path / "data.jsonl", 48, bad_every=13, empty_every=17)
    store = open_store(str(tmp_path / "bucket"))
    q.prepare(store, "job", input=str(data), fingerprint=sx.fingerprint(data), rows=48, unit_rows=4, options={})
    killed = run_chaos(
        lambda name: standin_worker(store.url, "job", name, data, 0.01, 1.0, 25), workers=3, kills=8, seed=3
    )
    assert sum(killed.values()) == 8 and killed["committing"], killed  # killed after uploading statistics
    assert verify(store, "job", clean=True).ok
    assert_totals_match(str(tmp_path / "bucket" / "job"))
    # the same through the shards directory and the command line
    r = subprocess.run(
        [*CLI, "stats", str(tmp_path / "bucket" / "job" / "shards"), "--json"], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["units_counted"] == out["units_total"] == 12
    assert out["sites"][sx.SITES[0]]["count"] == load_stats(str(tmp_path / "bucket" / "job")).sites[sx.SITES[0]].count


def test_the_real_engine_computes_them_on_the_device_moments_and_gram(tmp_path):
    """`actfleet extract --stats gram` on the tiny model: the runner's float32 device sums agree with the
    stored bfloat16 rows; `actfleet stats OUT` and the torch dataset expose them; --out writes the arrays."""
    from actfleet.demo.tiny_model import make_tiny_model

    model = make_tiny_model(tmp_path / "tiny", max_pos=64)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"doc {i} " + "lorem ipsum " * (1 + i % 3)}) + "\n" for i in range(12)))
    out = tmp_path / "out"
    r = subprocess.run(
        [*CLI, "extract", "--model", str(model), "--input", str(data), "--out", str(out), "--layers", "0,1"]
        + ["--positions", "all", "--max-seq", "60", "--unit-rows", "5", "--shard-mb", "0.02", "--stats", "gram"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "ACTFLEET_JAX_CACHE": str(tmp_path / "jax")},
    )
    assert r.returncode == 0, r.stderr
    assert_totals_match(str(out), gram=True)
    r = subprocess.run(
        [*CLI, "stats", str(out), "--out", str(tmp_path / "s.safetensors")], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert "blocks.0.hook_resid_post" in r.stdout
    from safetensors.numpy import load_file

    arrays = load_file(str(tmp_path / "s.safetensors"))
    totals = load_stats(str(out))
    s = totals.sites["blocks.1.hook_resid_post"]
    np.testing.assert_array_equal(arrays["blocks.1.hook_resid_post.mean"], s.mean())
    np.testing.assert_allclose(np.diag(arrays["blocks.1.hook_resid_post.covariance"]), s.variance(), atol=1e-6)
    ds = ActivationDataset(str(out), sites=["blocks.0.hook_resid_post"])
    assert list(ds.stats.sites) == ["blocks.0.hook_resid_post"]


def test_refusals_are_one_line_exit_2(tmp_path):
    store, data = prepare_standin(tmp_path, rows=20, unit_rows=10)
    run_standin(store, data)
    job = tmp_path / "bucket" / "job"
    # a plain directory of shards is no job
    plain = tmp_path / "plain"
    plain.mkdir()
    for key in store.list("job/shards/"):
        (plain / key.split("/")[-1]).write_bytes(store.read(key)[0])
    # a corrupt statistics object: its sha256 no longer matches the done record's
    rec = q.read_done(store, "job", 1)
    path = job / rec.stats.name
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 1
    path.write_bytes(bytes(blob))
    for where, message in ((plain, "not a job"), (job, "unit 1's statistics stats/000001")):
        r = subprocess.run([*CLI, "stats", str(where)], capture_output=True, text=True)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr
    with pytest.raises(InputError, match="the done record says"):
        job_totals(store, "job", 2, where="x")


def test_a_unit_without_statistics_is_refused_by_name(tmp_path):
    store, data = prepare_standin(tmp_path, rows=20, unit_rows=10)
    spec = q.read_job(store, "job")
    run_standin(store, data, max_units=1)
    none = Worker(
        store,
        q.JobSpec(**{**spec.__dict__, "options": spec.options.replace(stats="none")}),
        sx.StandinExtractor(Path(data)),
        "w2",
    )
    none.run()
    with pytest.raises(NoStatistics, match="carries no statistics"):
        load_stats(str(tmp_path / "bucket" / "job"))


def test_export_writes_them_beside_the_export(tmp_path):
    pytest.importorskip("datasets")
    from safetensors.numpy import load_file

    from actfleet.worker.export import MANIFEST, STATS_FILE, export_saelens

    store, data = prepare_standin(tmp_path, rows=20, unit_rows=10)
    run_standin(store, data)
    s = export_saelens(str(tmp_path / "bucket" / "job"), tmp_path / "out", site=sx.SITES[0], context_size=4)
    totals = load_stats(str(tmp_path / "bucket" / "job")).sites[sx.SITES[0]]
    assert s.stats["norm_scaling_factor"] == totals.summary()["norm_scaling_factor"]
    assert json.loads((tmp_path / "out" / MANIFEST).read_text())["stats"]["count"] == totals.count
    np.testing.assert_array_equal(load_file(str(tmp_path / "out" / STATS_FILE))[f"{sx.SITES[0]}.mean"], totals.mean())


def test_a_unit_whose_rows_were_all_skipped_sums_to_zero_at_its_width():
    # A unit of only empty or bad rows stores no rows: its statistics are zeros of the site's width, not a
    # reshape error that abandons the unit (extract --max-rows over a unit of one empty row hung on this).
    from actfleet.worker.stats import SiteStats

    empty = SiteStats.of_rows(np.zeros((0, 3, 4), np.float32))
    assert (empty.count, empty.d) == (0, 12) and not empty.sum.any()
    total = SiteStats.zeros(12)
    total.add(empty)
    assert total.count == 0
