"""The TPU API endpoint allow-list (actfleet/endpoints.py): Google's API hosts over https and loopback only, at
every door an endpoint comes in by: fleet.tpu_endpoint, $ACTFLEET_TPU_ENDPOINT, `actfleet tpu --endpoint`, and
TpuApi itself. An https endpoint is sent application default credentials, so any other host is refused (exit 2)
before a client, a credential look-up or a request."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from actfleet import config
from actfleet.endpoints import endpoint_problem
from actfleet.errors import ConfigError
from actfleet.infra.tpu_api import TpuApi
from tests.test_config import GOOD, load_text, with_line

ACTFLEET = str(Path(sys.executable).with_name("actfleet"))
TARGET = ["--project", "test-project", "--zone", "us-central1-a", "--id", "tpu-us-central1-a-0"]

ALLOWED = [
    "",  # Google's default
    "https://tpu.googleapis.com",
    "https://tpu.googleapis.com/",
    "https://TPU.googleapis.com:443",
    "https://tpu.mtls.googleapis.com",
    "https://private.googleapis.com",  # Private Google Access
    "https://restricted.googleapis.com",
    "https://tpu-vialink1.p.googleapis.com",  # a Private Service Connect endpoint's name
    "http://127.0.0.1:8470",  # the fake
    "http://127.0.0.2:1",
    "https://127.0.0.1:8443",
    "http://localhost:8470",
    "http://[::1]:8470",
]
REFUSED = [
    "https://evil.example",
    "http://evil.example:8470",
    "https://googleapis.com.evil.example",
    "https://tpu.googleapis.com.evil.example",
    "https://evilgoogleapis.com",
    "https://googleapis.com",
    "https://tpu.googleapis.com@evil.example",  # userinfo: the host is evil.example
    "https://user:pw@tpu.googleapis.com",
    "https://evil.example/.googleapis.com",
    "https://evil.example\\.googleapis.com",
    "https://evil.example?.googleapis.com",
    "https://evil.example#.googleapis.com",
    "http://tpu.googleapis.com",  # Google's, but not over https
    "https://tpu.googleapis.com/v2",
    "https://tpu.googleapis.com\n",  # urlsplit would drop the newline; the client would not
    "https://tpu.googleapis.com:99999",
    "tpu.googleapis.com",
    "ftp://127.0.0.1",
    "http://0x7f.0.0.1",
    "http://127.0.0.1.nip.io",
    "http://[fe80::1]",
]


@pytest.mark.parametrize("url", ALLOWED)
def test_google_and_loopback_are_allowed(url):
    assert endpoint_problem(url) is None


@pytest.mark.parametrize("url", REFUSED)
def test_other_hosts_are_refused(url):
    assert endpoint_problem(url)


def test_the_config_loader_refuses_another_host_by_key(tmp_path, monkeypatch):
    monkeypatch.delenv(config.TPU_ENDPOINT_ENV, raising=False)
    assert load_text(tmp_path, with_line("fleet", 'tpu_endpoint = "https://tpu.googleapis.com"')).fleet.endpoint() == (
        "https://tpu.googleapis.com"
    )
    with pytest.raises(ConfigError, match=r'fleet.tpu_endpoint = "https://evil.example".*neither a Google API host'):
        load_text(tmp_path, with_line("fleet", 'tpu_endpoint = "https://evil.example"'))


def test_the_environment_override_is_checked_too(tmp_path, monkeypatch):
    c = load_text(tmp_path, GOOD)
    monkeypatch.setenv(config.TPU_ENDPOINT_ENV, "https://tpu.googleapis.com.evil.example")
    with pytest.raises(ConfigError, match=r'^\$ACTFLEET_TPU_ENDPOINT "https://tpu.googleapis.com.evil.example": '):
        c.fleet.endpoint()
    with pytest.raises(ConfigError, match=r"^\$ACTFLEET_TPU_ENDPOINT "):
        TpuApi.from_config(c.fleet)
    monkeypatch.setenv(config.TPU_ENDPOINT_ENV, "http://127.0.0.1:9")
    assert TpuApi.from_config(c.fleet).endpoint == "http://127.0.0.1:9"


def test_the_client_refuses_another_host_before_any_client_exists():
    with pytest.raises(ConfigError, match=r'^TPU API endpoint "https://evil.example": '):
        TpuApi("test-project", "https://evil.example")


def tpu_command(*args: str, env_endpoint: str | None = None) -> subprocess.CompletedProcess:
    # No credentials anywhere: were the endpoint accepted, an https one would end in exit 3 (no credentials).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACTFLEET_", "GOOGLE_"))}
    env["CLOUDSDK_CONFIG"] = env["HOME"] = "/nonexistent"
    if env_endpoint is not None:
        env["ACTFLEET_TPU_ENDPOINT"] = env_endpoint
    return subprocess.run(
        [ACTFLEET, "tpu", *args], env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120
    )


@pytest.mark.parametrize(
    "how, culprit",
    [("flag", "--endpoint"), ("env", "$ACTFLEET_TPU_ENDPOINT")],
)
def test_the_tpu_command_refuses_another_host_with_exit_2(how, culprit):
    url = "https://tpu.googleapis.com@evil.example"
    if how == "flag":
        out = tpu_command("delete-qr", *TARGET, "--endpoint", url)
    else:
        out = tpu_command("delete-qr", *TARGET, env_endpoint=url)
    assert out.returncode == 2, out.stderr
    assert out.stderr == f'actfleet: {culprit} "{url}": must not carry a user name or password\n'
    assert out.stdout == ""
