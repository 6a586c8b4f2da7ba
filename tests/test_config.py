"""fleet.toml loading: every class of bad input fails with one line naming key, value and rule (exit 2)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from actfleet import config
from actfleet.errors import EXIT_BAD_INPUT, ConfigError

REPO = Path(__file__).resolve().parents[1]

GOOD = textwrap.dedent("""
    [fleet]
    id = "acts"
    project = "my-project-1"
    region = "us-central1"
    zones = { "us-central1-a" = 4, "us-central1-b" = 4, "us-central1-c" = 4 }

    [repo]
    url = "https://github.com/example/actfleet.git"
    commit = "0123456789abcdef0123456789abcdef01234567"

    [storage]
    bucket = "my-acts"

    [job]
    model = "Qwen/Qwen2.5-0.5B"
    input = "gs://my-acts/data.jsonl"
    layers = [3, 1]
""")


def load_text(tmp_path: Path, text: str) -> config.Config:
    p = tmp_path / "fleet.toml"
    p.write_text(text)
    return config.load(p)


def with_line(section: str, line: str, base: str = GOOD) -> str:
    """GOOD with `line` added at the top of [section] (a later duplicate would be a TOML error)."""
    return base.replace(f"[{section}]\n", f"[{section}]\n{line}\n", 1)


def test_good_config_expands_workers_sites_and_defaults(tmp_path):
    c = load_text(tmp_path, GOOD)
    assert len(c.fleet.workers) == 12
    assert c.fleet.workers[0] == config.Worker("tpu-us-central1-a-0", "us-central1-a", 0)
    assert [w.name for w in c.fleet.workers if w.zone == "us-central1-c"] == [
        f"tpu-us-central1-c-{i}" for i in range(4)
    ]
    assert c.fleet.zones == ("us-central1-a", "us-central1-b", "us-central1-c")
    assert c.fleet.mode == "queued" and c.fleet.spot is True
    assert c.fleet.service_account_email == "actfleet-acts@my-project-1.iam.gserviceaccount.com"
    assert c.job.options.sites == ("blocks.1.hook_resid_post", "blocks.3.hook_resid_post")
    assert c.job.store == "gs://my-acts"
    assert c.storage.location == "US-CENTRAL1"
    assert c.state.backend == "local" and c.state.prefix == "actfleet/acts"
    with pytest.raises(Exception):  # frozen
        c.fleet.mode = "vm"  # type: ignore[misc]


def test_explicit_worker_list(tmp_path):
    text = GOOD.replace(
        'zones = { "us-central1-a" = 4, "us-central1-b" = 4, "us-central1-c" = 4 }',
        'workers = ["tpu-us-central1-b-7", "tpu-us-central1-a-0"]',
    )
    c = load_text(tmp_path, text)
    assert [(w.name, w.zone, w.index) for w in c.fleet.workers] == [
        ("tpu-us-central1-b-7", "us-central1-b", 7),
        ("tpu-us-central1-a-0", "us-central1-a", 0),
    ]


def test_site_kinds_and_full_names_mix(tmp_path):
    text = GOOD.replace("layers = [3, 1]", 'layers = [2]\nsites = ["embed", "attn_out", "blocks.0.hook_mlp_out"]')
    c = load_text(tmp_path, text)
    assert c.job.options.sites == ("hook_embed", "blocks.0.hook_mlp_out", "blocks.2.hook_attn_out")


def test_layers_all_keeps_a_marker_for_the_extractor(tmp_path):
    c = load_text(tmp_path, GOOD.replace("layers = [3, 1]", 'layers = "all"'))
    assert c.job.options.sites == ("blocks.*.hook_resid_post",)


@pytest.mark.parametrize(
    "text, expected",
    [
        # unknown key, with a suggestion
        (with_line("fleet", 'zone = "us-central1-a"'), 'unknown key fleet.zone (did you mean "zones"?)'),
        # unknown section
        (GOOD + "\n[fleets]\n", 'unknown section [fleets] (did you mean "fleet"?)'),
        # bad choice
        (with_line("fleet", 'mode = "spot"'), 'fleet.mode = "spot": must be one of "queued", "vm"'),
        # wrong type
        (with_line("fleet", 'spot = "yes"'), 'fleet.spot = "yes": must be true or false'),
        (with_line("job", "unit_rows = 0"), "job.unit_rows = 0: must be an integer >= 1"),
        (with_line("job", "batch_tokens = 1.5"), "job.batch_tokens = 1.5: must be an integer from 16 to 16777216"),
        # pattern
        (
            GOOD.replace('commit = "0123456789abcdef0123456789abcdef01234567"', 'commit = "main"'),
            'repo.commit = "main": must be a full 40-hex commit sha',
        ),
        (GOOD.replace('bucket = "my-acts"', 'bucket = "My_Bucket!"'), 'storage.bucket = "My_Bucket!": must be a GCS'),
        # zone table content
        (
            GOOD.replace('"us-central1-c" = 4', '"us-central1-c" = -1'),
            'fleet.zones = { "us-central1-a" = 4, "us-central1-b" = 4, "us-central1-c" = -1 }: has us-central1-c = -1',
        ),
        (GOOD.replace('"us-central1-c" = 4', '"europe-west4-a" = 1'), 'zone "europe-west4-a" is not in region'),
        # required keys and sections
        (GOOD.replace('model = "Qwen/Qwen2.5-0.5B"\n', ""), "missing required key job.model"),
        (GOOD.split("[job]")[0], "missing section [job]"),
        # cross-key rules
        (with_line("fleet", 'workers = ["tpu-us-central1-a-0"]'), "set exactly one of fleet.zones"),
        (with_line("state", 'backend = "gcs"', GOOD + "\n[state]\n"), 'state.bucket = "": required when'),
        (with_line("storage", "soft_delete_days = 3"), "storage.soft_delete_days = 3: must be 0 (soft delete off)"),
        (GOOD.replace("layers = [3, 1]", "layers = []"), 'job.layers = []: site kind "resid_post" needs layers'),
        (with_line("job", 'sites = ["resid"]'), "job.sites = ['resid']: has \"resid\""),
        # a gs:// store with no bucket, or climbing out of its prefix (actfleet.store.parse_gs)
        (with_line("job", 'store = "gs://"'), 'job.store = "gs://": no bucket'),
        (with_line("job", 'store = "gs://b/../x"'), 'job.store = "gs://b/../x": ".." is not allowed'),
        # not TOML at all
        (GOOD + "\nthis is = = not toml\n", "not valid TOML"),
        (with_line("fleet", 'accelerator_type = "v9z-8"'), 'fleet.accelerator_type = "v9z-8": not a Cloud TPU'),
        # the boot and heartbeat rules
        (
            with_line("reconcile", "boot_timeout_minutes = -1", GOOD + "\n[reconcile]\n"),
            "reconcile.boot_timeout_minutes = -1: must be a number of minutes from 0 (off)",
        ),
        (
            with_line("reconcile", 'heartbeat_timeout_minutes = "15"', GOOD + "\n[reconcile]\n"),
            'reconcile.heartbeat_timeout_minutes = "15": must be a number of minutes',
        ),
        (
            with_line("reconcile", "heartbeat_timeout_minutes = 2.5", GOOD + "\n[reconcile]\n"),
            "reconcile.heartbeat_timeout_minutes = 2.5: must be 0 (off) or at least job.lease_seconds (300 s)",
        ),
    ],
)
def test_bad_config_is_one_line_naming_key_value_and_rule(tmp_path, text, expected):
    with pytest.raises(ConfigError) as e:
        load_text(tmp_path, text)
    msg = str(e.value)
    assert expected in msg
    assert "\n" not in msg
    assert msg.startswith(str(tmp_path / "fleet.toml"))
    assert e.value.exit_code == EXIT_BAD_INPUT


def test_missing_file_names_the_path_and_the_ways_to_point_at_one(tmp_path):
    with pytest.raises(ConfigError, match="config file not found .*ACTFLEET_CONFIG"):
        config.load(tmp_path / "nope.toml")


def test_env_var_names_the_config_when_flag_absent(tmp_path, monkeypatch):
    p = tmp_path / "elsewhere.toml"
    p.write_text(GOOD)
    monkeypatch.setenv(config.CONFIG_ENV, str(p))
    assert config.load(None).source == str(p)
    # the flag wins over the environment
    q = tmp_path / "flag.toml"
    q.write_text(GOOD.replace('id = "acts"', 'id = "other"'))
    assert config.load(q).fleet.id == "other"


def test_tpu_endpoint_env_overrides_config(tmp_path, monkeypatch):
    c = load_text(tmp_path, with_line("fleet", 'tpu_endpoint = "http://127.0.0.1:1"'))
    monkeypatch.delenv(config.TPU_ENDPOINT_ENV, raising=False)
    assert c.fleet.endpoint() == "http://127.0.0.1:1"
    monkeypatch.setenv(config.TPU_ENDPOINT_ENV, "http://127.0.0.1:2")
    assert c.fleet.endpoint() == "http://127.0.0.1:2"


def test_replace_gives_a_changed_copy(tmp_path):
    c = load_text(tmp_path, GOOD)
    d = c.replace("job", store="/tmp/x", name="j2")
    assert (d.job.store, d.job.name) == ("/tmp/x", "j2")
    assert c.job.store == "gs://my-acts"


# Multi-host slices (v4-16, v5litepod-16, v6e-256, v5p-32) run as one worker since worker/multihost.py.
@pytest.mark.parametrize(
    "accelerator",
    [
        "v4-8",
        "v5p-8",
        "v5litepod-1",
        "v5litepod-4",
        "v5litepod-8",
        "v6e-8",
        "v4-16",
        "v5litepod-16",
        "v6e-256",
        "v5p-32",
    ],
)
def test_single_host_and_multi_host_types_are_accepted(tmp_path, accelerator):
    assert (
        load_text(tmp_path, with_line("fleet", f'accelerator_type = "{accelerator}"')).fleet.accelerator_type
        == accelerator
    )


def test_boot_and_heartbeat_timeouts_take_fractions_and_default_to_30_and_15(tmp_path):
    cfg = load_text(tmp_path, GOOD)
    assert (cfg.reconcile.boot_timeout_minutes, cfg.reconcile.heartbeat_timeout_minutes) == (30.0, 15.0)
    cfg = load_text(tmp_path, GOOD + "\n[reconcile]\nboot_timeout_minutes = 0.5\nheartbeat_timeout_minutes = 0\n")
    assert (cfg.reconcile.boot_timeout_minutes, cfg.reconcile.heartbeat_timeout_minutes) == (0.5, 0.0)


def test_example_config_in_the_repo_loads():
    c = config.load(REPO / "fleet.example.toml")
    assert len(c.fleet.workers) == 8


def test_cli_reports_bad_config_on_stderr_with_exit_2(tmp_path):
    """Through the real console entry point: one line on stderr, nothing on stdout, exit code 2."""
    p = tmp_path / "fleet.toml"
    p.write_text(with_line("fleet", 'mode = "spot"'))
    env = {**os.environ, "ACTFLEET_CONFIG": str(p)}
    r = subprocess.run(
        [sys.executable, "-c", "from actfleet.cli import main; main()", "status"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert r.returncode == 2, r.stderr
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert lines == [f'actfleet: {p}: fleet.mode = "spot": must be one of "queued", "vm", "gce"']


def test_relative_state_path_means_next_to_the_config_file(tmp_path, monkeypatch):
    """Two commands run from different directories must share one Terraform state and lock."""
    sub = tmp_path / "conf"
    sub.mkdir()
    (sub / "fleet.toml").write_text(GOOD + '\n[state]\npath = "tfstate"\n\n[reconcile]\nlock = "locks/r.lock"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    c = config.load(Path("..") / "conf" / "fleet.toml")
    assert c.state.path == str(sub / "tfstate")
    assert c.reconcile.lock == str(sub / "locks" / "r.lock")
