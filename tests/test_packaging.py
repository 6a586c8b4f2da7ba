"""The wheel, installed outside the checkout, is the whole product: `actfleet` alone in site-packages, the
bootstrap files inside it, and synth / extract / the reader working from there.

This is the test that meets something we did not write: pip's own wheel install, in a fresh venv, run
from a directory that holds no source. (An editable install hides a missing package-data entry or a
top-level `infra` package; this does not.)
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import venv
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _run(argv, cwd, env=None, timeout=900):
    p = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, (
        f"{argv[:3]} exited {p.returncode}\nstdout: {p.stdout[-3000:]}\nstderr: {p.stderr[-3000:]}"
    )
    return p


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv bin dir, a working directory outside the checkout, the wheel path)."""
    tmp = tmp_path_factory.mktemp("wheel")
    # Build from a copy of what git would commit, so build/ and *.egg-info never land in the checkout.
    src = tmp / "src"
    files = (
        subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, check=True
        )
        .stdout.decode()
        .split("\0")
    )
    for rel in filter(None, files):
        if (REPO / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)
    dist = tmp / "dist"
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(src)],
        cwd=tmp,
    )
    (wheel,) = dist.glob("actfleet-*.whl")
    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=True)
    bin_dir = env_dir / "bin"
    pip = [str(bin_dir / "python"), "-m", "pip", "--disable-pip-version-check"]
    # The cloud extra (cdktf + bindings) but not the test extra: a user's install, not ours. pip resolves it
    # from the index as it would for a user; the wheel and every pin this test venv lacks at that version are
    # installed for real (--no-deps: the resolution is already made); the rest are this venv's own copies of
    # the same versions, linked in. Installing all of it again, byte-compiling the provider bindings
    # included, was 170 of this module's 210 CPU s (measured).
    report = tmp / "resolved.json"
    _run([*pip, "install", "-q", "--dry-run", "--report", str(report), f"{wheel}[cloud]"], cwd=tmp, timeout=1800)
    resolved = {i["metadata"]["name"]: i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}
    assert resolved.pop("actfleet", None), resolved
    linkable = {n: v for n, v in resolved.items() if _installed_version(n) == v}
    pins = [f"{n}=={v}" for n, v in resolved.items() if n not in linkable]
    _run([*pip, "install", "-q", "--no-deps", "--no-compile", str(wheel), *pins], cwd=tmp, timeout=1800)
    site = Path(
        _run(
            [str(bin_dir / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=tmp
        ).stdout.strip()
    )
    _link_distributions(linkable, site)
    _run([*pip, "check"], cwd=tmp)  # the mix is one consistent install: every requirement met at its version
    work = tmp / "elsewhere"
    work.mkdir()
    return bin_dir, work, wheel


def _installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _link_distributions(names, site: Path) -> None:
    """Symlink the files of this venv's distributions `names` into `site`, and nothing of any other
    distribution: a directory is linked whole where no other distribution has a file under it and `site`
    does not hold it yet, else it is made and its entries are linked one by one. Linking after pip's installs
    means pip never writes through a link into this venv."""

    def key(d) -> tuple[str, str]:
        return re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower(), str(d.locate_file(""))

    wanted = {key(metadata.distribution(n)) for n in names}  # the copy imports use, where a name is twice
    mine: dict[Path, Path] = {}  # path relative to a site dir -> the file
    blocked: set[str] = set()  # directories (relative, "/"-separated) holding a file of another distribution
    for d in metadata.distributions():
        root = Path(d.locate_file(""))
        # RECORD's paths as strings (PackagePath objects for the test venv's ~10^5 files cost tens of seconds).
        paths = [line.rsplit(",", 2)[0] for line in (d.read_text("RECORD") or "").splitlines() if line]
        paths = [f for f in paths if not f.startswith("../")]  # console scripts, data: not needed elsewhere
        if key(d) in wanted:
            mine.update((Path(f), root / f) for f in paths)
        else:
            for f in paths:
                i = f.find("/")
                while i > 0:
                    blocked.add(f[:i])
                    i = f.find("/", i + 1)
    blocked_paths = {Path(b) for b in blocked}
    linked: set[Path] = set()
    for rel, src in mine.items():
        if any(p in linked for p in rel.parents):
            continue  # under a directory linked whole: never write through a link
        for i in range(1, len(rel.parts) + 1):
            top, dest = Path(*rel.parts[:i]), site.joinpath(*rel.parts[:i])
            if i < len(rel.parts) and (top in blocked_paths or dest.exists()):
                dest.mkdir(exist_ok=True)  # shared (a namespace package, or pip just wrote into it)
                continue
            if not dest.exists() and not dest.is_symlink():
                dest.symlink_to(src.parents[len(rel.parts) - i - 1] if i < len(rel.parts) else src)
                linked.add(top)
            break


def _env(bin_dir: Path, work: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "ACTFLEET_"))}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        HOME=str(work),
        HF_HUB_OFFLINE="1",
        TF_CPP_MIN_LOG_LEVEL="3",
        ACTFLEET_SYNTH_DIR=str(work / "synth"),
        ACTFLEET_JAX_CACHE=str(work / "jax-cache"),
    )
    return env


