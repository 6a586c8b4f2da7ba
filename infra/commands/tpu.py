"""`actfleet tpu`: low-level TPU API calls.

`create-qr` and `delete-qr` are what the fleet stack's Terraform `local-exec` provisioners run, so they need
no config file (flags and environment only), start quickly, are idempotent, and print one line of what they
did. Exit codes: 0 done (or nothing to do), 1 the API call failed, 2 bad input (request JSON, flags),
3 no credentials.
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import asdict

import click
from click.core import ParameterSource

from actfleet.cli import config_option, json_option
from actfleet.config import TPU_ENDPOINT_ENV
from actfleet.endpoints import check_endpoint
from actfleet.errors import InputError

REQUEST_ENV = "ACTFLEET_TPU_REQUEST"

_PROJECT_RE = re.compile(r"[a-z][a-z0-9-]{4,28}[a-z0-9]")
_ZONE_RE = re.compile(r"[a-z]+-[a-z]+[0-9]+-[a-z]")
_ID_RE = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")


@click.group()
def tpu():
    """Low-level TPU API calls (used by the fleet stack's provisioners).

    \b
    The endpoint is --endpoint, else $ACTFLEET_TPU_ENDPOINT, else Google's
    (with application default credentials; an http:// endpoint gets none).
    Only https://*.googleapis.com and loopback (127.0.0.1, [::1], localhost)
    are accepted: any other host is refused (exit 2) before a request is made.
    Exit codes: 0 done or nothing to do, 1 API error, 2 bad input, 3 no credentials.
    """


def _target_options(f):
    f = click.option(
        "--endpoint",
        envvar=TPU_ENDPOINT_ENV,
        default="",
        show_envvar=True,
        help="TPU API endpoint, e.g. http://127.0.0.1:8470 for the fake (default: Google's).",
    )(f)
    f = click.option("--id", "qr_id", required=True, help="Queued resource id (actfleet: the worker name).")(f)
    f = click.option("--zone", required=True, help="Zone, e.g. us-central1-a.")(f)
    f = click.option("--project", required=True, help="Google Cloud project id.")(f)
    return f


def _target(project: str, zone: str, qr_id: str, endpoint: str):
    """The checked flags as (the TPU API client, the queued resource's full name)."""
    _check_target(project, zone, qr_id)
    source = click.get_current_context().get_parameter_source("endpoint")
    check_endpoint(endpoint, f"${TPU_ENDPOINT_ENV}" if source == ParameterSource.ENVIRONMENT else "--endpoint")
    from actfleet.infra.tpu_api import TpuApi

    api = TpuApi(project, endpoint, on_wait=_progress(), on_note=lambda line: click.echo(f"actfleet: {line}", err=True))
    return api, api.qr_path(zone, qr_id)


def _check_target(project: str, zone: str, qr_id: str) -> None:
    for flag, value, rx, like in (
        ("--project", project, _PROJECT_RE, "my-project"),
        ("--zone", zone, _ZONE_RE, "us-central1-a"),
        ("--id", qr_id, _ID_RE, "tpu-us-central1-a-0"),
    ):
        if not rx.fullmatch(value):
            raise InputError(f'{flag} "{value}": must look like "{like}"')


@tpu.command("create-qr")
@_target_options
@click.option(
    "--request-file",
    type=click.File("r"),
    default=None,
    help="File holding the QueuedResource REST JSON body ('-' for stdin).",
)
@click.option(
    "--request-json",
    default=None,
    envvar=REQUEST_ENV,
    show_envvar=True,
    help="The QueuedResource REST JSON body itself.",
)
def create_qr(project, zone, qr_id, endpoint, request_file, request_json):
    """Create a queued resource; a no-op if it exists with the same request.

    The request (the TPU v2 REST JSON body of a QueuedResource) comes from
    --request-file, --request-json ($ACTFLEET_TPU_REQUEST) or, with neither, stdin.
    It fails (exit 1) if the queued resource exists with a different request.
    One of that name on its way out does not count: DELETING or SUSPENDING is
    waited for, FAILED or SUSPENDED is deleted (confirmed) first.
    """
    api, path = _target(project, zone, qr_id, endpoint)
    if request_file is not None and request_json is not None:
        raise InputError("give the request once: --request-file or --request-json, not both")
    if request_file is not None:
        source, text = f"--request-file {request_file.name}", request_file.read()
    elif request_json is not None:
        source, text = "--request-json", request_json
    elif not sys.stdin.isatty():
        source, text = "stdin", sys.stdin.read()
    else:
        raise InputError("no request: pass --request-file FILE, --request-json JSON or pipe it on stdin")
    try:
        request = json.loads(text)
    except ValueError as e:
        raise InputError(f"{source}: not valid JSON: {e}") from None
    if api.create_queued_resource(zone, qr_id, request):
        click.echo(f"created queued resource {path}")
    else:
        click.echo(f"queued resource {path} already exists with this request: nothing to do")


@tpu.command("delete-qr")
@_target_options
@click.option(
    "--force/--no-force",
    default=True,
    show_default=True,
    help="Delete the queued resource's node with it (without, the API refuses while it has one).",
)
@click.option(
    "--wait/--no-wait",
    default=True,
    show_default=True,
    help="Wait until it is gone; --no-wait asks for the delete and returns (reconcile confirms it later).",
)
def delete_qr(project, zone, qr_id, endpoint, force, wait):
    """Delete a queued resource and its node; a no-op if already gone.

    \b
    Waits until a GET answers NOT_FOUND: one SUSPENDING is waited for first
    (never force-deleted), one that stays FAILED or SUSPENDED after its delete
    (a stuck delete) is deleted again. With --no-wait (the fleet stack's
    destroy provisioner) the delete is asked for and the command returns: one
    SUSPENDING is left for the next reconcile pass, which sees it and deletes it.
    """
    api, path = _target(project, zone, qr_id, endpoint)
    if not wait:
        done = api.request_delete_queued_resource(zone, qr_id, force=force)
        click.echo(
            {
                "gone": f"queued resource {path} does not exist: nothing to do",
                "deleting": f"queued resource {path} is already being deleted",
                "suspending": f"queued resource {path} is SUSPENDING: left for reconcile to delete once SUSPENDED",
                "requested": f"delete of queued resource {path} requested (not waited for)",
            }[done]
        )
        return
    if api.delete_queued_resource(zone, qr_id, force=force):
        click.echo(f"deleted queued resource {path}" + (" and its node" if force else ""))
    else:
        click.echo(f"queued resource {path} does not exist: nothing to do")


PROGRESS_EVERY = 15.0  # seconds between "still waiting" lines while an operation runs


def _progress():
    """A line on stderr every PROGRESS_EVERY seconds of waiting: Terraform streams it, so a deploy
    waiting on a slow delete shows it is alive (a bar would garble Terraform's output)."""
    shown = [0.0]

    def report(what: str, seconds: float) -> None:
        if seconds - shown[0] >= PROGRESS_EVERY:
            shown[0] = seconds
            click.echo(f"actfleet: waiting for the TPU API to finish with {what} ({seconds:.0f} s)", err=True)

    return report


@tpu.command("list")
@config_option
@json_option
def list_(config_path, as_json):
    """List queued resources and nodes in the fleet's zones (every one, the fleet's or not)."""
    from actfleet import config as config_mod
    from actfleet.infra.tpu_api import TpuApi, ZoneError

    cfg = config_mod.load(config_path)
    api = TpuApi.from_config(cfg.fleet)
    views = api.observe(cfg.fleet.zones)
    failed = {z: v.message for z, v in views.items() if isinstance(v, ZoneError)}
    if as_json:
        zones = {
            z: (
                {"error": v.message}
                if isinstance(v, ZoneError)
                else {
                    "queued_resources": [asdict(q) for q in v.queued_resources],
                    "nodes": [asdict(n) for n in v.nodes],
                }
            )
            for z, v in views.items()
        }
        click.echo(json.dumps({"project": cfg.fleet.project, "zones": zones}, indent=2, sort_keys=True))
    else:
        _print_table(views, cfg.fleet.id)
        for zone, message in failed.items():
            click.echo(f"actfleet: {zone}: {message}", err=True)
    if failed:
        sys.exit(1)


def _print_table(views, fleet_id: str) -> None:
    from rich.console import Console
    from rich.table import Table

    from actfleet.infra.tpu_api import ZoneError

    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("ZONE", "KIND", "NAME", "STATE", "HEALTH", "FLEET", "AGE"):
        table.add_column(column)
    now = time.time()
    for zone, view in sorted(views.items()):
        if isinstance(view, ZoneError):
            table.add_row(zone, "-", "-", "[red]API ERROR[/red]", "", "", "")
            continue
        for q in view.queued_resources:
            table.add_row(zone, "qr", q.name, q.state, "", _fleet(q.labels, fleet_id), _age(q.create_time, now))
        for n in view.nodes:
            table.add_row(zone, "node", n.name, n.state, n.health, _fleet(n.labels, fleet_id), _age(n.create_time, now))
        if not view.queued_resources and not view.nodes:
            table.add_row(zone, "-", "(none)", "", "", "", "")
    console = Console()
    if not console.is_terminal:
        console = Console(width=1000)  # piped: never truncate names to an assumed 80 columns
    console.print(table)


def _fleet(labels: dict, fleet_id: str) -> str:
    owner = labels.get("actfleet-fleet", "")
    return "" if not owner else ("this" if owner == fleet_id else owner)


def _age(created: float | None, now: float) -> str:
    if created is None:
        return ""
    s = max(0, int(now - created))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s // size}{unit}"
    return f"{s}s"
