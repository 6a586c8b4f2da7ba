"""Runs the `terraform` binary on one synthesized stack: init, plan, apply, destroy, state list.

Used by `actfleet synth|plan|deploy|destroy` (infra/commands/stacks.py) and by reconcile, which applies the
fleet stack with every worker it recreates as a `-replace` target of ONE apply:

    from actfleet.infra.terraform import fleet_stack
    from actfleet.infra.terraform_layout import worker_address   # stack names, addresses, state locations

    tf = fleet_stack(config)              # cached synth (infra/synth_cache.py) + `terraform init` once
    tf.plan(replace=[worker_address("tpu-us-central1-a-3")])   # -> Plan(add=1, change=0, destroy=1, ...)
    tf.apply(replace=[worker_address("tpu-us-central1-a-3")])  # recreates exactly that worker
    tf.destroy()

A failing command raises `TerraformError` (an `ActfleetError`, exit code 1) whose one-line message is
Terraform's own error summary, e.g.

    terraform apply failed in fleet stack: Error: local-exec provisioner error
    (terraform_data.workers["tpu-us-central1-b-0"]): Error running command '...': exit status 1.
    Output: actfleet: TPU API: ... 403 ...

and a missing binary raises `PrerequisiteError` (exit code 3), checked before any slow synth.

The child environment: CHECKPOINT_DISABLE=1 (no phoning home), TF_IN_AUTOMATION=1, TF_INPUT=0 (never
prompt); TF_CLI_CONFIG_FILE is dropped when it names a file that does not exist (Terraform would fail on
it); providers (base stack, vm mode) go to one plugin cache next to the synth cache rather than being
downloaded again for every cache entry. The queued-mode fleet stack needs no provider: `init` is offline.
Output is captured and returned; `stream=True` also echoes it to stderr for people watching an apply.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from actfleet.config import Config
from actfleet.errors import EXIT_BAD_INPUT, ActfleetError, PrerequisiteError
from actfleet.infra.terraform_layout import FLEET, STACK_NAMES

INIT_MARKER = ".terraform/actfleet-init-done"
INTERRUPT_GRACE_S = 240.0  # after SIGINT, how long Terraform may take to stop before it is killed
SUMMARY_LIMIT = 800  # characters of error summary kept on the one line


class TerraformError(ActfleetError):
    """terraform exited non-zero; the message is its error summary on one line (exit code 1), `output`
    everything it printed."""

    def __init__(self, message: str, output: str = ""):
        super().__init__(message)
        self.output = output


@dataclass(frozen=True)
class Plan:
    """What an apply would do. `replace` lists the addresses it would destroy and create again."""

    add: int
    change: int
    destroy: int
    replace: tuple[str, ...] = ()
    text: str = field(default="", repr=False)  # Terraform's human-readable plan
    plan_file: Path | None = None  # the saved plan: apply(plan_file=...) applies exactly this

    @property
    def changes(self) -> bool:
        return bool(self.add or self.change or self.destroy)

    def as_dict(self) -> dict:
        return {
            "changes": self.changes,
            "add": self.add,
            "change": self.change,
            "destroy": self.destroy,
            "replace": list(self.replace),
        }


class Terraform:
    """One stack directory (holding cdk.tf.json) and the terraform commands that act on it."""

    def __init__(
        self,
        stack_dir: str | os.PathLike,
        env: Mapping[str, str] | None = None,
        *,
        stream: bool = False,
        lock_timeout: str = "0s",
        plugin_cache: Path | None = None,
        parallelism: int | None = None,
        timeout_s: float | None = None,
    ):
        self.dir = Path(stack_dir).resolve()
        if not (self.dir / "cdk.tf.json").is_file():
            raise ActfleetError(f"{self.dir}: no cdk.tf.json here (run `actfleet synth` first)")
        self.name = self.dir.name
        self.binary = terraform_binary()
        self.env = terraform_env(env, plugin_cache=plugin_cache)
        self.stream = stream
        self.lock_timeout = lock_timeout
        # -parallelism for apply/destroy: concurrent provisioner runs ([rollout] terraform_parallelism).
        self.parallelism = parallelism
        # A run past timeout_s is interrupted (SIGINT: Terraform stops starting work, lets running
        # provisioners finish, writes its state and RELEASES the state lock), and killed only INTERRUPT_GRACE_S
        # later. reconcile sets it below the timer unit's TimeoutStartSec (docs/operations.md), so systemd
        # never SIGKILLs a terraform that still holds the lock.
        self.timeout_s = timeout_s

    # -- commands ---------------------------------------------------------------------------------------

    def init(self, *, force: bool = False) -> None:
        """`terraform init`, once per stack directory (the synth cache gives each config its own)."""
        marker = self.dir / INIT_MARKER
        if marker.is_file() and not force:
            return
        with open(self.dir / ".actfleet-init.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # two processes initialising one directory take turns
            if marker.is_file() and not force:
                return
            self.run("init", "-input=false", "-no-color")
            marker.parent.mkdir(exist_ok=True)
            marker.write_text("initialized by actfleet\n")

    def plan(
        self, *, replace: Iterable[str] = (), targets: Iterable[str] = (), destroy: bool = False, save: bool = True
    ) -> Plan:
        """Plan, save it (a file of its own in the stack dir, so concurrent plans never swap files) and
        summarise it from `terraform show -json`. Remove the file with `discard(plan)` when done."""
        args = ["plan", "-input=false", "-no-color", f"-lock-timeout={self.lock_timeout}"]
        args += [f"-replace={a}" for a in replace] + [f"-target={t}" for t in targets]
        if destroy:
            args.append("-destroy")
        plan_path = None
        if save:
            fd, name = tempfile.mkstemp(prefix="actfleet-", suffix=".tfplan", dir=self.dir)
            os.close(fd)
            plan_path = Path(name)
            args.append(f"-out={plan_path}")
        try:
            text = self.run(*args)
            if plan_path is None:
                return _summary_from_text(text)
            shown = json.loads(self.run("show", "-json", str(plan_path), stream=False))
        except BaseException:
            if plan_path:
                plan_path.unlink(missing_ok=True)
            raise
        return _summary_from_json(shown, text, plan_path)

    @staticmethod
    def discard(plan: Plan) -> None:
        if plan.plan_file is not None:
            plan.plan_file.unlink(missing_ok=True)

    def apply(
        self,
        *,
        replace: Iterable[str] = (),
        targets: Iterable[str] = (),
        plan_file: str | os.PathLike | None = None,
        auto_approve: bool = True,
        variables: Mapping[str, object] | None = None,
    ) -> str:
        """`terraform apply` with every `replace` address in one run, or apply a saved plan. `variables`
        travel in a JSON var file of their own (a thousand workers' holds do not fit a command line)."""
        args = ["apply", "-input=false", "-no-color", f"-lock-timeout={self.lock_timeout}", *self._parallelism()]
        if plan_file is not None:
            if list(replace) or list(targets):
                raise ValueError("replace/targets belong to the saved plan, not to applying it")
            return self.run(*args, str(plan_file))
        if auto_approve:
            args.append("-auto-approve")
        args += [f"-replace={a}" for a in replace] + [f"-target={t}" for t in targets]
        if not variables:
            return self.run(*args)
        fd, name = tempfile.mkstemp(prefix="actfleet-", suffix=".tfvars.json", dir=self.dir)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(dict(variables), f)
            return self.run(*args, f"-var-file={name}")
        finally:
            Path(name).unlink(missing_ok=True)

    def _parallelism(self) -> list[str]:
        return [f"-parallelism={self.parallelism}"] if self.parallelism else []

    def destroy(self, *, targets: Iterable[str] = (), auto_approve: bool = True) -> str:
        args = ["destroy", "-input=false", "-no-color", f"-lock-timeout={self.lock_timeout}", *self._parallelism()]
        if auto_approve:
            args.append("-auto-approve")
        args += [f"-target={t}" for t in targets]
        return self.run(*args)

    def show_text(self, plan_file: str | os.PathLike) -> str:
        """A saved plan as people read it."""
        return self.run("show", "-no-color", str(plan_file), stream=False)

    # -- plumbing ---------------------------------------------------------------------------------------

    def run(self, *args: str, stream: bool | None = None) -> str:
        """`terraform <args>` in the stack dir: its stdout, or TerraformError with the error summary."""
        stream = self.stream if stream is None else stream
        proc = subprocess.Popen(
            [self.binary, *args],
            cwd=self.dir,
            env=self.env,
            text=True,
            errors="replace",
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        interrupted = threading.Event()

        def interrupt() -> None:
            interrupted.set()
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(INTERRUPT_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()

        timer = threading.Timer(self.timeout_s, interrupt) if self.timeout_s else None
        if timer is not None:
            timer.daemon = True
            timer.start()
        err: list[str] = []
        drain = threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True)
        drain.start()  # stderr drained concurrently so neither pipe can fill and stall terraform
        out = []
        for line in proc.stdout:
            out.append(line)
            if stream:
                sys.stderr.write(line)
                sys.stderr.flush()
        rc = proc.wait()
        if timer is not None:
            timer.cancel()
        drain.join()
        stdout, stderr = "".join(out), "".join(err)
        if interrupted.is_set():
            raise TerraformError(
                f"terraform {args[0]} in {self.name} stack interrupted after {self.timeout_s:.0f} s (its time "
                f"limit): stopped with SIGINT, which releases the state lock; the next pass carries on",
                output=stderr + stdout,
            )
        if rc != 0:
            raise TerraformError(
                f"terraform {args[0]} failed in {self.name} stack: "
                f"{error_summary(stderr if 'Error: ' in stderr else stderr + stdout)}",
                output=stderr + stdout,
            )
        return stdout


# ----------------------------------------------------------------------------------------------------
# Ready-to-use stacks for a Config
# ----------------------------------------------------------------------------------------------------


def stack(
    config: Config,
    name: str,
    *,
    cache_dir: str | os.PathLike | None = None,
    init: bool = True,
    stream: bool = False,
    env: Mapping[str, str] | None = None,
    lock_timeout: str = "0s",
    parallelism: int | None = None,
    timeout_s: float | None = None,
) -> Terraform:
    """Stack `name` ("base" | "fleet") of `config`: synthesized through the cache, initialised once."""
    if name not in STACK_NAMES:
        raise ActfleetError(f"--stack {name!r}: must be one of {', '.join(STACK_NAMES)}", exit_code=EXIT_BAD_INPUT)
    terraform_binary()  # fail fast, before a 20 s synth, when terraform is missing
    from actfleet.infra.synth_cache import synth  # a cache hit imports no cdktf; a miss pays for it once

    synthesized = synth(config, cache_dir=cache_dir)
    tf = Terraform(
        synthesized.stack_dir(name),
        env,
        stream=stream,
        lock_timeout=lock_timeout,
        plugin_cache=synthesized.dir.parent / ".plugins",
        parallelism=parallelism if parallelism is not None else config.rollout.terraform_parallelism,
        timeout_s=timeout_s,
    )
    if init:
        tf.init()
    return tf


def fleet_stack(config: Config, **kwargs) -> Terraform:
    """The fleet stack for `config`, ready for plan/apply: what reconcile acts through."""
    return stack(config, FLEET, **kwargs)


# ----------------------------------------------------------------------------------------------------
# Binary, environment, output parsing
# ----------------------------------------------------------------------------------------------------


def terraform_binary() -> str:
    found = shutil.which(os.environ.get("ACTFLEET_TERRAFORM", "terraform"))
    if not found:
        raise PrerequisiteError(
            "terraform not found on PATH: install Terraform >= 1.5 (https://developer.hashicorp.com/terraform/install)"
        )
    return found


def terraform_env(extra: Mapping[str, str] | None = None, *, plugin_cache: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra or {})
    env["CHECKPOINT_DISABLE"] = "1"
    env["TF_IN_AUTOMATION"] = "1"
    env["TF_INPUT"] = "0"
    cli_config = env.get("TF_CLI_CONFIG_FILE")
    if cli_config is not None and not Path(cli_config).is_file():
        del env["TF_CLI_CONFIG_FILE"]  # terraform refuses to run with a config file that is not there
    if plugin_cache is not None and "TF_PLUGIN_CACHE_DIR" not in env:
        plugin_cache.mkdir(parents=True, exist_ok=True)
        env["TF_PLUGIN_CACHE_DIR"] = str(plugin_cache)
    env.setdefault("PYTHONUNBUFFERED", "1")  # provisioner output arrives line by line
    return env


def error_summary(output: str) -> str:
    """Terraform's error diagnostics on one line: 'Error: <summary> (<address>): <detail>', several joined
    with ' | '. Without any (a crash, a usage error): the last non-empty lines."""
    # With -no-color a diagnostic is "Error: <summary>" at column 0, then indented "with"/"on"/source lines,
    # then the detail paragraph; coloured output wraps the same in a box (╷ │ ╵), which is stripped here.
    output = re.sub(r"\x1b\[[0-9;]*m", "", output)  # a few subcommands colour even under TF_IN_AUTOMATION
    lines = [re.sub(r"^[╷╵]", "", re.sub(r"^│ ?", "", raw.rstrip())) for raw in output.splitlines()]
    diagnostics: list[list[str]] = []
    for line in lines:
        if re.match(r"^(Error|Warning): ", line):
            diagnostics.append([line])
        elif diagnostics:
            diagnostics[-1].append(line)
    errors = [_one_diagnostic(d) for d in diagnostics if d[0].startswith("Error: ")]
    if not errors:
        tail = [line.strip() for line in lines if line.strip()]
        errors = [" ".join(tail[-3:]) or "no output"]
    text = " | ".join(dict.fromkeys(errors))
    return text if len(text) <= SUMMARY_LIMIT else text[: SUMMARY_LIMIT - 3] + "..."


def _one_diagnostic(lines: list[str]) -> str:
    head, address, detail = lines[0].strip(), "", []
    for line in lines[1:]:
        if m := re.match(r"^\s+with (.+),$", line):
            address = m[1]
        elif re.match(r"^\s+on .+ line \d+", line) or re.match(r"^\s+\d+:", line) or re.match(r"^\s+[├│]", line):
            continue  # source excerpts: noise on one line
        elif line.strip():
            detail.append(line.strip())
    text = head + (f" ({address})" if address else "")
    return text + (": " + " ".join(detail) if detail else "")


def _summary_from_json(shown: dict, text: str, plan_file: Path) -> Plan:
    add = change = destroy = 0
    replace = []
    for rc in shown.get("resource_changes", []):
        actions = rc["change"]["actions"]
        add += "create" in actions
        destroy += "delete" in actions
        change += actions == ["update"]
        if "create" in actions and "delete" in actions:
            replace.append(rc["address"])
    return Plan(add=add, change=change, destroy=destroy, replace=tuple(replace), text=text, plan_file=plan_file)


def _summary_from_text(text: str) -> Plan:
    m = re.search(r"Plan: (\d+) to add, (\d+) to change, (\d+) to destroy", text)
    return Plan(int(m[1]), int(m[2]), int(m[3]), text=text) if m else Plan(0, 0, 0, text=text)
