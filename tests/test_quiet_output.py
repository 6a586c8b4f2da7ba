"""On a normal run every command's stderr holds actfleet's own lines only (issue 26), in the full test venv
(typeguard 4 from the saelens extra, torch, transformers, datasets, jax): known-benign third-party warnings and
log records are dropped (actfleet/quiet.py), and everything else, ours or a library's, still shows.

One cheap run per command family: reconcile (a first pass, which synthesizes the stacks) and status;
prepare, work and verify; extract and export; local.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import warnings
from importlib import metadata
from pathlib import Path
from typing import Protocol

import pytest

from actfleet.quiet import quiet_cdktf_bindings
from tests.conftest import write_fleet_toml
from tests.fakes.tpu_server import FakeTpuServer

REPO = Path(__file__).resolve().parents[1]
TYPEGUARD_TEXT = (
    "Typeguard cannot check the IResolvable protocol because it is a non-runtime protocol. If you "
    "would like to type check this protocol, please use @typing.runtime_checkable"
)

# Line shapes actfleet itself writes to stderr (anything else is a foreign line).
EVENT = r"[a-z][a-z-]* \{.*\}"  # work: one JSON event a line ("claimed {...}")
OUR_LOG_RECORD = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ actfleet\.\S+ [A-Z]+ .*"  # quiet.log_to_stderr's format


def foreign(stderr: str, *ours: str) -> list[str]:
    """The non-blank lines of `stderr` that match none of the patterns `ours` (whole-line regexes)."""
    return [line for line in stderr.splitlines() if line.strip() and not any(re.fullmatch(p, line) for p in ours)]


def actfleet(
    *args: str,
    cwd: Path,
    env: dict | None = None,
    code: str = "from actfleet.cli import main; main()",
    timeout: float = 600,
) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env or {})}
    # As an operator runs it: conftest's JAX_PLATFORMS=cpu and TF_CPP_MIN_LOG_LEVEL=3 would hide what jax and
    # XLA print on a normal start (jax: at INFO, that it found no TPU).
    for name in ("ACTFLEET_CONFIG", "JAX_PLATFORMS", "TF_CPP_MIN_LOG_LEVEL"):
        env.pop(name, None)
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=timeout,
    )


# ----------------------------------------------------------------------------------------------------
# The filters themselves: exactly the named class is dropped
# ----------------------------------------------------------------------------------------------------


def shown(*emit) -> list[str]:
    """Messages of the warnings that get through quiet_cdktf_bindings; each `emit` is (message, module)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_cdktf_bindings()
        for message, module in emit:
            warnings.warn_explicit(message, UserWarning, "x.py", 1, module=module, registry={})
    return [str(w.message) for w in caught]


def test_the_typeguard_protocol_warning_is_dropped_from_the_bindings_only():
    assert (
        shown(
            (TYPEGUARD_TEXT, "cdktf"),
            (TYPEGUARD_TEXT, "cdktf_cdktf_provider_google.storage_bucket"),
            (TYPEGUARD_TEXT, "cdktf_cdktf_provider_google_beta.google_tpu_v2_vm"),
            (TYPEGUARD_TEXT, "constructs"),
        )
        == []
    )
    # The same text from anyone else, another warning from the bindings, a look-alike package: all shown.
    kept = [
        (TYPEGUARD_TEXT, "actfleet.infra.stacks"),
        ("deprecated: use X", "cdktf_cdktf_provider_google.provider"),
        (TYPEGUARD_TEXT, "cdktfx"),
        ("Typeguard cannot check the Config type", "cdktf"),
    ]
    assert shown(*kept) == [message for message, _ in kept]


def needs_typeguard_3():
    """typeguard >= 3, as the saelens extra pins (4.2): 2.13, the cloud-only venv's, never warns."""
    typeguard = pytest.importorskip("typeguard")
    if int(metadata.version("typeguard").split(".")[0]) < 3:
        pytest.skip("typeguard < 3 does not warn about protocols")
    return typeguard


