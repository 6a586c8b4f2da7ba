"""One worker over the hosts of a multi-host TPU slice (docs/jobs.md, "Multi-host slices").

Every host of a slice runs `actfleet work`; they form one JAX program through `jax.distributed` and act as
ONE worker of the queue, named after the slice's node:

- process 0, the *leader*, runs the ordinary work loop (worker/work_loop.py): it alone claims, holds and
  renews the unit's lease, writes shards, commits and writes the worker record;
- the other processes, *followers*, hold no lease and write nothing: they read the same unit's rows from
  their own pinned copy of the dataset and run the same engine calls, because every batch is one program
  across all the slice's devices (collectives need every host).

The leader tells the followers what to do through the distributed runtime's key-value store (messages
numbered 0, 1, 2, ...): "start" or "done" (the job was already complete); per device stream (units back to
back, worker/work_loop.py) "stream", then one "go" before each step of the stream's batch iterator, and
inside the step where the stream takes its next unit, "unit" (start, stop) or "end" (no more units); "abort"
when the work loop stops the stream early (drain deadline, every unit abandoned); and finally "stop".
Per-step permission keeps the hosts' device programs matched exactly: a follower never dispatches a batch
the leader will not, and takes each unit at the same step.

Failures. A dead or hung host stops the collectives. Depending on how it went, the others see an error
(gloo: "Connection closed by peer") or block in them. An engine error on a slice ends the process at once
(exit 75: abandoning the unit and claiming the next would fail the same way, forever); jax.distributed's
heartbeats end every process once a host has missed them for `heartbeat_seconds`; and the leader's watchdog
ends it (exit 75) when one engine step has made no progress for `stall_seconds` (a host that hangs but still
heartbeats), its lease keeper renewing only while no step is stalled. In every case the lease is neither
released nor renewed: it expires and any worker takes the unit over. The dead attempt never committed, and
its shards carry its own attempt's names, so nothing is mixed.

On a Cloud TPU VM the role comes from the instance metadata (`agent-worker-number`, `worker-network-endpoints`,
as jax's own TPU cluster detection reads them); elsewhere from `--coordinator/--num-processes/--process-id`
(or ACTFLEET_COORDINATOR, ACTFLEET_NUM_PROCESSES, ACTFLEET_PROCESS_ID).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from actfleet.errors import InputError
from actfleet.retry import retry

log = logging.getLogger("actfleet.multihost")

METADATA_URL = "http://metadata.google.internal/computeMetadata/v1/instance/attributes"
COORDINATOR_PORT = 8482  # jax's own choice for Cloud TPU slices (jax._src.clusters.cloud_tpu_cluster)
EXIT_STALLED = 75  # EX_TEMPFAIL: systemd restarts the worker; the lease expires meanwhile
_HOST_PORT = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):([0-9]{1,5})$")


@dataclass(frozen=True)
class SliceRole:
    """This process's place in a multi-host slice."""

    coordinator: str  # host:port of process 0's coordination service
    num_processes: int
    process_id: int
    source: str  # "flags" or "tpu-metadata"

    @property
    def leader(self) -> bool:
        return self.process_id == 0


# ----------------------------------------------------------------------------------------------------
# Which role: flags, else the TPU VM's metadata
# ----------------------------------------------------------------------------------------------------


def detect(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    metadata: "Callable[[str], str | None] | None" = None,
) -> SliceRole | None:
    """The slice role, or None for a single-host worker. Explicit values win; without any, a Cloud TPU VM's
    metadata decides (`metadata(key)` -> value or None; default: the metadata server, only on a GCE VM)."""
    if num_processes == 1:
        return None
    given = {"--coordinator": coordinator, "--num-processes": num_processes, "--process-id": process_id}
    if any(v is not None for v in given.values()):
        missing = [k for k, v in given.items() if v is None]
        if missing:
            raise InputError(
                f"multi-host: {', '.join(missing)} missing (give --coordinator, --num-processes and "
                f"--process-id together, or none on a Cloud TPU VM)"
            )
        return _checked(coordinator, num_processes, process_id, "flags")
    if metadata is None:
        if not _on_gce():
            return None
        metadata = read_metadata
    return from_tpu_metadata(metadata)


