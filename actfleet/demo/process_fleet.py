"""A fleet of local worker processes, kept at N by the same decide() that reconciles the TPU fleet.

`actfleet local` runs its workers through this driver, so the demo exercises the real controller logic:

    observe   each worker slot's process: running  -> queued resource ACTIVE, node READY
                                          exited   -> node PREEMPTED (killed by a signal) or TERMINATED
                                          no slot  -> absent
    decide    actfleet.infra.decide.decide(desired, observed, now, policy, job_complete=..., managed=slots)
    act       create -> start a process; replace -> reap the dead one, start a new one (a restart);
              remove -> stop it (the job is complete and the fleet scales to zero); delete-orphan -> kill it

The tracked slots play the part of Terraform's state (`managed`): a name the driver started but no longer
wants is removed, exactly as the apply would destroy it. `Chaos` is the spot market: seeded random SIGKILLs.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from actfleet.config import Worker
from actfleet.infra.decide import CREATE, DELETE_ORPHAN, FLEET_LABEL, REMOVE, REPLACE, Action, Observed, Policy, decide

LOCAL_ZONE = "local"


def local_workers(n: int) -> list[Worker]:
    """The desired fleet: local-0 .. local-{n-1}, all in the one zone "local"."""
    return [Worker(name=f"local-{i}", zone=LOCAL_ZONE, index=i) for i in range(n)]


@dataclass
class Slot:
    """One worker name's current process (Terraform would call it the resource instance)."""

    worker: Worker
    proc: subprocess.Popen
    since: float  # when it entered its current state (started, or seen exiting)
    incarnation: int  # 1 for the first process under this name, +1 per replacement
    log_path: Path | None = None
    chaos_killed: bool = False  # the driver itself SIGKILLed it (a simulated preemption)
    exit_seen: bool = False


@dataclass
class Event:
    """Something the driver did, for the live view and the summary."""

    at: float
    worker: str
    kind: str  # start | restart | stop | chaos-kill | exit
    detail: str = ""


Spawn = Callable[[Worker, int, "Path | None"], subprocess.Popen]


class WorkerStopped(Exception):
    """A worker exited with one of the fleet's `stop_on` codes: no restart can help (a full disk), so the pass
    that sees it decides and starts nothing; whoever drives the fleet stops the others."""

    def __init__(self, slot: "Slot"):
        super().__init__(f"worker {slot.worker.name} exited with code {slot.proc.returncode}")
        self.slot = slot