class IResolvable(Protocol):  # not runtime_checkable, like jsii's protocols
    def resolve(self) -> object: ...


def test_a_real_typeguard_check_from_a_bindings_module_is_quiet_and_from_ours_is_not():
    typeguard = needs_typeguard_3()

    def check_from(module: str) -> list[str]:
        scope = {"__name__": module, "typeguard": typeguard, "P": IResolvable}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quiet_cdktf_bindings()
            exec("typeguard.check_type(object(), P)", scope)  # the call the bindings make, from `module`
        return [str(w.message) for w in caught]

    assert check_from("cdktf_cdktf_provider_google.storage_bucket") == []
    assert check_from("actfleet.infra.stacks") == [TYPEGUARD_TEXT]


def test_log_to_stderr_keeps_ours_from_info_and_libraries_from_warning(tmp_path):
    code = textwrap.dedent("""
        import logging
        from actfleet.quiet import log_to_stderr
        log_to_stderr()
        logging.getLogger("jax._src.xla_bridge").info("library info: dropped")
        logging.getLogger("jax._src.xla_bridge").warning("library warning: shown")
        logging.getLogger("transformers").error("library error: shown")
        logging.getLogger("actfleet.work").info("our info: shown")
    """)
    r = actfleet(cwd=tmp_path, code=code)
    assert r.returncode == 0, r.stderr
    assert [line.split(" ", 2)[2] for line in r.stderr.splitlines()] == [
        "jax._src.xla_bridge WARNING library warning: shown",
        "transformers ERROR library error: shown",
        "actfleet.work INFO our info: shown",
    ]


# ----------------------------------------------------------------------------------------------------
# reconcile (synth, plan, deploy and destroy build the same stacks) and status
# ----------------------------------------------------------------------------------------------------

DELIBERATE = "actfleet-test: a deliberate warning while synthesizing"
# The real CLI, with one test-only hook: synthesizing the stacks also warns once from actfleet's own code
# (the caller of build_app, infra/synth_cache.py), which must still reach stderr.
WITH_A_DELIBERATE_WARNING = textwrap.dedent(f"""
    import warnings
    import actfleet.infra.stacks as stacks
    build_app = stacks.build_app
    def warning_build_app(*args, **kwargs):
        warnings.warn({DELIBERATE!r}, UserWarning, stacklevel=2)
        return build_app(*args, **kwargs)
    stacks.build_app = warning_build_app
    from actfleet.cli import main
    main()
""")


@pytest.mark.slow
def test_a_first_reconcile_pass_prints_no_typeguard_line_and_our_warning_still_shows(tmp_path):
    needs_typeguard_3()
    with FakeTpuServer.start(port=0) as fake:
        config = write_fleet_toml(
            tmp_path / "fleet.toml",
            id="quiet",
            zones={"us-central1-a": 1},
            commit="c" * 40,
            state=tmp_path / "state",
            bucket="quiet-activations",
            job={"model": "tiny", "input": "data.jsonl", "layers": [1], "store": str(tmp_path / "store")},
            reconcile={"watch_job": True},
        )
        env = {
            "ACTFLEET_TPU_ENDPOINT": fake.url,
            "ACTFLEET_SYNTH_DIR": str(tmp_path / "synth"),
            "CHECKPOINT_DISABLE": "1",
        }
        r = actfleet("reconcile", "--config", str(config), cwd=tmp_path, env=env, code=WITH_A_DELIBERATE_WARNING)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "reconcile quiet: repaired - 1 create; terraform apply" in r.stdout  # it did synthesize and apply
        assert "typeguard" not in r.stderr.lower(), r.stderr
        lines = r.stderr.splitlines()
        ours = [i for i, line in enumerate(lines) if DELIBERATE in line]
        assert len(ours) == 1 and "synth_cache.py" in lines[ours[0]], r.stderr
        # ... and nothing else: the warning's own source line aside, stderr is empty.
        assert foreign("\n".join(lines[: ours[0]] + lines[ours[0] + 2 :])) == [], r.stderr

        s = actfleet("status", "--config", str(config), cwd=tmp_path, env=env)
        assert s.returncode == 0 and "tpu-us-central1-a-0" in s.stdout, s.stdout + s.stderr
        assert foreign(s.stderr) == [], s.stderr