def _checked(coordinator: str, num_processes: int, process_id: int, source: str) -> SliceRole | None:
    if not _HOST_PORT.match(coordinator):
        raise InputError(f"multi-host: coordinator {coordinator!r}: expected HOST:PORT")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise InputError(
            f"multi-host: process id {process_id} of {num_processes} processes: need 0 <= process id < processes"
        )
    if num_processes == 1:
        return None
    return SliceRole(coordinator, num_processes, process_id, source)


def from_tpu_metadata(metadata: "Callable[[str], str | None]") -> SliceRole | None:
    """A Cloud TPU VM's role: `agent-worker-number` is this host's index, `worker-network-endpoints` lists
    every host of the slice in that order (hostnames, or `name:id:ip` triples in the older format); host 0
    runs the coordinator. None on a single-host TPU VM or a VM that is not a TPU."""
    number, endpoints = metadata("agent-worker-number"), metadata("worker-network-endpoints")
    if number is None or endpoints is None:
        return None
    hosts = []
    for entry in endpoints.strip().split(","):
        parts = entry.strip().split(":")
        if len(parts) not in (1, 3) or not parts[-1]:
            raise InputError(
                f"multi-host: TPU metadata worker-network-endpoints entry {entry!r}: expected a host name or name:id:ip"
            )
        hosts.append(parts[-1])
    try:
        process_id = int(number.strip())
    except ValueError:
        raise InputError(f"multi-host: TPU metadata agent-worker-number = {number!r}: not an integer") from None
    return _checked(f"{hosts[0]}:{COORDINATOR_PORT}", len(hosts), process_id, "tpu-metadata")


def _on_gce() -> bool:
    if os.environ.get("ACTFLEET_METADATA_URL"):
        return True
    try:
        # As google-auth detects a GCE VM (a TPU VM is one): "Google Compute Engine"
        return Path("/sys/class/dmi/id/product_name").read_text().startswith("Google")
    except OSError:
        return False


def read_metadata(key: str, *, attempts: int = 5) -> str | None:
    """One instance metadata attribute (None if the VM has none by that name), as the bootstrap reads them."""
    base = os.environ.get("ACTFLEET_METADATA_URL") or METADATA_URL
    req = urllib.request.Request(f"{base.rstrip('/')}/{key}", headers={"Metadata-Flavor": "Google"})

    def get() -> str | None:
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.read().decode()
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            raise

    try:  # an HTTP error, or the connection refused or reset while the metadata server starts: again
        return retry(get, attempts=attempts, base=0.2, cap=2.0, jitter=False, retryable=(OSError,))
    except OSError as err:
        raise InputError(f"multi-host: cannot read instance metadata {key!r} from {base} ({err})") from None


# ----------------------------------------------------------------------------------------------------
# Joining the slice
# ----------------------------------------------------------------------------------------------------


def initialize(role: SliceRole, *, heartbeat_seconds: int = 100, init_timeout_seconds: int = 300) -> None:
    """jax.distributed for this role; before any JAX computation. The CPU backend (tests) uses gloo."""
    import jax

    if "cpu" in (os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms or ""):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        role.coordinator,
        role.num_processes,
        role.process_id,
        initialization_timeout=init_timeout_seconds,
        heartbeat_timeout_seconds=heartbeat_seconds,
    )
    log.info(
        "joined slice: process %d of %d (coordinator %s, from %s); %d local of %d devices",
        role.process_id,
        role.num_processes,
        role.coordinator,
        role.source,
        jax.local_device_count(),
        jax.device_count(),
    )


def distributed_kv_client():
    """The key-value store client that jax.distributed.initialize made. The public jax.distributed (jax 0.10:
    initialize, is_initialized, shutdown) does not expose it, and jax.experimental.multihost_utils reads it
    from the same private module; its broadcasts are device collectives, which a follower waiting for the
    next unit (as long as the leader waits for a lease) must not sit in. So this is the one private import."""
    from jax._src.distributed import global_state

    if global_state.client is None:
        raise RuntimeError("multi-host: jax.distributed is not initialized (no key-value store client)")
    return global_state.client


