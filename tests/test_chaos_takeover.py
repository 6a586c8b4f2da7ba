"""Racing take-overs: of the workers that read one expired lease, exactly one may take the unit over.

The other chaos tests cannot see a take-over that lost its generation match: the done record is still
created once (create-if-absent), so verify passes and the tensors equal the reference's; only two workers
computing one unit at once, one of them with its live lease overwritten, betray it. Here the workers' stores
log every take-over (tests/fakes/lease_audit.py: which stale lease each one replaced) and every take-over
decision is held open for a moment after its read (the race window), while a crowd of workers wakes at
once to the same expired leases: a stale lease taken over twice is the violation.
"""

from __future__ import annotations

import time

import pytest

from actfleet import work_queue as q
from actfleet.store import open_store
from actfleet.worker.verify import verify
from tests.fakes import standin_extractor as sx
from tests.fakes.lease_audit import AUDIT_ENV, RACE_ENV, takeover_violations, takeovers
from tests.test_chaos import standin_worker
from tests.test_chaos_stalls import _no_process_left_behind, started, tail  # noqa: F401  (autouse fixture)

UNITS = 4
# Scan offsets are crc32(worker id) % units: these four make two pairs that scan from the same unit (0, 0, 1, 1),
# so the race for the first expired lease of each scan is certain, not left to chance.
RACERS = ("racer-1", "racer-3", "racer-5", "racer-7")


@pytest.mark.slow
def test_of_the_workers_racing_for_one_expired_lease_exactly_one_takes_it_over(tmp_path):
    data = sx.write_dataset(tmp_path / "data.jsonl", 4 * UNITS)
    store = open_store(str(tmp_path / "bucket"))
    q.prepare(store, "job", input=str(data), fingerprint=sx.fingerprint(data), rows=4 * UNITS, unit_rows=4, options={})
    ghosts = [q.claim(store, "job", u, "ghost", 600.0) for u in range(UNITS)]  # a worker that will die
    audit = tmp_path / "takeovers.jsonl"
    env = {AUDIT_ENV: str(audit), RACE_ENV: "0.5"}  # a take-over decided on a read is written 0.5 s later
    procs = [started(standin_worker(store.url, "job", name, data, 0.05, 1.0, 25, env=env)) for name in RACERS]
    deadline = time.monotonic() + 120  # a safety net, not an assertion
    while time.monotonic() < deadline:  # every racer waits on the ghost's leases
        records = q.read_worker_records(store, "job")
        if all(records.get(n) and records[n].state == "waiting" for n in RACERS):
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the racers never all waited: " + " | ".join(tail(p, 5) for p in procs))
    for lease in ghosts:  # the ghost's last heartbeat: its leases expire in 0.3 s, all at once
        q.renew(store, lease, 0.3)
    for p in procs:
        assert p.p.wait(timeout=120) == 0, tail(p)
    rep = verify(store, "job", clean=True)  # all a verify can see is fine, whichever way the race went
    assert rep.ok and rep.units_done == UNITS, rep.problems
    replaced = {t["replaced"] for t in takeovers(audit)}
    assert {g.nonce for g in ghosts} <= replaced, "every ghost lease was taken over (the audit saw the race)"
    violations = takeover_violations(audit)
    assert not violations, "two workers took one expired lease over:\n" + "\n".join(violations)