# ----------------------------------------------------------------------------------------------------
# The worker's commands on the tiny demo model
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from actfleet.demo.tiny_model import make_tiny_model

    root = tmp_path_factory.mktemp("quiet")
    model = make_tiny_model(root / "model", seed=1, max_pos=64)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"row {i}: " + "lorem " * (1 + i % 3)}) + "\n" for i in range(10)))
    return root, model, data


def jax_cache(tmp_path: Path) -> dict:
    return {"ACTFLEET_JAX_CACHE": str(tmp_path / "jax-cache"), "ACTFLEET_DATA_CACHE": str(tmp_path / "data-cache")}


def test_prepare_work_and_verify_print_only_our_lines(tiny, tmp_path):
    root, model, data = tiny
    store, env = str(tmp_path / "bucket"), jax_cache(tmp_path)
    p = actfleet(
        "prepare",
        "--store",
        store,
        "--job",
        "q",
        "--model",
        str(model),
        "--input",
        str(data),
        "--layers",
        "1",
        "--unit-rows",
        "5",
        cwd=tmp_path,
        env=env,
    )
    assert p.returncode == 0 and foreign(p.stderr) == [], p.stderr
    w = actfleet("work", "--store", store, "--job", "q", "--worker-id", "w0", cwd=tmp_path, env=env)
    assert w.returncode == 0, w.stderr
    assert "committed {" in w.stderr  # its events are on stderr ...
    assert foreign(w.stderr, EVENT, OUR_LOG_RECORD) == [], w.stderr  # ... and nothing of jax's (no TPU here)
    v = actfleet("verify", "--store", store, "--job", "q", cwd=tmp_path, env=env)
    assert v.returncode == 0 and "verified: OK" in v.stdout and foreign(v.stderr) == [], v.stderr


def test_extract_and_export_saelens_print_only_our_lines(tiny, tmp_path):
    root, model, data = tiny
    env = jax_cache(tmp_path)
    e = actfleet(
        "extract",
        "--model",
        str(model),
        "--input",
        str(data),
        "--out",
        str(tmp_path / "acts"),
        "--layers",
        "1",
        "--unit-rows",
        "5",
        cwd=tmp_path,
        env=env,
    )
    assert e.returncode == 0, e.stderr
    # Its progress bar's last state and the compilation line.
    assert foreign(e.stderr, r"extract .* rows .*", r"compilation: .*") == [], e.stderr
    x = actfleet(
        "export",
        "saelens",
        str(tmp_path / "acts"),
        str(tmp_path / "cache"),
        "--site",
        "blocks.1.hook_resid_post",
        "--context-size",
        "4",
        cwd=tmp_path,
        env=env,
    )
    assert x.returncode == 0 and "rows of 4 tokens" in x.stdout, x.stderr
    assert foreign(x.stderr) == [], x.stderr  # (its transient progress bar leaves one blank line)


@pytest.mark.slow
def test_local_and_its_workers_logs_hold_only_our_lines(tiny, tmp_path):
    root, model, data = tiny
    out = tmp_path / "out"
    r = actfleet(
        "local",
        "--workers",
        "1",
        "--model",
        str(model),
        "--input",
        str(data),
        "--layers",
        "1",
        "--unit-rows",
        "5",
        "--out",
        str(out),
        cwd=tmp_path,
        env=jax_cache(tmp_path),
    )
    assert r.returncode == 0 and "verified OK" in r.stdout, r.stdout + r.stderr
    assert foreign(r.stderr, r"actfleet local: .*") == [], r.stderr
    logs = sorted((out / "logs").glob("*.log"))
    assert logs
    for log in logs:  # a worker's stdout and stderr: its events and summary, and the headers local writes
        assert foreign(log.read_text(), EVENT, OUR_LOG_RECORD, r"worker \S+: .*", r"\S+ \S+ --- .*") == [], log