def test_wheel_holds_one_package_and_the_bootstrap(installed):
    _, _, wheel = installed
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        (top,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        assert z.read(top).decode().split() == ["actfleet"]
    assert {n.split("/")[0] for n in names if not n.endswith((".dist-info/", ".dist-info"))} <= {
        "actfleet",
        *{n.split("/")[0] for n in names if ".dist-info/" in n},
    }
    assert "actfleet/bootstrap/startup.sh" in names
    assert "actfleet/bootstrap/actfleet-worker.service" in names
    assert "actfleet/demo/data/tiny_tales.jsonl" in names


def test_installed_package_does_not_see_the_checkout(installed):
    bin_dir, work, _ = installed
    code = (
        "import importlib.util, actfleet, actfleet.infra, actfleet.worker;"
        "print(importlib.util.find_spec('infra'), importlib.util.find_spec('worker'), actfleet.infra.__file__,"
        "importlib.util.find_spec('pytest'), importlib.util.find_spec('torch'))"
    )
    out = _run([str(bin_dir / "python"), "-c", code], cwd=work, env=_env(bin_dir, work)).stdout.split()
    assert out[:2] == ["None", "None"]  # no generic top-level packages installed
    assert not out[2].startswith(str(REPO))  # imported from site-packages, not this checkout
    assert out[3:] == ["None", "None"]  # nothing of the test extras: the user's install, not this test venv


def test_synth_from_the_wheel(installed):
    bin_dir, work, _ = installed
    config = work / "fleet.toml"
    config.write_text((REPO / "fleet.example.toml").read_text())
    p = _run([str(bin_dir / "actfleet"), "synth", "--config", str(config), "--json"], cwd=work, env=_env(bin_dir, work))
    result = json.loads(p.stdout)
    assert result["workers"] == 8 and not result["cached"]
    fleet = json.loads((Path(result["stacks"]["fleet"]) / "cdk.tf.json").read_text())
    # The startup script is package data: the stack carries it, byte for byte, as a base64 local.
    encoded = re.fullmatch(r'\$\{base64decode\("([A-Za-z0-9+/=]+)"\)\}', fleet["locals"]["startup_script"])[1]
    assert base64.b64decode(encoded) == (REPO / "bootstrap" / "startup.sh").read_bytes()
    # fleet.example.toml: 8 workers in us-central1-a, a zone that offers its v5litepod-8.
    assert sorted(fleet["locals"]["worker_requests"]) == sorted(f"tpu-us-central1-a-{i}" for i in range(8))


def test_extract_and_read_from_the_wheel(installed):
    bin_dir, work, _ = installed
    env = _env(bin_dir, work)
    py = str(bin_dir / "python")
    _run([py, "-m", "actfleet.demo.tiny_model", str(work / "model")], cwd=work, env=env)
    rows = [json.loads(line) for line in (REPO / "actfleet/demo/data/tiny_tales.jsonl").read_text().splitlines()[:12]]
    data = work / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _run(
        [
            str(bin_dir / "actfleet"),
            "extract",
            "--model",
            str(work / "model"),
            "--input",
            str(data),
            "--out",
            str(work / "out"),
            "--layers",
            "0,1",
            "--compute-dtype",
            "float32",
            "--store-dtype",
            "float32",
        ],
        cwd=work,
        env=env,
    )
    code = (
        "from actfleet.worker.reader import load, iter_batches; import json;"
        f"a = load({str(work / 'out')!r}); n = sum(len(b['token_ids']) for b in iter_batches({str(work / 'out')!r}));"
        "print(json.dumps({k: list(v.shape) for k, v in a.items()} | {'streamed': n}))"
    )
    shapes = json.loads(_run([py, "-c", code], cwd=work, env=env).stdout.strip().splitlines()[-1])
    n = shapes["token_ids"][0]
    assert n > 0 and shapes["streamed"] == n
    assert shapes["sample_ids"] == [n] and shapes["positions"] == [n]
    assert shapes["blocks.0.hook_resid_post"][0] == n and shapes["blocks.1.hook_resid_post"][0] == n
    assert set(int(s) for s in _sample_ids(py, work, env)) == set(range(len(rows)))


def _sample_ids(py: str, work: Path, env: dict) -> list[int]:
    code = f"from actfleet.worker.reader import load; print(*sorted(set(load({str(work / 'out')!r})['sample_ids'].tolist())))"
    return _run([py, "-c", code], cwd=work, env=env).stdout.split()
