"""`actfleet local` on a researcher's own data: whatever `prepare --input` takes (here a glob over a directory of
JSONL files in another directory than OUT) and the window options, passed on to prepare (issue 23, item 7)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.test_local import REPO, small_dataset


@pytest.mark.slow
def test_local_takes_a_glob_and_the_window_options(tmp_path):
    from actfleet.worker.reader import load, shard_metadata

    data = tmp_path / "mine"
    data.mkdir()
    rows = small_dataset(tmp_path, 40).read_text().splitlines(keepends=True)
    (data / "a.jsonl").write_text("".join(rows[:25]))
    (data / "b.jsonl").write_text("".join(rows[25:]))
    out = tmp_path / "out"
    p = subprocess.run(
        [sys.executable, "-c", "from actfleet.cli import main; main()", "local", "--workers", "1"]
        + ["--input", "mine/*.jsonl", "--context-size", "16", "--separator", "eos", "--layers", "1"]
        + ["--unit-rows", "20", "--out", str(out), "--json"],
        cwd=tmp_path,  # the glob is relative to where the command runs, not to OUT
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.loads(p.stdout)
    assert s["verified"] and s["rows"] == 40 and s["units_total"] == 2
    meta = shard_metadata(s["shards_dir"])[0]
    # --context-size implied --positions all: every window is stored whole (BOS and separators included)
    assert meta["context_size"] == "16" and meta["positions"] == "all" and meta["separator"] == "eos"
    acts = load(s["shards_dir"])
    ids, pos = acts["sample_ids"], acts["positions"]
    windows = np.unique(ids)
    assert len(ids) == 16 * len(windows) > 0
    assert all(pos[ids == w].tolist() == list(range(16)) for w in windows[:5])
    job = json.loads((out / "store" / "local" / "job.json").read_text())
    assert [f["path"] for f in job["input_files"]] == [str(data / "a.jsonl"), str(data / "b.jsonl")]


def test_local_refuses_a_bad_input_option_in_one_line_before_any_work(tmp_path):
    p = subprocess.run(
        [sys.executable, "-c", "from actfleet.cli import main; main()", "local", "--context-size", "16"]
        + ["--positions", "last", "--out", str(tmp_path / "o")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "--positions last" in p.stderr, p.stderr
    assert not (tmp_path / "o" / "tiny-model").exists()  # refused before the model was made