class Channel:
    """Leader -> followers messages, numbered, through the distributed runtime's key-value store (no device
    collective, so a follower may wait for the next unit as long as the leader waits for a lease)."""

    PREFIX = "actfleet/slice/"
    KEEP = 4096  # messages kept: followers trail the leader by a few (every step is a collective)

    def __init__(self, client=None):
        self.client, self.seq = client if client is not None else distributed_kv_client(), 0

    def send(self, kind: str, **info: Any) -> None:
        self.client.key_value_set(f"{self.PREFIX}{self.seq}", json.dumps({"kind": kind, **info}))
        if self.seq >= self.KEEP:
            self.client.key_value_delete(f"{self.PREFIX}{self.seq - self.KEEP}")
        self.seq += 1

    def recv(self, poll_ms: int = 10_000) -> dict:
        key = f"{self.PREFIX}{self.seq}"
        while True:
            try:
                value = self.client.blocking_key_value_get(key, poll_ms)
                break
            except Exception as e:  # DEADLINE_EXCEEDED: keep waiting (a dead leader ends us by heartbeat)
                if "DEADLINE_EXCEEDED" not in str(e) and "timed out" not in str(e).lower():
                    raise
        self.seq += 1
        return json.loads(value)


# ----------------------------------------------------------------------------------------------------
# Progress: the leader renews only while the slice moves
# ----------------------------------------------------------------------------------------------------


class Progress:
    """Tracks the engine steps (collectives) the leader is inside. `stalled()` once one has run longer
    than stall_seconds; time spent elsewhere (uploading, waiting for a lease) never counts."""

    def __init__(self, stall_seconds: float, clock: Callable[[], float] = time.monotonic):
        self.stall_seconds, self.clock = stall_seconds, clock
        self._since: float | None = None
        self.lock = threading.Lock()

    @contextmanager
    def step(self):
        with self.lock:
            self._since = self.clock()
        try:
            yield
        finally:
            with self.lock:
                self._since = None

    def stalled_for(self) -> float:
        with self.lock:
            return 0.0 if self._since is None else self.clock() - self._since

    def healthy(self) -> bool:
        return self.stalled_for() < self.stall_seconds


def _exit(event: str, info: dict, message: str) -> None:
    """End this process now, without Python's exit handlers: jax.distributed's shutdown would wait for the
    hosts that are gone, and a broken collective leaves the device runtime unusable anyway. The lease is
    neither released nor renewed: it expires, and any worker takes the unit over."""
    print(f"{event} {json.dumps(info)}", file=sys.stderr, flush=True)
    log.error("%s; exiting %d so the lease expires and the worker restarts", message, EXIT_STALLED)
    logging.shutdown()
    os._exit(EXIT_STALLED)


def exit_broken(unit: int, step: int, error: BaseException) -> None:
    """An engine step failed on a slice: in practice a collective whose peer is gone (gloo: "Connection closed
    by peer"). Abandoning the unit and claiming the next would loop, each step failing the same way."""
    _exit(
        "slice-broken",
        {"unit": unit, "step": step, "error": f"{type(error).__name__}: {error}"[:500]},
        f"slice broken: unit {unit} step {step}: {type(error).__name__}: {error}",
    )


def start_watchdog(
    progress: Progress, *, interval: float = 1.0, on_stall: Callable[[float], None] | None = None
) -> threading.Thread:
    """Ends the process (EXIT_STALLED) once an engine step has stalled: a host died or hung, and this process
    would otherwise wait in a collective forever. Its lease is no longer renewed and expires."""

    def exit_stalled(secs: float) -> None:
        _exit(
            "stalled",
            {"seconds": round(secs, 1)},
            f"slice stalled: an engine step made no progress for {secs:.0f} s (a host died or hung)",
        )

    act = on_stall or exit_stalled

    def run() -> None:
        while True:
            time.sleep(interval)
            if not progress.healthy():
                act(progress.stalled_for())
                return

    t = threading.Thread(target=run, name="slice-watchdog", daemon=True)
    t.start()
    return t


