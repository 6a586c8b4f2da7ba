"""`actfleet reconcile`: bring the fleet back to its desired state (one pass, or every N seconds).

Run it on a timer (`make reconcile`, systemd or cron: docs/operations.md). Output: a table of every worker
that is not simply healthy, with what the pass did and why, then one summary line; `--json` prints the
pass report (schema "actfleet.reconcile/v1", docs/operations.md), one JSON document per pass (JSON Lines
with --watch).

fleet.toml is the desired state, so every pass reads it again: with --watch an edit takes effect at the next
pass. A config that does not load stops a single pass, or the first pass of a --watch, with exit 2. A later
pass that finds it broken is skipped (nothing observed, nothing locked or changed, no JSON document): the
error goes to stderr as one line and the watch goes on, reading the file again next time; interrupted,
the watch exits with the code of its last pass (2 if that one was skipped).

Exit codes: 0 converged, repaired, planned (--dry-run) or another reconcile holds the lock;
1 something failed (a zone could not be observed, Terraform failed, an orphan could not be deleted);
2 bad config or usage; 3 terraform missing.
"""

from __future__ import annotations

import json
import sys
import time

import click

from actfleet.cli import config_option, json_option
from actfleet.config import load
from actfleet.errors import ActfleetError
from actfleet.infra.decide import HEALTHY
from actfleet.infra.reconcile import FAILED, LOCKED, PassReport, reconcile_pass
from actfleet.work_queue import clock_skew_line

KIND_STYLE = {
    "healthy": "green",
    "pending": "cyan",
    "wait": "yellow",
    "report": "bold yellow",
    "create": "bold green",
    "replace": "bold magenta",
    "remove": "bold red",
    "delete-orphan": "bold red",
}
DONE_WORDS = {"create": "created", "replace": "replaced", "remove": "removed", "delete-orphan": "deleted"}


@click.command("reconcile")
@config_option
@json_option
@click.option("--dry-run", is_flag=True, help="Observe and decide, print what would be done, change nothing.")
@click.option(
    "--watch",
    "watch_s",
    type=click.FloatRange(min=1),
    default=None,
    metavar="SECONDS",
    help="Run a pass every SECONDS until interrupted, each reading the config again (and taking "
    "and releasing the lock).",
)
@click.option(
    "--wait", "wait_for_lock", is_flag=True, help="If another reconcile holds the lock, wait for it instead of exiting."
)
@click.option(
    "--retry-now",
    is_flag=True,
    help="Retry failed creates this pass, ignoring their backoff (after fixing a permission or quota), "
    "and lift a halted release's circuit breaker.",
)
@click.option("-v", "--verbose", is_flag=True, help="List healthy workers too, and stream Terraform's output.")
def reconcile(config_path, as_json, dry_run, watch_s, wait_for_lock, retry_now, verbose):
    """Bring the fleet back to its desired state: observe -> decide -> act -> report.

    \b
    Replaces preempted/suspended/failed workers and READY ones whose worker
    never started or stalled, creates missing ones, removes workers taken out
    of the config, deletes orphans carrying this fleet's label, all in ONE
    terraform apply; does nothing (and runs no terraform) when the fleet is
    converged. Waits for SUSPENDING; failing creates back off (5 min doubling
    to 1 h, remembered next to the lock). One reconcile at a time (a lock).
    \b
    Exit codes: 0 converged / repaired / --dry-run / lock held by another pass,
    1 a failure (unreachable zone, terraform, API), 2 bad config, 3 no terraform.
    """
    cfg = load(config_path)  # unloadable at the start: exit 2 at once (the CLI prints the one line)
    while True:
        exit_code = _one_pass(
            cfg, as_json, dry_run, wait_for_lock, verbose, json_lines=watch_s is not None, retry_now=retry_now
        ).exit_code
        retry_now = False  # once: later --watch passes back off again
        if watch_s is None:
            sys.exit(exit_code)
        while True:
            try:
                _sleep(watch_s)
            except KeyboardInterrupt:
                sys.exit(exit_code)
            try:
                cfg = load(config_path)  # the desired state as it is now, for the next pass
                break
            except ActfleetError as e:
                click.echo(f"actfleet: {e} (pass skipped; reading it again in {watch_s:g} s)", err=True)
                exit_code = e.exit_code


