"""`[fleet] mode = "gce"` and its Compute Engine endpoint key (issue 25): the mode is accepted, and
fleet.compute_endpoint / $ACTFLEET_COMPUTE_ENDPOINT go through the same allow-list as the TPU endpoint
(actfleet/endpoints.py): an https endpoint is sent credentials, so another host is refused by name (exit 2)."""

from __future__ import annotations

import pytest

from actfleet import config
from actfleet.errors import ConfigError
from tests.test_config import GOOD, load_text, with_line


def test_gce_is_a_fleet_mode(tmp_path):
    assert load_text(tmp_path, with_line("fleet", 'mode = "gce"')).fleet.mode == "gce"
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
