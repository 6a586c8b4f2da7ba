"""`actfleet release` (infra/release.py) against the real lock files and a GCS fake, plus the network and
metadata rules that booting from the bucket relies on (issue 24.1, 27.15). The end-to-end install from a
published release is tests/test_bootstrap.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from actfleet.config import parse
from actfleet.errors import ConfigError, InputError
from actfleet.infra import release as rel
from actfleet.infra.bucket_access import read_objects, worker_grants
from actfleet.infra.qr_request import queued_resource_request
from actfleet.infra.startup_script import worker_metadata
from tests.fakes.gcs_server import fake_gcs  # noqa: F401
from tests.fakes.release_parts import lock_text, make_wheel

ROOT = Path(__file__).resolve().parent.parent
PYTHON = (ROOT / "bootstrap/python-version").read_text().strip()
ARCHIVE = f"cpython-{PYTHON}+20261101-x86_64-unknown-linux-gnu-install_only_stripped.tar.gz"


def config(commit: str = "a" * 40, **fleet):
    return parse(
        {
            "fleet": {"id": "acts", "project": "my-project", "region": "us-central1", "zones": {"us-central1-a": 1}}
            | fleet,
            "repo": {"url": "https://example.com/r.git", "commit": commit},
            "storage": {"bucket": "my-project-acts"},
            "job": {"name": "resid", "model": "m", "input": "i", "layers": [1]},
        }
    )


# ----------------------------------------------------------------------------------------------------
# The lock and the wheelhouse (pure)
# ----------------------------------------------------------------------------------------------------


def test_the_real_locks_parse_and_an_empty_wheelhouse_names_the_first_missing_package():
    tpu = rel.parse_lock((ROOT / "bootstrap/requirements-tpu.txt").read_text(), "requirements-tpu.txt")
    uv = rel.parse_lock((ROOT / "bootstrap/requirements-uv.txt").read_text(), "requirements-uv.txt")
    assert len(tpu) > 50 and {"jax", "jaxlib", "libtpu", "flax", "google-cloud-storage"} <= {r.name for r in tpu}
    assert [r.name for r in uv] == ["uv"] and len(uv[0].hashes) > 5
    assert all(r.hashes for r in tpu)
    with pytest.raises(InputError, match=rf"no file for {tpu[0].name}=={tpu[0].version} in the wheelhouse"):
        rel.pick_wheels(tpu, {}, "requirements-tpu.txt")


@pytest.mark.parametrize(
    "line",
    [
        "numpy==2.1.0 ; python_version < '3.12' \\\n    --hash=sha256:" + "0" * 64,
        "numpy>=2 \\\n    --hash=sha256:" + "0" * 64,
        "numpy==2.1.0",
        "numpy[extra]==2.1.0 --hash=sha256:" + "0" * 64,
    ],
)
def test_a_lock_line_the_vm_could_not_install_hash_checked_is_refused(line):
    with pytest.raises(InputError, match="numpy"):
        rel.parse_lock(line + "\n", "requirements-tpu.txt")


def test_wheels_are_chosen_by_hash_not_by_name(tmp_path):
    good = make_wheel(tmp_path / "h", "tinydep", "1.0", {"tinydep.py": "A = 1\n"})
    locked = rel.parse_lock(lock_text({"tinydep": ("1.0", [good])}), "lock")
    assert rel.pick_wheels(locked, rel.hash_dir(tmp_path / "h"), "lock") == [good]
    # Same name and version, other bytes (a rebuilt or tampered wheel): not the locked file.
    good.unlink()
    make_wheel(tmp_path / "h", "tinydep", "1.0", {"tinydep.py": "A = 2\n"})
    with pytest.raises(InputError, match="no file for tinydep==1.0"):
        rel.pick_wheels(locked, rel.hash_dir(tmp_path / "h"), "lock")


def test_the_python_archive_must_be_the_pinned_cpython_for_x86_64_linux(tmp_path):
    assert rel.python_archive_name(Path(ARCHIVE), PYTHON) == f"python/20261101/{ARCHIVE}"
    with pytest.raises(InputError, match="but the commit pins"):
        rel.python_archive_name(Path(ARCHIVE.replace(PYTHON, "3.11.1")), PYTHON)
    with pytest.raises(InputError, match="not a python-build-standalone archive"):
        rel.python_archive_name(Path(ARCHIVE.replace("x86_64-unknown-linux-gnu", "aarch64-apple-darwin")), PYTHON)


def test_pip_download_targets_the_tpu_vm_not_this_machine(tmp_path):
    argv = rel.pip_download_argv(Path("lock.txt"), tmp_path, PYTHON)
    assert argv[1:4] == ["-m", "pip", "download"]
    assert {"--no-deps", "--require-hashes", "--only-binary=:all:"} <= set(argv)
    platforms = {argv[i + 1] for i, a in enumerate(argv) if a == "--platform"}
    assert {"manylinux2014_x86_64", "manylinux_2_35_x86_64"} <= platforms  # Ubuntu 22.04's glibc is 2.35
    assert argv[argv.index("--python-version") + 1] == "311" and argv[-2:] == ["-r", "lock.txt"]


@pytest.mark.parametrize(
    "url,shown",
    [
        ("https://x-access-token:ghp_abc@github.com/o/r.git", "https://***@github.com/o/r.git"),
        ("https://oauth2:glpat-xyz@gitlab.example.com:8443/o/r", "https://***@gitlab.example.com:8443/o/r"),
        ("https://github.com/o/r.git", "https://github.com/o/r.git"),
    ],
)
def test_a_credential_in_a_url_is_never_shown(url, shown):
    assert rel.redact(url) == shown


# ----------------------------------------------------------------------------------------------------
# Publishing (a real git repository, pip building the project's wheel, the GCS fake)
# ----------------------------------------------------------------------------------------------------


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


@pytest.fixture
def source(tmp_path):
    """(repo, commit, wheelhouse, archive): a committed project with a tiny hashed lock, its wheels and uv."""
    house = tmp_path / "wheelhouse"
    dep = make_wheel(house, "tinydep", "1.0", {"tinydep.py": "A = 1\n"})
    uv = make_wheel(
        house, "uv", "0.13.9", {"uv-0.13.9.data/scripts/uv": "#!/bin/sh\n"}, tag="py3-none-manylinux_2_17_x86_64"
    )
    make_wheel(house, "unrelated", "9.9", {"unrelated.py": ""})  # in the wheelhouse, not locked: not published
    repo = tmp_path / "repo"
    (repo / "bootstrap").mkdir(parents=True)
    (repo / "bootstrap/python-version").write_text(PYTHON + "\n")
    (repo / "bootstrap/requirements-tpu.txt").write_text(lock_text({"tinydep": ("1.0", [dep])}))
    (repo / "bootstrap/requirements-uv.txt").write_text(lock_text({"uv": ("0.13.9", [uv])}))
    (repo / "stub.py").write_text("")
    (repo / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "actfleet"\nversion = "0.1.0"\n[tool.setuptools]\npy-modules = ["stub"]\n'
    )
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "c")
    (repo / "uncommitted.txt").write_text("the working tree is not the commit")
    archive = tmp_path / ARCHIVE
    archive.write_bytes(b"archive")
    return repo, _git(repo, "rev-parse", "HEAD"), house, archive


def test_release_publishes_every_file_hashed_once_and_is_immutable(fake_gcs, source):  # noqa: F811
    repo, commit, house, archive = source
    cfg = config(commit)
    first = rel.release(cfg, repo, wheelhouse=house, python_archive=archive)
    assert first.published and first.url == f"gs://my-project-acts/actfleet/releases/{commit}/"
    prefix = f"actfleet/releases/{commit}/"
    objects = {name[len(prefix) :]: o.data for (_, name), o in fake_gcs.objects.items() if name.startswith(prefix)}
    assert set(objects) == {
        "SHA256SUMS",
        "python-version",
        "requirements-tpu.txt",
        "requirements-actfleet.txt",
        "wheels/tinydep-1.0-py3-none-any.whl",
        "uv/uv-0.13.9-py3-none-manylinux_2_17_x86_64.whl",
        f"python/20261101/{ARCHIVE}",
        "actfleet/actfleet-0.1.0-py3-none-any.whl",
    }
    sums = dict(reversed(line.split("  ")) for line in objects["SHA256SUMS"].decode().splitlines())
    assert set(sums) == set(objects) - {"SHA256SUMS"}
    import hashlib

    assert all(hashlib.sha256(objects[name]).hexdigest() == digest for name, digest in sums.items())
    wheel_sha = sums["actfleet/actfleet-0.1.0-py3-none-any.whl"]
    assert objects["requirements-actfleet.txt"].decode() == f"actfleet==0.1.0 \\\n    --hash=sha256:{wheel_sha}\n"
    with __import__("zipfile").ZipFile(
        __import__("io").BytesIO(objects["actfleet/actfleet-0.1.0-py3-none-any.whl"])
    ) as z:
        assert "uncommitted.txt" not in " ".join(z.namelist())  # built from the commit, not the working tree
    generations = {k: o.generation for k, o in fake_gcs.objects.items()}
    again = rel.release(cfg, repo, wheelhouse=house, python_archive=archive)
    assert not again.published  # published once: nothing rewritten
    assert {k: o.generation for k, o in fake_gcs.objects.items()} == generations


def test_a_wheel_missing_from_the_wheelhouse_publishes_nothing(fake_gcs, source):  # noqa: F811
    repo, commit, house, archive = source
    for f in house.glob("tinydep-*"):
        f.unlink()
    with pytest.raises(InputError, match="no file for tinydep==1.0"):
        rel.release(config(commit), repo, wheelhouse=house, python_archive=archive)
    assert not fake_gcs.objects


def test_a_commit_the_checkout_lacks_is_named(fake_gcs, source):  # noqa: F811
    repo, _, house, archive = source
    with pytest.raises(InputError, match=f"repo.commit {'b' * 40} is not in the checkout"):
        rel.release(config("b" * 40), repo, wheelhouse=house, python_archive=archive)


def test_the_release_command_prints_json_and_exit_2_on_bad_input(fake_gcs, source, tmp_path):  # noqa: F811
    repo, commit, house, archive = source
    toml = tmp_path / "fleet.toml"
    toml.write_text(
        '[fleet]\nid = "acts"\nproject = "my-project"\nregion = "us-central1"\nzones = { "us-central1-a" = 1 }\n'
        f'[repo]\nurl = "https://example.com/r.git"\ncommit = "{commit}"\n[storage]\nbucket = "my-project-acts"\n'
        '[job]\nmodel = "m"\ninput = "i"\nlayers = [1]\n'
    )
    cli = [sys.executable, "-c", "from actfleet.cli import main; main()", "release", "--config", str(toml)]
    base = [*cli, "--repo", str(repo), "--wheelhouse", str(house)]
    bad = subprocess.run([*base, "--python-archive", str(tmp_path / "nope.tar.gz")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("actfleet: --python-archive") and bad.stdout == ""
    assert len(bad.stderr.splitlines()) == 1  # one line, no traceback
    ok = subprocess.run([*base, "--python-archive", str(archive), "--json"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["published"] is True


# ----------------------------------------------------------------------------------------------------
# The network and the metadata a VM boots from
# ----------------------------------------------------------------------------------------------------


def test_workers_get_no_external_ip_unless_asked():
    node = queued_resource_request(config(), config().fleet.workers[0])["tpu"]["nodeSpec"][0]["node"]
    assert node["networkConfig"]["enableExternalIps"] is False
    cfg = config(external_ips=True)
    node = queued_resource_request(cfg, cfg.fleet.workers[0])["tpu"]["nodeSpec"][0]["node"]
    assert node["networkConfig"]["enableExternalIps"] is True
    with pytest.raises(ConfigError, match="fleet.external_ips"):
        config(external_ips="no")


def test_workers_may_read_their_release_and_not_write_it():
    cfg = config()
    assert f"actfleet/releases/{cfg.repo.commit}/" in read_objects(cfg)[1]
    write = [g for g in worker_grants(cfg) if g.name == "write"][0]
    assert "releases" not in write.expression


def test_metadata_values_are_one_line_or_refused():
    cfg = config()
    bad = cfg.replace("job", store="gs://my-project-acts/x\nLD_PRELOAD=/tmp/evil.so")
    with pytest.raises(ConfigError, match="actfleet-store"):
        worker_metadata(bad, bad.fleet.workers[0])
    md = worker_metadata(cfg, cfg.fleet.workers[0])
    assert all("\n" not in v for k, v in md.items() if k not in ("startup-script", "actfleet-unit"))
