"""infra/terraform.py's -parallelism and time limit, against a stand-in terraform binary (ACTFLEET_TERRAFORM)
that records its arguments and the signals it gets: the limit must interrupt it (SIGINT, which makes the real
Terraform release its state lock) rather than leave it to be SIGKILLed by the timer unit."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from actfleet.infra.terraform import Terraform, TerraformError

STANDIN = """#!{python}
import signal, sys, time, pathlib
log = pathlib.Path({log!r})
log.write_text(" ".join(sys.argv[1:]) + "\\n")
def stop(signum, frame):
    with log.open("a") as f:
        f.write("SIGINT: releasing the state lock\\n")
    sys.exit(1)
signal.signal(signal.SIGINT, stop)
time.sleep({sleep})
"""


@pytest.fixture
def standin(tmp_path, monkeypatch):
    def make(sleep: float) -> tuple[Path, Path]:
        log = tmp_path / "calls.log"
        binary = tmp_path / "terraform"
        binary.write_text(STANDIN.format(python=sys.executable, log=str(log), sleep=sleep))
        binary.chmod(0o755)
        monkeypatch.setenv("ACTFLEET_TERRAFORM", str(binary))
        stack = tmp_path / "stack"
        stack.mkdir(exist_ok=True)
        (stack / "cdk.tf.json").write_text("{}")
        return stack, log

    return make


def test_apply_passes_parallelism_and_var_file(standin):
    stack, log = standin(0)
    Terraform(stack, parallelism=50).apply(variables={"holds": {"w": {"release": "r1"}}})
    args = log.read_text().split()
    assert "-parallelism=50" in args
    assert any(a.startswith("-var-file=") and a.endswith(".tfvars.json") for a in args)
    assert not list(stack.glob("*.tfvars.json"))  # removed after the run


def test_a_run_past_its_limit_is_interrupted_not_killed(standin):
    stack, log = standin(60)
    with pytest.raises(TerraformError, match=r"interrupted after 1 s .*releases the state lock"):
        Terraform(stack, timeout_s=1).apply()
    assert "SIGINT: releasing the state lock" in log.read_text()


def test_no_limit_no_interrupt(standin):
    stack, log = standin(0.2)
    Terraform(stack).apply()
    assert "SIGINT" not in log.read_text() and os.path.exists(log)
