"""`[fleet] mode = "gce"` and its Compute Engine endpoint key (issue 25): the mode is accepted, and
fleet.compute_endpoint / $ACTFLEET_COMPUTE_ENDPOINT go through the same allow-list as the TPU endpoint
(actfleet/endpoints.py): an https endpoint is sent credentials, so another host is refused by name (exit 2)."""

from __future__ import annotations

import pytest

from actfleet import config
from actfleet.errors import ConfigError
from tests.test_config import GOOD, load_text, with_line


def test_gce_is_a_fleet_mode(tmp_path):
    gce = 'mode = "gce"\naccelerator_type = "v6e-4"'
    assert load_text(tmp_path, with_line("fleet", gce)).fleet.mode == "gce"
    with pytest.raises(ConfigError, match=r'fleet.mode = "gke": must be one of "queued", "vm", "gce"'):
        load_text(tmp_path, with_line("fleet", 'mode = "gke"'))


def test_compute_endpoint_is_checked_like_the_tpu_endpoint(tmp_path, monkeypatch):
    monkeypatch.delenv(config.COMPUTE_ENDPOINT_ENV, raising=False)
    assert load_text(tmp_path, GOOD).fleet.compute_endpoint_url() == ""
    c = load_text(tmp_path, with_line("fleet", 'compute_endpoint = "https://compute.googleapis.com"'))
    assert c.fleet.compute_endpoint_url() == "https://compute.googleapis.com"
    with pytest.raises(ConfigError, match=r'fleet.compute_endpoint = "https://evil.example".*neither a Google API'):
        load_text(tmp_path, with_line("fleet", 'compute_endpoint = "https://evil.example"'))


def test_the_compute_endpoint_environment_override_wins_and_is_checked(tmp_path, monkeypatch):
    c = load_text(tmp_path, with_line("fleet", 'compute_endpoint = "http://127.0.0.1:1"'))
    monkeypatch.setenv(config.COMPUTE_ENDPOINT_ENV, "http://127.0.0.1:2")
    assert c.fleet.compute_endpoint_url() == "http://127.0.0.1:2"
    monkeypatch.setenv(config.COMPUTE_ENDPOINT_ENV, "https://compute.googleapis.com.evil.example")
    with pytest.raises(ConfigError, match=r'^\$ACTFLEET_COMPUTE_ENDPOINT "https://compute.googleapis.com.evil'):
        c.fleet.compute_endpoint_url()


@pytest.mark.parametrize(
    "accelerator, machine",
    [
        ("v6e-1", "ct6e-standard-1t"),
        ("v6e-4", "ct6e-standard-4t"),
        ("v6e-8", "ct6e-standard-8t"),
        ("v5p-8", "ct5p-hightpu-4t"),
        ("tpu7x-8", "tpu7x-standard-4t"),
    ],
)
def test_gce_mode_accepts_the_single_host_types_it_has_machine_types_for(tmp_path, accelerator, machine):
    from actfleet import accelerators

    text = with_line("fleet", f'mode = "gce"\naccelerator_type = "{accelerator}"')
    assert load_text(tmp_path, text).fleet.accelerator_type == accelerator
    assert accelerators.machine_type(accelerator) == machine


@pytest.mark.parametrize(
    "accelerator, why",
    [
        ("v5litepod-8", "Compute Engine offers TPU VM instances of tpu7x, v5p, v6e only"),
        ("v6e-16", "a multi-host slice"),
        ("v4-8", "Compute Engine offers TPU VM instances of"),
    ],
)
def test_gce_mode_refuses_a_type_without_a_machine_type_by_name(tmp_path, accelerator, why):
    text = with_line("fleet", f'mode = "gce"\naccelerator_type = "{accelerator}"')
    with pytest.raises(ConfigError, match=rf'fleet.accelerator_type = "{accelerator}": .*{why}'):
        load_text(tmp_path, text)


def test_tpu7x_is_refused_outside_gce_mode(tmp_path):
    with pytest.raises(ConfigError, match=r'"tpu7x-8": the Cloud TPU API does not serve it .*use fleet.mode = "gce"'):
        load_text(tmp_path, with_line("fleet", 'accelerator_type = "tpu7x-8"'))


def test_the_cli_exits_2_on_a_gce_type_it_cannot_run(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    path = tmp_path / "fleet.toml"
    path.write_text(with_line("fleet", 'mode = "gce"\naccelerator_type = "v5litepod-8"'))
    actfleet = str(Path(sys.executable).with_name("actfleet"))
    r = subprocess.run([actfleet, "status", "--config", str(path), "--json"], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().endswith("(gce mode knows: v6e-1, v6e-4, v6e-8, v5p-8, tpu7x-8)"), r.stderr
