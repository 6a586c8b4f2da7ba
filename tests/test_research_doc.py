"""docs/research.md, walked: a dataset -> `prepare --context-size` -> `work` -> `export saelens --model-class hf`
-> the page's SAELens block, taken from the page and run as it stands (issue 23, item 3).

The block is the python code block after the marker comment in "## 5. Train with SAELens". It is run in a
directory holding what its paths name, `./pile-l6-saelens` (the export) and `./Qwen2.5-0.5B` (here a tiny
random-weight Qwen2 made on the spot), so not one character of it is changed. A prelude wraps SAELens's
`LanguageModelSAETrainingRunner.run` to record what the run trained from and the SAE before and after."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- the tested snippet: tests/test_research_doc.py runs the next python block as it stands -->"


def documented_block() -> str:
    page = (ROOT / "docs" / "research.md").read_text()
    assert page.count(MARKER) == 1, "the marker of the tested block must be on the page once"
    m = re.search(re.escape(MARKER) + r"\s*```python\n(.*?)\n```", page, re.S)
    assert m, "the marker must be followed by a python code block"
    return m.group(1)


def test_the_block_is_the_agreed_form():
    """What the test relies on is in the block: the local-model form (AutoModelForCausalLM), the paths."""
    code = documented_block()
    assert 'model_class_name="AutoModelForCausalLM"' in code
    assert 'cache = "./pile-l6-saelens"' in code and 'model = "./Qwen2.5-0.5B"' in code
    assert "override_dataset=tokens" in code


PRELUDE = """
import json, sae_lens, torch
_run = sae_lens.LanguageModelSAETrainingRunner.run
_seen = {}
def _recording_run(self):
    store = self.activations_store
    _seen["cached"] = store.cached_activation_dataset is not None
    _seen["x"] = next(iter(store)).detach().clone()  # a training batch, from the cache
    _seen["before"] = {k: v.detach().clone() for k, v in self.sae.state_dict().items()}
    out = _run(self)
    _seen["after"] = {k: v.detach().clone() for k, v in out.state_dict().items()}
    return out
sae_lens.LanguageModelSAETrainingRunner.run = _recording_run
"""

REPORT = """
def _mse(state):
    sae.load_state_dict(state)
    with torch.no_grad():
        return float(((sae(_seen["x"]) - _seen["x"]) ** 2).mean())
print(json.dumps({
    "cached": _seen["cached"], "batch": list(_seen["x"].shape), "column": export["column"],
    "changed": any(bool((_seen["after"][k] != _seen["before"][k]).any()) for k in _seen["before"]),
    "mse_before": _mse(_seen["before"]), "mse_after": _mse(_seen["after"]),
}))
"""


@pytest.mark.slow
def test_the_walk_through_from_a_dataset_to_a_trained_sae(tmp_path):
    pytest.importorskip("sae_lens")
    from actfleet.demo.tiny_model import make_tiny_model

    make_tiny_model(tmp_path / "Qwen2.5-0.5B", max_pos=256)
    (tmp_path / "docs.jsonl").write_text(
        "".join(
            json.dumps({"text": f"doc {i}: " + " ".join(["the quick brown fox jumps over the lazy dog"] * (3 + i % 4))})
            + "\n"
            for i in range(240)
        )
    )
    env = dict(os.environ, ACTFLEET_JAX_CACHE=str(tmp_path / "jax"), WANDB_MODE="disabled")
    env.pop("ACTFLEET_CONFIG", None)

    def actfleet(*args):
        r = subprocess.run(
            [sys.executable, "-c", "from actfleet.cli import main; main()", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        return r

    # Steps 1, 2 and 4 of the page with local paths (no --positions: --context-size implies all).
    actfleet(
        "prepare", "--store", "store", "--job", "pile-l6", "--model", "./Qwen2.5-0.5B", "--input", "docs.jsonl",
        "--context-size", "128", "--separator", "eos", "--prepend-bos", "--layers", "1", "--sites", "resid_post",
        "--store-dtype", "bfloat16", "--unit-rows", "80",
    )  # fmt: skip
    actfleet("work", "--store", "store", "--job", "pile-l6", "--worker-id", "w0")
    out = actfleet(
        "export", "saelens", "store/pile-l6", "./pile-l6-saelens", "--site", "blocks.1.hook_resid_post",
        "--model-class", "hf", "--seed", "0", "--json",
    )  # fmt: skip
    summary = json.loads(out.stdout)
    assert summary["column"] == "model.layers.1" and summary["model_class"] == "hf"
    assert summary["tokens_dropped"] == 0 and summary["context_size"] == 128
    assert summary["tokens_exported"] >= 3 * 4096  # a few training steps of the block's 4096-token batches

    # Step 5: the page's block, verbatim, between the recording prelude and the report.
    (tmp_path / "train.py").write_text(PRELUDE + documented_block() + "\n" + REPORT)
    r = subprocess.run([sys.executable, "train.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    print(got)
    assert got["cached"] and got["column"] == "model.layers.1"  # it trained from the export, under the hf name
    assert got["batch"] == [4096, 64]
    assert got["changed"] and got["mse_after"] < got["mse_before"]  # it trained
    saved = tmp_path / "sae-pile-l6"
    assert any(saved.rglob("*.safetensors")), sorted(p.name for p in saved.rglob("*"))
    cfg = json.loads(next(saved.rglob("cfg.json")).read_text())
    assert cfg["d_in"] == 64 and cfg["metadata"]["hook_name"] == "model.layers.1", cfg
