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
    # The cloud extra (cdktf + bindings) but not the test extra: a user's install, not ours.
    _run(
        [str(bin_dir / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", f"{wheel}[cloud]"],
        cwd=tmp,
        timeout=1800,
    )
    work = tmp / "elsewhere"
    work.mkdir()
    return bin_dir, work, wheel


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
        "print(importlib.util.find_spec('infra'), importlib.util.find_spec('worker'), actfleet.infra.__file__)"
    )
    out = _run([str(bin_dir / "python"), "-c", code], cwd=work, env=_env(bin_dir, work)).stdout.split()
    assert out[:2] == ["None", "None"]  # no generic top-level packages installed
    assert not out[2].startswith(str(REPO))  # imported from site-packages, not this checkout


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
