"""Every read path checks what it reads (issue 27 item 3): shards' sizes against their done records, each
tensor read against the sha256 its writer recorded (whole shards against the done record where a shard has
none), one line exit 2 for a flipped byte, a truncated or an empty shard; and a job's shards directory is
read through its done records, so an export before `verify --clean` holds no attempt's duplicates."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from actfleet import work_queue as q
from actfleet.worker.reader import iter_batches, load, open_source
from actfleet.worker.shards import ShardFormatError, parse_header
from tests.fakes import standin_extractor as sx
from tests.fakes.gcs_server import fake_gcs  # noqa: F401  (fixture)
from tests.test_chaos import prepare_standin
from tests.test_export_saelens import SITE, sample_batch, write_shards
from tests.test_stats import run_standin

datasets = pytest.importorskip("datasets")
CLI = [sys.executable, "-c", "from actfleet.cli import main; main()"]


def flip_in(path, tensor: str) -> None:
    """Flip one bit in the middle of `tensor`'s bytes."""
    blob = bytearray(path.read_bytes())
    header, _, start = parse_header(bytes(blob))
    lo, hi = header[tensor]["data_offsets"]
    blob[start + (lo + hi) // 2] ^= 0x10
    path.write_bytes(bytes(blob))


def export(src, out, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, "export", "saelens", str(src), str(out), "--context-size", "4", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def one_line_exit_2(r, message: str) -> None:
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr


def test_a_flipped_byte_in_a_tensor_read_is_refused_by_name(tmp_path):
    shards = write_shards(tmp_path / "shards", [sample_batch()])
    victim = tmp_path / "shards" / shards[1].name
    flip_in(victim, SITE)
    one_line_exit_2(export(tmp_path / "shards", tmp_path / "out", "--site", SITE), f"{victim}: tensor {SITE}")
    with pytest.raises(ShardFormatError, match="sha256"):
        load(str(tmp_path / "shards"))
    # a tensor the reader does not read is not its business (verify reads everything)
    assert len(load(str(tmp_path / "shards"), sites=["hook_embed"])["hook_embed"]) == sum(s.tokens for s in shards)


def test_a_flipped_byte_in_a_bucket_shard_is_refused(tmp_path, fake_gcs):  # noqa: F811
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    shards = write_shards(tmp_path / "shards", [sample_batch()])
    flip_in(tmp_path / "shards" / shards[0].name, "positions")
    bucket = storage.Client(
        project="t", credentials=AnonymousCredentials(), client_options={"api_endpoint": fake_gcs.url}
    ).bucket("acts")
    for sh in shards:
        bucket.blob(f"run/{sh.name}").upload_from_string((tmp_path / "shards" / sh.name).read_bytes())
    with pytest.raises(ShardFormatError, match=f"{shards[0].name}: tensor positions"):
        list(iter_batches("gs://acts/run", sites=[SITE]))


def test_job_shards_are_checked_against_their_done_records(tmp_path):
    """Stand-in shards record no per-tensor digests: the reader checks them whole against the done record."""
    store, data = prepare_standin(tmp_path, rows=20, unit_rows=10)
    run_standin(store, data)
    job = tmp_path / "bucket" / "job"
    rec = q.read_done(store, "job", 1)
    victim = job / rec.shards[0].name
    good = victim.read_bytes()
    flip_in(victim, sx.SITES[0])
    with pytest.raises(ShardFormatError, match="its done record says"):
        load(str(job))
    victim.write_bytes(good[: len(good) // 2])  # truncated
    one_line_exit_2(
        export(job, tmp_path / "o1", "--site", sx.SITES[0]), f"{rec.shards[0].name}: {len(good) // 2} bytes"
    )
    victim.write_bytes(b"")  # empty
    one_line_exit_2(export(job, tmp_path / "o2", "--site", sx.SITES[0]), "0 bytes, its done record says")
    victim.unlink()
    one_line_exit_2(export(job, tmp_path / "o3", "--site", sx.SITES[0]), "missing (its done record lists it)")


def test_an_empty_shard_in_a_plain_directory_is_one_line(tmp_path):
    write_shards(tmp_path / "shards", [sample_batch()])
    (tmp_path / "shards" / "999999-0000.safetensors").write_bytes(b"")
    one_line_exit_2(export(tmp_path / "shards", tmp_path / "out", "--site", SITE), "empty file")


def test_exporting_a_jobs_shards_directory_before_verify_clean_reads_only_committed_shards(tmp_path):
    store, data = prepare_standin(tmp_path, rows=20, unit_rows=10)
    run_standin(store, data)
    job = tmp_path / "bucket" / "job"
    for s in q.read_done(store, "job", 0).shards:  # a dead attempt's copy of unit 0, not cleaned yet
        unit, part, _ = q.parse_shard_name(s.name)
        shutil.copy(job / s.name, job / q.shard_key("", unit, part, "a9-deadbeef"))
    src = open_source(str(job / "shards"))
    assert sorted(src.keys) == sorted(s.name for u in (0, 1) for s in q.read_done(store, "job", u).shards)
    assert export(job / "shards", tmp_path / "a", "--site", sx.SITES[0], "--json").returncode == 0
    assert export(job, tmp_path / "b", "--site", sx.SITES[0], "--json").returncode == 0
    a, b = datasets.load_from_disk(str(tmp_path / "a")), datasets.load_from_disk(str(tmp_path / "b"))
    assert len(a) == len(b) > 0