# ----------------------------------------------------------------------------------------------------
# Leader and followers
# ----------------------------------------------------------------------------------------------------


class LeaderExtractor:
    """The leader's UnitExtractor: the real one, telling the followers each unit and each engine step."""

    def __init__(
        self,
        inner,
        channel: Channel,
        progress: Progress,
        unit_rows: int,
        on_broken: Callable[[int, int, BaseException], None] = exit_broken,
    ):
        self.inner, self.channel, self.progress, self.unit_rows = inner, channel, progress, unit_rows
        self.on_broken = on_broken

    def fingerprint(self) -> str:
        return self.inner.fingerprint()

    def model_sha256(self) -> str:
        return self.inner.model_sha256()

    def shard_writer(self, unit: int):
        return self.inner.shard_writer(unit)

    def prepare(self, start: int, stop: int):
        return self.inner.prepare(start, stop)

    def run_stream(self, units: Iterable[Any]) -> Iterator[tuple[int, Any]]:
        current = [-1]  # the unit the stream last took (for the broken-slice report)

        def announced():
            # The stream takes each unit inside one of its steps; the followers' streams take theirs at the
            # same step, reading this message.
            for u in units:
                current[0] = u.start // self.unit_rows
                self.channel.send("unit", unit=current[0], start=u.start, stop=u.stop)
                yield u
            self.channel.send("end")

        return self._steps(current, self.inner.run_stream(announced()))

    def _steps(self, current: list[int], batches: Iterator[Any]) -> Iterator[Any]:
        self.channel.send("stream")
        i = 0
        while True:
            self.channel.send("go", step=i)
            i += 1
            with self.progress.step():
                try:
                    batch = next(batches)
                except StopIteration:
                    return
                except Exception as e:
                    self.on_broken(current[0], i - 1, e)  # ends the process (the followers end on theirs)
                    raise
            try:
                yield batch
            except GeneratorExit:  # the work loop stopped early: the followers must stop at this step too
                self.channel.send("abort", step=i)
                raise


@dataclass
class FollowResult:
    units: int = 0
    steps: int = 0
    aborted: int = 0
    job_complete: bool = False


def follow(
    channel: Channel,
    extractor,
    on_event: Callable[[str, dict], None] = lambda k, i: None,
    on_broken: Callable[[int, int, BaseException], None] = exit_broken,
) -> FollowResult:
    """A follower's loop: run exactly the engine steps the leader runs, until "stop"."""
    result = FollowResult()
    while True:
        msg = channel.recv()
        kind = msg["kind"]
        if kind == "stop":
            result.job_complete = bool(msg.get("job_complete"))
            return result
        if kind != "stream":
            raise RuntimeError(f"slice protocol: expected a stream or stop, got {msg}")
        current = [-1]

        def units():
            # Read inside the stream's step, where the leader's stream took the unit.
            while (msg := channel.recv())["kind"] == "unit":
                current[0] = msg["unit"]
                result.units += 1
                on_event("following", {"unit": msg["unit"]})
                yield extractor.prepare(msg["start"], msg["stop"])
            if msg["kind"] != "end":
                raise RuntimeError(f"slice protocol: expected a unit or end, got {msg}")

        batches = extractor.run_stream(units())
        step = 0
        while True:
            msg = channel.recv()
            if msg["kind"] not in ("go", "abort") or msg.get("step") != step:
                raise RuntimeError(f"slice protocol: at step {step}, got {msg}")
            if msg["kind"] == "abort":
                result.aborted += 1
                on_event("aborted", {"unit": current[0], "step": step})
                batches.close()
                break
            step += 1
            try:
                next(batches)  # fetched whole, like the leader's; the leader alone stores it
            except StopIteration:
                break
            except Exception as e:  # a collective whose peer is gone, most likely: the slice is over
                on_broken(current[0], step - 1, e)
                raise
            result.steps += 1
            on_event("computed", {"unit": current[0], "step": step - 1})
