"""--context-size stores whole windows: it implies --positions all, and an explicit other choice (a flag or
fleet.toml's [job] positions) is refused by `prepare` and `extract` before any work (issue 23, item 2).
Also the site-kind message: an unknown kind lists the valid ones (item 8)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from actfleet import sites
from actfleet.errors import InputError
from actfleet.job_options import BadValue, JobOptions, implied_positions

REPO = Path(__file__).resolve().parents[1]


def actfleet(*args, cwd=REPO):
    env = {k: v for k, v in os.environ.items() if k != "ACTFLEET_CONFIG"}
    return subprocess.run(
        [sys.executable, "-c", "from actfleet.cli import main; main()", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_implied_positions():
    assert JobOptions().positions == "non-special"
    assert JobOptions(context_size=128).positions == "all"
    assert JobOptions(context_size=128).replace(context_size=64).positions == "all"
    assert implied_positions(0, None) == "non-special" and implied_positions(0, "last") == "last"
    assert implied_positions(16, None) == implied_positions(16, "all") == "all"
    for other in ("non-special", "last"):
        with pytest.raises(BadValue, match=f"--positions {other}: with context_size 16 .* must be all"):
            implied_positions(16, other)
    # A job.json written before the rule still loads (its workers finish it); only new jobs are refused.
    assert JobOptions.from_json({"context_size": 8, "positions": "last"}).positions == "last"


@pytest.mark.parametrize("command", ["extract", "prepare"])
@pytest.mark.parametrize("positions", ["non-special", "last"])
def test_an_explicit_other_positions_is_refused_before_any_work(tmp_path, command, positions):
    # Neither the model nor the dataset exists: the refusal must come first, before anything is read.
    where = ["--out", str(tmp_path / "out")] if command == "extract" else ["--store", str(tmp_path / "s")]
    r = actfleet(
        command,
        *where,
        "--model",
        str(tmp_path / "no-model"),
        "--input",
        str(tmp_path / "no-data.jsonl"),
        "--layers",
        "1",
        "--context-size",
        "16",
        "--positions",
        positions,
        cwd=tmp_path,
    )
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"--positions {positions}: with context_size 16" in r.stderr and "must be all" in r.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "s").exists()


FLEET = """
[fleet]
id = "acts"
project = "my-project-1"
region = "us-central1"
zones = {{ "us-central1-a" = 1 }}

[repo]
url = "https://github.com/example/actfleet.git"
commit = "0123456789abcdef0123456789abcdef01234567"

[storage]
bucket = "my-acts"

[job]
name = "w"
store = "{store}"
model = "{model}"
input = "{data}"
layers = [1]
{extra}
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from actfleet.demo.tiny_model import make_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    model = make_tiny_model(root / "m", max_pos=64)
    data = root / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"text {i} " * 5}) + "\n" for i in range(6)))
    return model, data


@pytest.mark.parametrize(
    "extra, flags, want",
    [
        ("context_size = 16", [], "all"),  # fleet.toml's windows, positions not written: all
        ("", ["--context-size", "16"], "all"),  # the flag's windows over a [job] without positions: all
        ("", [], "non-special"),  # no windows: the default stands
        ('positions = "last"', [], "last"),
        ('context_size = 16\npositions = "last"', ["--positions", "all"], "all"),  # the flag is the choice
    ],
)
def test_prepare_from_fleet_toml(tmp_path, tiny, extra, flags, want):
    model, data = tiny
    (tmp_path / "fleet.toml").write_text(
        FLEET.format(store=tmp_path / "store", model=model, data=data, extra=textwrap.dedent(extra))
    )
    r = actfleet("prepare", "--config", str(tmp_path / "fleet.toml"), *flags, "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "store" / "w" / "job.json").read_text())["options"]["positions"] == want


@pytest.mark.parametrize(
    "extra, flags",
    [
        ('context_size = 16\npositions = "non-special"', []),
        ('positions = "non-special"', ["--context-size", "16"]),  # written in the file, windows from the flag
    ],
)
def test_prepare_refuses_fleet_toml_positions_against_windows(tmp_path, tiny, extra, flags):
    model, data = tiny
    (tmp_path / "fleet.toml").write_text(
        FLEET.format(store=tmp_path / "store", model=model, data=data, extra=textwrap.dedent(extra))
    )
    r = actfleet("prepare", "--config", str(tmp_path / "fleet.toml"), *flags, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "fleet.toml: job.positions = non-special: with context_size 16" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "store" / "w").exists()


def test_an_unknown_site_kind_lists_the_valid_ones(tmp_path):
    with pytest.raises(InputError) as e:
        sites.from_flags("resid", "1")
    assert '"resid" is no site kind or name' in str(e.value)
    assert all(k in str(e.value) for k in sites.KINDS)
    r = actfleet("prepare", "--store", str(tmp_path / "s"), "--model", "m", "--input", "x.jsonl", "--sites", "resid")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert all(k in r.stderr for k in sites.KINDS), r.stderr
