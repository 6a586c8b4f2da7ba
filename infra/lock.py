"""The reconcile lock: one actor at a time, the way Terraform's GCS backend locks its state.

    with ReconcileLock.for_config(cfg).hold():        # or .hold(wait=True)
        ...                                           # observe -> decide -> act

A lock is one small JSON object in a Store (actfleet/store.py: a local directory or gs://bucket/prefix):
- take:    create-if-absent (GCS `if_generation_match=0`, filesystem O_EXCL link);
- renew:   a background thread rewrites it with a generation match every ttl/3, pushing its expiry on,
           so a long terraform apply keeps the lock while a crashed holder's lock expires;
- release: delete with a generation match, so a holder that lost the lock can never delete someone
           else's;
- stale:   a lock whose holder is known dead (same host, pid gone or reused) or whose expiry has passed is
           taken over with a generation-matched replace: of two processes racing for a stale lock, exactly
           one wins, the other sees it held.

The record says who holds it: holder (user@host), host, pid, since, expires, command. A second reconcile
that finds the lock held raises LockHeld with that description (reconcile exits 0 saying so) or, with
wait=True, polls with jittered backoff until it is free.

Terraform's own state lock still guards the state underneath; this lock also covers observing, deciding
and deleting orphans, which Terraform never sees.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import random
import secrets
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

from actfleet.config import Config
from actfleet.errors import ActfleetError
from actfleet.formatting import iso_utc
from actfleet.infra.terraform_layout import gcs_state_root
from actfleet.store import GcsStore, NotFound, PreconditionFailed, Store, join, open_store, parse_gs

LOCK_KEY = "reconcile.lock"
DEFAULT_TTL_S = 300.0
CHECK_MARGIN = 0.25  # check() fails once less than a quarter of the ttl is left on our own record


class LockHeld(ActfleetError):
    """Another live process holds the lock. `.info` says who."""

    exit_code = 0  # a second reconcile finding the first at work is normal, not a failure

    def __init__(self, info: "LockInfo", where: str):
        super().__init__(f"reconcile lock {where} is held by {info.describe()}")
        self.info = info


class LockLost(ActfleetError):
    """The lock was taken over (we were presumed dead) while we held it."""


@dataclass(frozen=True)
class LockInfo:
    holder: str  # user@host
    host: str
    pid: int
    pid_start: str  # the process's start time in clock ticks (Linux), to tell a reused pid from ours
    since: float
    expires: float
    command: str
    nonce: str

    def describe(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        return (
            f"{self.holder} (pid {self.pid}, since {iso_utc(self.since)}, {max(0, now - self.since):.0f} s ago; "
            f"expires {iso_utc(self.expires)}; {self.command})"
        )

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def parse(data: bytes) -> "LockInfo | None":
        try:
            d = json.loads(data)
            return LockInfo(**{k: d[k] for k in LockInfo.__dataclass_fields__})
        except (ValueError, KeyError, TypeError):
            return None  # unreadable: treated as stale (it protects nothing we can identify)


def lock_location(cfg: Config) -> tuple[Store, str]:
    """(the store holding the lock, the lock's key): reconcile.lock, else next to the Terraform state.
    Reconcile keeps its memory between passes in the same store (infra/reconcile.py)."""
    where = cfg.reconcile.lock
    if not where:
        if cfg.state.backend == "gcs":
            where = f"{gcs_state_root(cfg)}/{LOCK_KEY}"
        else:
            where = os.path.join(cfg.state.path, LOCK_KEY)
    if where.startswith("gs://"):
        # gs://bucket/locks/fleet.lock is that object; gs://bucket and gs://bucket/locks/ (a bucket or a folder)
        # mean its reconcile.lock. Taken create-if-absent (if_generation_match=0) like Terraform's GCS state lock.
        bucket, name = parse_gs(where, "reconcile.lock")
        folder, _, key = (name if name and not where.endswith("/") else join(name, LOCK_KEY)).rpartition("/")
        return GcsStore(bucket, folder), key
    root, _, key = where.rstrip("/").rpartition("/")
    if not root:
        root = "."
    return open_store(root if "://" in root or os.path.isabs(root) else os.path.abspath(root)), key


class ReconcileLock:
    def __init__(
        self,
        store: Store,
        key: str = LOCK_KEY,
        *,
        ttl_s: float = DEFAULT_TTL_S,
        clock: Callable[[], float] | None = None,
        command: str | None = None,
    ):
        # Expiry is judged by the store's clock (docs/jobs.md "Guarantees and limits: clocks"): a machine whose
        # clock runs ahead must not take over a live holder's lock.
        self.store, self.key, self.ttl_s, self.clock = store, key, ttl_s, clock or store.now
        self.command = command or " ".join(["actfleet"] + sys.argv[1:])[:200]
        self.where = f"{store.url.rstrip('/')}/{key}"
        self._gen: int | None = None
        self._info: LockInfo | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._mutex = threading.Lock()
        self.lost = False
        self.took_over: LockInfo | None = None  # the stale lock we replaced, if any
        self.holder: LockInfo | None = None  # who held it when try_acquire() answered False

    @staticmethod
    def for_config(cfg: Config, **kw) -> "ReconcileLock":
        """reconcile.lock from the config: a path or gs:// URL of the lock object. Default: next to the
        Terraform state (state.path locally, gs://state.bucket/state.prefix with the GCS backend)."""
        store, key = lock_location(cfg)
        return ReconcileLock(store, key, **kw)

    # -- taking and releasing -------------------------------------------------------------------------

    def _record(self) -> tuple[bytes, LockInfo]:
        now = self.clock()
        host = socket.gethostname()
        info = LockInfo(
            holder=f"{_user()}@{host}",
            host=host,
            pid=os.getpid(),
            pid_start=_pid_start(os.getpid()),
            since=self._info.since if self._info else now,
            expires=now + self.ttl_s,
            command=self.command,
            nonce=secrets.token_hex(8),
        )
        return json.dumps(info.to_json(), sort_keys=True).encode(), info

    def try_acquire(self) -> bool:
        """Take the lock if it is free or stale. False (with self.holder set) if a live process holds it."""
        for _ in range(5):  # the lock may vanish or change between our calls; a few rounds settle it
            data, info = self._record()
            try:
                self._gen = self.store.create(self.key, data)
                self._info = info
                return True
            except PreconditionFailed:
                pass
            try:
                current, gen = self.store.read(self.key)
            except NotFound:
                continue  # released between create and read: try again
            held = LockInfo.parse(current)
            if held is not None and not self._is_stale(held):
                self.holder = held
                return False
            try:
                self._gen = self.store.replace(self.key, data, gen)  # only if still the stale one
                self._info, self.took_over = info, held
                return True
            except (PreconditionFailed, NotFound):
                continue  # someone else took it over or released it first: look again
        raise ActfleetError(f"reconcile lock {self.where}: could not take or read the lock (it keeps changing)")

    def acquire(self, wait: bool = False, timeout_s: float | None = None, poll_s: float = 2.0) -> None:
        deadline = None if timeout_s is None else self.clock() + timeout_s
        delay = min(0.25, poll_s)
        while not self.try_acquire():
            if not wait or (deadline is not None and self.clock() >= deadline):
                raise LockHeld(self.holder, self.where)
            time.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, poll_s)
        self._start_renewing()

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
            self._renewer = None
        with self._mutex:
            if self._gen is None:
                return
            try:
                self.store.delete(self.key, self._gen)  # generation-matched: never someone else's lock
            except NotFound:
                pass  # gone: our delete landed and a retry of it found nothing (a 503 after success)
            except PreconditionFailed:
                self.lost = True  # another holder's record is there: ours was taken over
            self._gen = None
            self._info = None

    @contextlib.contextmanager
    def hold(self, wait: bool = False, timeout_s: float | None = None) -> Iterator["ReconcileLock"]:
        self.acquire(wait=wait, timeout_s=timeout_s)
        try:
            yield self
        finally:
            self.release()

    @property
    def info(self) -> LockInfo | None:
        return self._info

    def check(self) -> None:
        """Raise LockLost unless this process still safely holds the lock (call before acting): a renewal
        found it taken over, or our own record's expiry (minus a margin for clock skew and the act
        itself) has passed because renewals kept failing, so another pass may rightly have taken it."""
        if self.lost:
            raise LockLost(f"reconcile lock {self.where} was taken over while this pass held it; not acting")
        with self._mutex:
            info = self._info
        if info is None:
            raise LockLost(f"reconcile lock {self.where} is not held by this pass; not acting")
        margin = self.ttl_s * CHECK_MARGIN
        if self.clock() > info.expires - margin:
            raise LockLost(
                f"reconcile lock {self.where}: this pass's own record expires at {iso_utc(info.expires)} "
                f"(renewals failed); another pass may hold it now; not acting"
            )

    # -- staleness and renewal ------------------------------------------------------------------------

    def _is_stale(self, held: LockInfo) -> bool:
        if self.clock() > held.expires:
            return True
        if held.host == socket.gethostname():
            return not _alive(held.pid, held.pid_start)
        return False  # another host's holder: trust its expiry

    def _start_renewing(self) -> None:
        self._stop.clear()
        self._renewer = threading.Thread(target=self._renew_loop, name="reconcile-lock-renewer", daemon=True)
        self._renewer.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            with self._mutex:
                if self._gen is None:
                    return
                data, info = self._record()
                try:
                    self._gen, self._info = self.store.replace(self.key, data, self._gen), info
                except (NotFound, PreconditionFailed):
                    self.lost, self._gen = True, None
                    return
                except Exception:  # a transient store error: try again next round, the ttl has slack
                    continue


def _alive(pid: int, pid_start: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, belongs to someone else
    return not pid_start or _pid_start(pid) in ("", pid_start)


def _pid_start(pid: int) -> str:
    """Field 22 of /proc/PID/stat (start time in clock ticks): with the pid it names one process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())
