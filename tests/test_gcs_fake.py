"""What each GCS test server enforces, shown through the real google-cloud-storage client.

- tests/fakes/gcs_server.py (ours): enforces ifGenerationMatch / ifGenerationNotMatch /
  ifMetagenerationMatch, so the lease and lock paths are tested against it;
- gcp-storage-emulator (PyPI): speaks the same API but IGNORES ifGenerationMatch. The test below pins that
  down, so nobody mistakes a pass against it for a tested precondition path (and so we notice if it ever
  starts enforcing).
"""

from __future__ import annotations

import socket

import pytest
from google.api_core import exceptions as gexc
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

from tests.fakes.gcs_server import FakeGcs, fake_gcs  # noqa: F401  (fixture)


def client_for(url: str) -> storage.Client:
    return storage.Client(project="test", credentials=AnonymousCredentials(), client_options={"api_endpoint": url})


def test_ours_enforces_generation_preconditions(fake_gcs):
    bucket = client_for(fake_gcs.url).bucket("b")
    blob = bucket.blob("leases/000001")
    blob.upload_from_string(b"first", if_generation_match=0)
    gen = blob.generation
    with pytest.raises(gexc.PreconditionFailed):
        bucket.blob("leases/000001").upload_from_string(b"second", if_generation_match=0)
    with pytest.raises(gexc.PreconditionFailed):
        bucket.blob("leases/000001").upload_from_string(b"second", if_generation_match=gen + 1)
    with pytest.raises(gexc.PreconditionFailed):
        bucket.blob("leases/000001").upload_from_string(b"x", if_generation_not_match=gen)
    with pytest.raises(gexc.PreconditionFailed):
        bucket.blob("leases/000001").upload_from_string(b"x", if_metageneration_match=7)
    with pytest.raises(gexc.PreconditionFailed):
        bucket.blob("leases/000001").delete(if_generation_match=gen + 1)
    assert bucket.blob("leases/000001").download_as_bytes() == b"first"
    b2 = bucket.blob("leases/000001")
    b2.upload_from_string(b"renewed", if_generation_match=gen)
    assert b2.generation > gen
    with pytest.raises(gexc.PreconditionFailed):
        bucket.blob("leases/000001").download_as_bytes(if_generation_match=gen)
    bucket.blob("leases/000001").delete(if_generation_match=b2.generation)
    with pytest.raises(gexc.NotFound):
        bucket.blob("leases/000001").download_as_bytes()


def test_ours_serves_ranges_listing_pages_and_resumable_uploads(fake_gcs, tmp_path):
    client = client_for(fake_gcs.url)
    bucket = client.bucket("b")
    payload = bytes(range(256)) * (40 * 1024 + 3)  # ~10 MiB: the client uses a resumable upload
    src = tmp_path / "big.bin"
    src.write_bytes(payload)
    bucket.blob("j/shards/000000-0000.safetensors").upload_from_filename(str(src), if_generation_match=0)
    blob = bucket.blob("j/shards/000000-0000.safetensors")
    assert blob.download_as_bytes() == payload
    assert blob.download_as_bytes(start=10, end=19) == payload[10:20]
    with pytest.raises(gexc.PreconditionFailed):  # preconditions hold for resumable uploads too
        bucket.blob("j/shards/000000-0000.safetensors").upload_from_filename(str(src), if_generation_match=0)
    for i in range(5):
        bucket.blob(f"j/done/{i:06d}").upload_from_string(b"{}")
    names = [b.name for b in client.list_blobs("b", prefix="j/done/", max_results=None, page_size=2)]
    assert names == [f"j/done/{i:06d}" for i in range(5)]
    it = client.list_blobs("b", prefix="j/", delimiter="/")
    assert list(it) == [] and set(it.prefixes) == {"j/done/", "j/shards/"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gcp_storage_emulator_does_not_enforce_if_generation_match():
    from gcp_storage_emulator.server import create_server

    port = _free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket="b")
    server.start()
    try:
        bucket = client_for(f"http://127.0.0.1:{port}").bucket("b")
        bucket.blob("leases/000001").upload_from_string(b"first", if_generation_match=0)
        # On real GCS (and on our fake) this second create-if-absent fails with 412. The emulator accepts it
        # and overwrites: two workers would both "hold" the lease. Hence our own fake for the lease tests.
        bucket.blob("leases/000001").upload_from_string(b"second", if_generation_match=0)
        assert bucket.blob("leases/000001").download_as_bytes() == b"second"
    finally:
        server.stop()