@dataclass
class ProcessFleet:
    """Worker processes named by `desired`, started by `spawn(worker, incarnation, log_path)`.

    Call `reconcile(job_complete)` periodically; it returns the acting decisions it carried out."""

    desired: Sequence[Worker]
    spawn: Spawn
    policy: Policy = field(default_factory=lambda: Policy(fleet_id="local", scale_to_zero=True))
    log_dir: Path | None = None
    stop_grace_s: float = 10.0  # SIGTERM -> SIGKILL when stopping a worker
    clock: Callable[[], float] = time.time
    slots: dict[str, Slot] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    restarts: int = 0
    restarts_of: dict[str, int] = field(default_factory=dict)  # per worker name, kept after it stops
    failures: int = 0  # exits the driver did not cause (non-zero code, or a signal it did not send)
    last_failure: "Slot | None" = None  # the most recent such exit (its code and log say why)
    # Exit codes that end the fleet instead of a restart (`actfleet local`: 74, a full disk): reconcile raises
    # WorkerStopped before deciding, so that worker is not started again.
    stop_on: frozenset[int] = frozenset()

    # -- observe -------------------------------------------------------------------------------------

    def observe(self) -> dict[str, Observed]:
        now = self.clock()
        labels = {FLEET_LABEL: self.policy.fleet_id}
        out = {}
        for name, s in self.slots.items():
            code = s.proc.poll()
            if code is None:
                node = "READY"
            else:
                if not s.exit_seen:
                    s.exit_seen, s.since = True, now
                    self._note_exit(s, code)
                node = "PREEMPTED" if code < 0 else "TERMINATED"
            out[name] = Observed(name, s.worker.zone, "ACTIVE", node, labels, s.since)
        return out

    def _note_exit(self, s: Slot, code: int) -> None:
        if code < 0:
            how = (
                f"killed by {signal.Signals(-code).name}"
                if -code in signal.Signals._value2member_map_
                else f"killed by signal {-code}"
            )
        else:
            how = f"exited with code {code}"
        if not (s.chaos_killed or code == 0):
            self.failures += 1
            self.last_failure = s
        self.events.append(Event(self.clock(), s.worker.name, "exit", how))
        if s.log_path is not None:
            _log_line(
                s.log_path,
                f"--- {s.worker.name} #{s.incarnation} (pid {s.proc.pid}) {how}"
                + (" by chaos" if s.chaos_killed else ""),
            )

    # -- decide + act --------------------------------------------------------------------------------

    def reconcile(self, job_complete: "bool | Callable[[], bool]" = False) -> list[Action]:
        """One pass: observe -> decide -> act. `job_complete` may be a function: it is asked after observing,
        so a worker that exited because the job is done is removed, not mistaken for a preemption."""
        observed = self.observe()
        for s in self.slots.values():
            if s.exit_seen and s.proc.returncode in self.stop_on:
                raise WorkerStopped(s)
        complete = job_complete() if callable(job_complete) else job_complete
        actions = decide(
            self.desired, observed, self.clock(), self.policy, job_complete=complete, managed=self.slots.keys()
        )
        done = []
        for a in actions:
            if a.kind == CREATE:
                self._start(self._worker(a.worker), incarnation=1)
            elif a.kind == REPLACE:
                old = self.slots.pop(a.worker)
                self._terminate(old)  # already dead (that is why it is replaced); reaps it
                self.restarts += 1
                self.restarts_of[a.worker] = self.restarts_of.get(a.worker, 0) + 1
                self._start(old.worker, incarnation=old.incarnation + 1, why=a.reason)
            elif a.kind in (REMOVE, DELETE_ORPHAN):
                s = self.slots.pop(a.worker, None)
                if s is not None:
                    self._terminate(s)
                    self.events.append(Event(self.clock(), a.worker, "stop", a.reason))
                    if s.log_path is not None:
                        _log_line(s.log_path, f"--- {a.worker} #{s.incarnation} stopped: {a.reason}")
            else:
                continue
            done.append(a)
        return done

    def _worker(self, name: str) -> Worker:
        return next(w for w in self.desired if w.name == name)

    def _start(self, worker: Worker, incarnation: int, why: str = "") -> None:
        log_path = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            log_path = self.log_dir / f"{worker.name}.log"
            _log_line(log_path, f"--- {worker.name} #{incarnation} starting" + (f" ({why})" if why else ""))
        proc = self.spawn(worker, incarnation, log_path)
        self.slots[worker.name] = Slot(worker, proc, self.clock(), incarnation, log_path)
        kind = "start" if incarnation == 1 else "restart"
        self.events.append(Event(self.clock(), worker.name, kind, why or f"pid {proc.pid}"))

    # -- chaos and shutdown --------------------------------------------------------------------------

    def running(self) -> list[str]:
        return [n for n, s in self.slots.items() if s.proc.poll() is None]

    def kill(self, name: str) -> bool:
        """SIGKILL one worker, as a spot preemption without notice would. False if it was not running."""
        s = self.slots.get(name)
        if s is None or s.proc.poll() is not None:
            return False
        s.chaos_killed = True
        s.proc.kill()
        self.events.append(Event(self.clock(), name, "chaos-kill", f"pid {s.proc.pid}"))
        return True

    def stop_all(self) -> None:
        """SIGTERM every worker at once (they drain: stop claiming, release or finish the current unit),
        then SIGKILL whatever is still running after stop_grace_s."""
        slots = list(self.slots.values())
        for s in slots:
            if s.proc.poll() is None:
                s.proc.terminate()
        deadline = time.monotonic() + self.stop_grace_s
        for s in slots:
            try:
                s.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                s.proc.kill()
                s.proc.wait()
        for s in slots:
            self.events.append(Event(self.clock(), s.worker.name, "stop", "fleet stopped"))
            if s.log_path is not None:
                _log_line(s.log_path, f"--- {s.worker.name} #{s.incarnation} stopped: the fleet was stopped")
        self.slots.clear()

    def _terminate(self, s: Slot) -> None:
        if s.proc.poll() is None:
            s.proc.terminate()
            try:
                s.proc.wait(timeout=self.stop_grace_s)
            except subprocess.TimeoutExpired:
                s.proc.kill()
        s.proc.wait()


@dataclass
class Chaos:
    """Seeded random preemptions: each running worker is killed with probability `rate` per second.

    The sequence of draws depends only on the seed and the calls made, so two runs with the same seed make
    the same choices given the same fleet (process timing still varies, as it does on real machines)."""

    rate: float
    seed: int = 0
    rng: random.Random = field(init=False)

    def __post_init__(self):
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"chaos rate {self.rate}: must be a probability per worker per second, 0 to 1")
        self.rng = random.Random(self.seed)

    def victims(self, running: Sequence[str], dt: float) -> list[str]:
        """Which of `running` to kill after `dt` seconds have passed since the last call."""
        if self.rate <= 0.0 or dt <= 0:
            return []
        p = 1.0 - (1.0 - self.rate) ** dt
        return [name for name in sorted(running) if self.rng.random() < p]


def _log_line(path: Path, text: str) -> None:
    """The driver's own lines in a worker's log, so the log tells each incarnation's story."""
    with open(path, "a") as f:
        f.write(f"\n{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")


def popen_logged(
    argv: list[str], log_path: Path | None, env: dict | None = None, cwd: str | Path | None = None
) -> subprocess.Popen:
    """Start a worker in its own session (so a terminal's Ctrl-C reaches only the driver, which then stops
    the workers cleanly), appending its stdout and stderr to log_path."""
    out = open(log_path, "ab") if log_path is not None else subprocess.DEVNULL
    try:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env if env is not None else dict(os.environ),
            cwd=cwd,
            start_new_session=True,
        )
    finally:
        if log_path is not None:
            out.close()
