"""An invariant checker for lease take-overs, run inside worker processes (tests/fakes/standin_extractor.py).

Of the workers that read one expired lease, exactly one may take it over: the take-over replaces the stale
record at the generation read (ifGenerationMatch), so the others' writes fail. A take-over that wrote
unconditionally (or at a generation read again after the decision) would let two workers both believe they
hold the unit: nothing a verify sees afterwards (the done record is still created once), but two attempts
compute it, and one of them has its live lease overwritten.

AuditedStore wraps a worker's store. It remembers, per thread, the last lease record read at each key, and
appends one JSON line per lease write that starts a new attempt on top of another (a take-over: a nonce
other than the one read) to the file named by $ACTFLEET_LEASE_AUDIT: unit, attempt, nonce, worker and the
nonce it replaced. `takeover_violations` then finds every stale nonce taken over twice: impossible with
generation-matched take-overs, whatever the timing. A line is written only after the write returned, so a
worker killed in between loses an entry, never invents one.

$ACTFLEET_TAKEOVER_RACE_S widens the race: the reader of an expired lease sleeps that long before returning
it, as a worker descheduled between its read and its write would (the window two racers must both be in).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import defaultdict
from pathlib import Path

from actfleet import work_queue as q

AUDIT_ENV, RACE_ENV = "ACTFLEET_LEASE_AUDIT", "ACTFLEET_TAKEOVER_RACE_S"


def _lease_fields(data: bytes) -> dict | None:
    try:
        d = json.loads(data)
        return {"nonce": str(d["nonce"]), "attempt": int(d["attempt"]), "expires": float(d["expires"])}
    except (ValueError, KeyError, TypeError):
        return None


class AuditedStore:
    """A store that logs take-overs of leases (see the module docstring); everything else passes through."""

    def __init__(self, store, log_path: str, race_s: float = 0.0):
        self._store, self._log, self._race_s = store, log_path, race_s
        self._read = threading.local()

    def __getattr__(self, name):
        return getattr(self._store, name)

    def _last_read(self) -> dict:
        if not hasattr(self._read, "leases"):
            self._read.leases = {}
        return self._read.leases

    def _saw(self, key: str, data: bytes) -> None:
        if f"/{q.LEASES}/" in f"/{key}":
            rec = _lease_fields(data)
            self._last_read()[key] = rec
            if rec is not None and rec["expires"] <= time.time() and self._race_s:
                time.sleep(self._race_s)  # descheduled between reading the stale lease and acting on it

    def read(self, key: str):
        data, gen = self._store.read(key)
        self._saw(key, data)
        return data, gen

    def read_stamped(self, key: str):
        # how read_lease reads (the store's write time judges expiry): audited like read, or no take-over is seen
        data, gen, written = self._store.read_stamped(key)
        self._saw(key, data)
        return data, gen, written

    def _written(self, key: str, data: bytes, gen: int) -> int:
        if f"/{q.LEASES}/" not in f"/{key}":
            return gen
        new, old = _lease_fields(data), self._last_read().get(key)
        if new is not None and new["attempt"] > 1 and old is not None and old["nonce"] != new["nonce"]:
            d = json.loads(data)
            line = {
                "job": d.get("job"),
                "unit": d.get("unit"),
                "worker": d.get("worker"),
                "attempt": new["attempt"],
                "nonce": new["nonce"],
                "replaced": old["nonce"],
                "replaced_attempt": old["attempt"],
                "generation": gen,
            }
            fd = os.open(self._log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, (json.dumps(line) + "\n").encode())  # one write: lines of processes never interleave
            finally:
                os.close(fd)
        return gen

    def create(self, key: str, data: bytes) -> int:
        return self._written(key, data, self._store.create(key, data))

    def replace(self, key: str, data: bytes, generation: int) -> int:
        return self._written(key, data, self._store.replace(key, data, generation))

    def put(self, key: str, data) -> int:
        return (
            self._written(key, data, self._store.put(key, data))
            if isinstance(data, bytes)
            else self._store.put(key, data)
        )


def audited(store):
    """`store`, audited when $ACTFLEET_LEASE_AUDIT names a log file (else unchanged)."""
    path = os.environ.get(AUDIT_ENV)
    return AuditedStore(store, path, float(os.environ.get(RACE_ENV) or 0)) if path else store


def takeovers(log_path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(log_path).read_text().splitlines()] if Path(log_path).exists() else []


def takeover_violations(log_path: Path) -> list[str]:
    """One line per stale lease taken over more than once, or by an attempt number other than its own + 1."""
    by_stale: dict[tuple, list[dict]] = defaultdict(list)
    out = []
    for t in takeovers(log_path):
        by_stale[(t["job"], t["unit"], t["replaced"])].append(t)
        if t["attempt"] != t["replaced_attempt"] + 1:
            out.append(
                f"{t['job']} unit {t['unit']}: attempt {t['attempt']} by {t['worker']} replaced attempt {t['replaced_attempt']}"
            )
    for (job, unit, stale), ts in sorted(by_stale.items(), key=lambda kv: str(kv[0])):
        if len(ts) > 1:
            who = ", ".join(f"{t['worker']} (attempt {t['attempt']}, nonce {t['nonce'][:8]})" for t in ts)
            out.append(f"{job} unit {unit}: the lease {stale[:8]} was taken over {len(ts)} times: by {who}")
    return out
