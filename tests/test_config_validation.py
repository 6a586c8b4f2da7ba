"""fleet.toml values GCS or Terraform would take differently from us are refused (or normalised) at load.

Issue 27 items 6, 7 and 16: a state prefix with a trailing "/", a bucket name GCS rejects, "gs://" with no
bucket, a worker count nobody means, and the reconcile lock on a bucket (a real cross-machine lock in GCS).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from actfleet import config
from actfleet.errors import EXIT_BAD_INPUT, ConfigError
from tests.fakes.gcs_server import fake_gcs  # noqa: F401  (fixture)
from tests.test_config import GOOD, REPO, with_line


def parse_text(text: str) -> config.Config:
    import tomllib

    return config.parse(tomllib.loads(text), source="fleet.toml")


def gcs_state(prefix: str) -> str:
    return GOOD + f'\n[state]\nbackend = "gcs"\nbucket = "my-state"\nprefix = "{prefix}"\n'


# -- item 6: state.prefix normalised once --------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["x", "x/", "/x", "/x/", "x//"])
def test_state_prefix_is_normalised_so_terraform_and_reconcile_read_the_same_key(prefix):
    from actfleet.infra.terraform_layout import FLEET, gcs_backend_prefix, state_location

    c = parse_text(gcs_state(prefix))
    assert c.state.prefix == "x"
    # What the fleet stack's backend is synthesized with, and what reconcile reads without terraform: the
    # GCS backend stores the default workspace at <prefix>/default.tfstate.
    assert f"gs://my-state/{gcs_backend_prefix(c, FLEET)}/default.tfstate" == state_location(c, FLEET)
    assert state_location(c, FLEET) == "gs://my-state/x/fleet/default.tfstate"


@pytest.mark.parametrize(
    "prefix, expected",
    [
        ("a//b", 'state.prefix = "a//b": must be an object prefix'),
        ("a/../b", 'state.prefix = "a/../b": must be an object prefix'),
        ("/", 'state.prefix = "/": must be an object prefix like "actfleet/acts" (or left out)'),
        ("a b", 'state.prefix = "a b": must be an object prefix'),
    ],
)
def test_bad_state_prefixes_are_refused_by_name(prefix, expected):
    with pytest.raises(ConfigError) as e:
        parse_text(gcs_state(prefix))
    assert expected in str(e.value)


# -- item 16: bucket names, gs:// with no bucket, worker cap --------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "ab",  # too short
        "a" * 64,  # too long without dots
        "My-Bucket",  # capitals
        "-acts",  # starts with a dash
        "acts-",  # ends with a dash
        "192.168.5.4",  # an IP address
        "goog-acts",  # "goog" prefix
        "my-google-acts",  # "google" inside
        ("a" * 64) + ".b",  # a dotted part over 63
        "a..b",  # an empty dotted part
    ],
)
def test_bucket_names_gcs_rejects_are_refused(name):
    for text, key in (
        (GOOD.replace('bucket = "my-acts"', f'bucket = "{name}"'), "storage.bucket"),
        (GOOD + f'\n[state]\nbackend = "gcs"\nbucket = "{name}"\n', "state.bucket"),
        (with_line("job", f'store = "gs://{name}/jobs"'), "job.store"),
        (GOOD + f'\n[reconcile]\nlock = "gs://{name}/r.lock"\n', "reconcile.lock"),
    ):
        with pytest.raises(ConfigError) as e:
            parse_text(text)
        assert str(e.value).startswith(f"fleet.toml: {key} = "), str(e.value)
        assert "GCS bucket name" in str(e.value)


@pytest.mark.parametrize("name", ["abc", "a" * 63, "my_acts.v2", ("a" * 63 + ".") * 3 + "a" * 30, "1acts"])
def test_bucket_names_gcs_accepts_load(name):
    assert parse_text(GOOD.replace('bucket = "my-acts"', f'bucket = "{name}"')).storage.bucket == name


@pytest.mark.parametrize(
    "line, expected",
    [
        ('store = "gs://"', 'job.store = "gs://": no bucket'),
        ('store = "gs:///jobs"', 'job.store = "gs:///jobs": no bucket'),
    ],
)
def test_gs_url_without_a_bucket_is_refused(line, expected):
    with pytest.raises(ConfigError, match=expected):
        parse_text(with_line("job", line))
    with pytest.raises(ConfigError, match='reconcile.lock = "gs://": no bucket'):
        parse_text(GOOD + '\n[reconcile]\nlock = "gs://"\n')


def test_forty_thousand_workers_are_refused_naming_the_field(tmp_path):
    text = GOOD.replace(
        '{ "us-central1-a" = 4, "us-central1-b" = 4, "us-central1-c" = 4 }',
        '{ "us-central1-a" = 10000, "us-central1-b" = 10000, "us-central1-c" = 10000, "us-central1-f" = 10000 }',
    )
    p = tmp_path / "fleet.toml"
    p.write_text(text)
    r = subprocess.run(
        [sys.executable, "-c", "from actfleet.cli import main; main()", "status", "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, "ACTFLEET_CONFIG": str(p)},
        cwd=tmp_path,
        timeout=120,
    )
    assert r.returncode == EXIT_BAD_INPUT, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert "fleet.zones = " in lines[0] and "40000 workers is more than fleet.max_workers = 1000" in lines[0]


def test_max_workers_raises_the_cap_up_to_its_ceiling():
    big = GOOD.replace('"us-central1-a" = 4', '"us-central1-a" = 1500')
    with pytest.raises(ConfigError, match="1508 workers is more than fleet.max_workers = 1000"):
        parse_text(big)
    assert len(parse_text(with_line("fleet", "max_workers = 2000", big)).fleet.workers) == 1508
    with pytest.raises(ConfigError, match="fleet.max_workers = 20000: must be an integer from 1 to 10000"):
        parse_text(with_line("fleet", "max_workers = 20000"))
    names = with_line("fleet", 'workers = ["tpu-us-central1-a-0", "tpu-us-central1-a-1"]\nmax_workers = 1')
    names = names.replace('zones = { "us-central1-a" = 4, "us-central1-b" = 4, "us-central1-c" = 4 }\n', "")
    with pytest.raises(ConfigError, match='fleet.workers = "2 names": 2 workers is more than fleet.max_workers = 1'):
        parse_text(names)


# -- item 7: reconcile.lock on a bucket is a lock in that bucket ------------------------------------------


@pytest.mark.parametrize(
    "lock, bucket_prefix, key",
    [
        ("gs://lock-bucket", "", "reconcile.lock"),
        ("gs://lock-bucket/", "", "reconcile.lock"),
        ("gs://lock-bucket/locks/", "locks", "reconcile.lock"),
        ("gs://lock-bucket/locks/fleet.lock", "locks", "fleet.lock"),
        ("gs://lock-bucket/fleet.lock", "", "fleet.lock"),
    ],
)
def test_a_gs_lock_is_an_object_in_that_bucket_held_across_processes(fake_gcs, tmp_path, lock, bucket_prefix, key):
    """Never a local file named after the URL: a second holder (another process, as on another machine)
    finds the lock held in the bucket; the first one's release frees it."""
    from actfleet.infra.lock import ReconcileLock, lock_location
    from actfleet.store import GcsStore

    cfg = parse_text(GOOD + f'\n[reconcile]\nlock = "{lock}"\n')
    store, k = lock_location(cfg)
    assert isinstance(store, GcsStore) and (store.bucket_name, store.prefix, k) == ("lock-bucket", bucket_prefix, key)
    name = f"{bucket_prefix}/{key}" if bucket_prefix else key
    with ReconcileLock.for_config(cfg).hold():
        assert ("lock-bucket", name) in fake_gcs.objects
        other = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys, tomllib; from actfleet import config; from actfleet.infra.lock import ReconcileLock;"
                "cfg = config.parse(tomllib.loads(sys.argv[1]));"
                "print(ReconcileLock.for_config(cfg).try_acquire())",
                GOOD + f'\n[reconcile]\nlock = "{lock}"\n',
            ],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=120,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        assert other.stdout.strip() == "False", other.stderr
    assert ("lock-bucket", name) not in fake_gcs.objects
    assert not list(tmp_path.iterdir())  # nothing local was made in the working directory