_sleep = time.sleep  # between --watch passes (a test steps through passes with its own)


def _one_pass(
    cfg,
    as_json: bool,
    dry_run: bool,
    wait_for_lock: bool,
    verbose: bool,
    json_lines: bool = False,
    retry_now: bool = False,
) -> PassReport:
    from rich.console import Console

    err = Console(stderr=True)
    apply = None
    if verbose:
        from actfleet.infra.reconcile import terraform_apply

        def apply(cfg, **kw):  # noqa: E306
            terraform_apply(cfg, stream=True, **kw)

    # A spinner on a terminal while the pass runs (terraform applies take a while); nothing in logs.
    with (
        err.status("reconcile: observing and deciding...", spinner="dots")
        if err.is_terminal and not as_json
        else _nothing()
    ):
        report = reconcile_pass(cfg, dry_run=dry_run, wait_for_lock=wait_for_lock, apply=apply, retry_now=retry_now)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=None if json_lines else 2))
    else:
        print_human(report, verbose=verbose)
    return report


def print_human(report: PassReport, verbose: bool = False) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text  # reasons quote the service's messages: never read as markup

    out, err = Console(), Console(stderr=True)
    if not out.is_terminal:  # logs and cron mail: wide enough that no column is cut
        out = Console(width=240)
    stamp = report.to_dict()["started_at"]
    if report.outcome == LOCKED:
        out.print(
            f"{stamp} reconcile: another pass is running; nothing done. Lock held by {report.locked_by['describe']}",
            highlight=False,
        )
        return
    rows = [a for a in report.actions if verbose or a.kind != HEALTHY]
    if rows:
        table = Table(show_edge=False, pad_edge=False, box=None, header_style="bold")
        for col in ("worker", "zone", "action", "reason"):
            table.add_column(col, no_wrap=col != "reason")
        for a in rows:
            kind = a.kind
            if a.acts and not report.dry_run and report.outcome != FAILED:
                kind = DONE_WORDS.get(kind, kind)
            table.add_row(a.worker, a.zone, f"[{KIND_STYLE.get(a.kind, '')}]{kind}[/]", Text(a.reason))
        out.print(table)
    counts = ", ".join(f"{n} {k}" for k, n in report.counts.items()) or "no workers"
    tf = report.terraform
    did = (
        (
            "terraform "
            + tf["command"]
            + (f" with {len(tf['replace'])} -replace" if tf["replace"] else "")
            + f" ({tf['seconds']:.0f} s)"
        )
        if tf["ran"]
        else "no terraform run"
    )
    deleted = report.api_deletes["deleted"]
    if deleted:
        did += f"; deleted through the TPU API: {', '.join(deleted)}"
    what = {"converged": "converged", "repaired": "repaired", "planned": "dry run, would act", "failed": "FAILED"}.get(
        report.outcome, report.outcome
    )
    out.print(
        f"{stamp} reconcile {report.fleet}: {what} - {counts}; {did}; "
        f"{report.api_calls} API calls, {report.seconds:.1f} s",
        highlight=False,
    )
    r = report.restarts
    if r["preemptions"] or r["errors"]:
        classes = ", ".join(f"{n} {c}" for c, n in r["by_class"].items())
        out.print(
            f"restarts so far: {r['preemptions']} after preemptions, {r['errors']} after errors"
            + (f" (now failing: {classes})" if classes else ""),
            highlight=False,
        )
    if report.job["watched"]:
        job = (
            ("complete" if report.job["complete"] else "not complete")
            if report.job["error"] is None
            else report.job["error"]
        )
        out.print(f"job: {job}", highlight=False)
    for name, skew in sorted(report.workers.get("clock_skew", {}).items()):
        out.print(f"warning: {clock_skew_line(f'worker {name}', skew)}", highlight=False, markup=False)
    for line in report.errors:
        err.print(f"actfleet: {line}", highlight=False, markup=False)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
