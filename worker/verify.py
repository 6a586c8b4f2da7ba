"""`actfleet verify`: prove a job's output, or list exactly what is wrong with it.

Checks, from the job's records and the shards themselves:
1. every unit 0..N-1 has its unit record and exactly one done record, covering exactly its row range and
   computed from the dataset bytes and model files job.json pins (the digests each done record carries);
2. every shard a done record lists exists with the listed size and sha256, belongs to that unit, and no
   shard is listed twice;
3. every input row is accounted for exactly once: the rows stored in a unit's shards (sample ids, or with
   context windows the `source_rows`) plus the ids it lists as skipped (with a reason) are exactly the
   unit's rows, disjoint; no (sample, position) is stored
   twice; the token counts in the done record match the shards;
4. the job itself: units = ceil(rows / unit_rows) and, summed over units, stored + skipped = rows (job.json
   is checked against its own arithmetic, not trusted);
5. garbage: the shards of done units that their done record does not list (left by attempts that lost
   their lease or died), and leases left on done units. `--clean` deletes them, safely while workers run
   and whatever the clocks say: a done record never changes once created, so no attempt can commit another
   shard of its unit. Shards of units not done yet, and every shard of a unit whose done record is
   unreadable, are kept, each listed with its reason; deletes are at the generation judged.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np

from actfleet import work_queue as q
from actfleet.errors import ActfleetError
from actfleet.store import NotFound, PreconditionFailed, Store
from actfleet.worker.shards import ShardFormatError, shard_rows


@dataclass
class Problem:
    kind: str  # missing-unit | not-done | bad-record | bad-job | mixed-input | mixed-model | missing-shard |
    #            corrupt-shard | rows | garbage
    message: str
    unit: int | None = None
    key: str | None = None


@dataclass
class VerifyReport:
    job: str
    store: str
    units_total: int = 0
    units_done: int = 0
    rows: int = 0
    rows_stored: int = 0
    rows_skipped: dict[str, int] = field(default_factory=dict)
    tokens: int = 0
    shards: int = 0
    bytes: int = 0
    problems: list[Problem] = field(default_factory=list)
    garbage: list[str] = field(default_factory=list)
    cleaned: list[str] = field(default_factory=list)
    kept: list[dict] = field(default_factory=list)  # garbage candidates --clean did not delete: key, reason
    in_progress: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        return d


def verify(store: Store, job: str, *, clean: bool = False, now: float | None = None, parallel: int = 8) -> VerifyReport:
    now = store.now() if now is None else now  # leases are judged by the store's clock (docs/jobs.md)
    spec = q.read_job(store, job)
    rep = VerifyReport(job=job, store=store.url, units_total=spec.units, rows=spec.rows)

    def problem(kind: str, message: str, unit: int | None = None, key: str | None = None) -> None:
        rep.problems.append(Problem(kind, message, unit, key))

    # 0. job.json against its own arithmetic (an edited `units` would hide units from every check below)
    if spec.unit_rows < 1 or spec.rows < 0 or spec.units != -(-spec.rows // spec.unit_rows):
        problem(
            "bad-job",
            f"job.json says units={spec.units} for rows={spec.rows} and unit_rows={spec.unit_rows}; "
            f"that is {-(-spec.rows // max(1, spec.unit_rows))} units",
        )

    # 1. unit records and done records
    unit_keys = set(store.list(q.units_prefix(job)))
    for unit in range(spec.units):
        if q.unit_key(job, unit) not in unit_keys:
            problem("missing-unit", f"unit {unit}: unit record {q.unit_key(job, unit)} is missing", unit)
    done_keys = list(store.list(q.done_prefix(job)))
    records: dict[int, q.DoneRecord] = {}
    for key in done_keys:
        unit = q.unit_of(key)
        if unit is None or not 0 <= unit < spec.units:
            problem("bad-record", f"{key}: done record for a unit the job does not have", key=key)
            continue
        try:
            records[unit] = q.DoneRecord.from_json(store.read(key)[0], key)
        except (ActfleetError, NotFound) as e:
            problem("bad-record", f"{key}: {e}", unit, key)
    bad_units = {p.unit for p in rep.problems if p.kind == "bad-record" and p.unit is not None}
    live = {}
    for key in store.list(q.leases_prefix(job)):
        unit = q.unit_of(key)
        lease = q.read_lease(store, job, unit) if unit is not None else None
        if lease is not None:
            live[unit] = lease
    for unit in range(spec.units):
        if unit not in records:
            problem(
                "not-done",
                f"unit {unit} (rows {spec.unit_range(unit)[0]}-{spec.unit_range(unit)[1] - 1}) has no done record",
                unit,
            )
            if unit in live and live[unit].expires > now:
                rep.in_progress.append(unit)

    # 2 + 3. shards, checksums, row accounting (shards are read in parallel: the store may be remote)
    listed: dict[str, int] = {}
    for unit, rec in sorted(records.items()):
        start, stop = spec.unit_range(unit)
        if (rec.start, rec.stop) != (start, stop):
            problem(
                "bad-record",
                f"unit {unit}: done record covers rows {rec.start}-{rec.stop - 1}, the unit is {start}-{stop - 1}",
                unit,
            )
        if rec.input_sha256 != spec.fingerprint:
            problem(
                "mixed-input",
                f"unit {unit}: computed from dataset bytes sha256 {rec.input_sha256[:12] or '?'}..., "
                f"the job pinned {spec.fingerprint[:12]}...",
                unit,
            )
        if rec.model_sha256 != spec.model_sha256:
            problem(
                "mixed-model",
                f"unit {unit}: computed with model files sha256 {rec.model_sha256[:12] or '?'}..., "
                f"the job pinned {spec.model_sha256[:12] or 'none'}...",
                unit,
            )
        for s in rec.shards:
            if q.shard_unit_part(s.name) is None or q.shard_unit_part(s.name)[0] != unit:
                problem("bad-record", f"unit {unit}: lists shard {s.name} of another unit", unit)
            if s.name in listed:
                problem("bad-record", f"shard {s.name} is listed by units {listed[s.name]} and {unit}", unit)
            listed[s.name] = unit

    def check_unit(unit: int) -> tuple[list[Problem], int, set[int]]:
        rec = records[unit]
        out: list[Problem] = []
        stored: set[int] = set()
        tokens = 0
        pairs: list[np.ndarray] = []
        for s in rec.shards:
            key = q.in_job(job, s.name)
            try:
                blob, _ = store.read(key)
            except NotFound:
                out.append(Problem("missing-shard", f"unit {unit}: shard {key} is missing", unit, key))
                continue
            digest = hashlib.sha256(blob).hexdigest()
            if len(blob) != s.bytes or digest != s.sha256:
                out.append(
                    Problem(
                        "corrupt-shard",
                        f"unit {unit}: shard {key} has {len(blob)} bytes sha256 "
                        f"{digest[:12]}..., the done record says {s.bytes} bytes "
                        f"{s.sha256[:12]}...",
                        unit,
                        key,
                    )
                )
                continue
            try:
                rows, ids, positions = shard_rows(blob, key)  # rows: source_rows for context windows
            except ShardFormatError as e:
                out.append(Problem("corrupt-shard", str(e), unit, key))
                continue
            tokens += len(ids)
            stored.update(np.unique(rows).tolist())
            pairs.append(np.stack([ids.astype(np.int64), positions.astype(np.int64)], axis=1))
        if out:
            return out, tokens, stored
        start, stop = rec.start, rec.stop
        if tokens != rec.tokens:
            out.append(
                Problem("rows", f"unit {unit}: shards hold {tokens} tokens, the done record says {rec.tokens}", unit)
            )
        if pairs:
            allp = np.concatenate(pairs)
            if len(np.unique(allp, axis=0)) != len(allp):
                out.append(Problem("rows", f"unit {unit}: some (sample, position) is stored more than once", unit))
        outside = sorted(i for i in stored if not start <= i < stop)
        if outside:
            out.append(
                Problem(
                    "rows",
                    f"unit {unit}: shards hold sample ids outside rows {start}-{stop - 1}, e.g. {outside[:3]}",
                    unit,
                )
            )
        skipped = [i for ids in rec.skipped.values() for i in ids]
        both = stored & set(skipped)
        if both:
            out.append(Problem("rows", f"unit {unit}: rows both stored and skipped, e.g. {sorted(both)[:3]}", unit))
        if len(set(skipped)) != len(skipped):
            out.append(Problem("rows", f"unit {unit}: a row is counted as skipped twice", unit))
        missing = sorted(set(range(start, stop)) - stored - set(skipped))
        if missing:
            out.append(
                Problem(
                    "rows", f"unit {unit}: {len(missing)} rows neither stored nor skipped, e.g. {missing[:5]}", unit
                )
            )
        return out, tokens, stored

    units = sorted(records)
    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        for unit, (found, tokens, stored) in zip(units, pool.map(check_unit, units)):
            rep.problems += found
            rec = records[unit]
            rep.tokens += tokens
            rep.rows_stored += len(stored)
            rep.shards += len(rec.shards)
            rep.bytes += sum(s.bytes for s in rec.shards)
            for reason, ids in rec.skipped.items():
                rep.rows_skipped[reason] = rep.rows_skipped.get(reason, 0) + len(ids)
    rep.units_done = len(records)
    accounted = rep.rows_stored + sum(rep.rows_skipped.values())
    if (
        not any(p.kind in ("not-done", "rows", "missing-shard", "corrupt-shard") for p in rep.problems)
        and accounted != spec.rows
    ):
        problem(
            "rows",
            f"the units account for {accounted} rows ({rep.rows_stored} stored + "
            f"{sum(rep.rows_skipped.values())} skipped); job.json says {spec.rows}",
        )

    # 5. garbage: the shards of *done* units that their done record does not list (and shards named for no
    # unit of the job). Only those: a done record is created once and never changes, so once it exists no
    # attempt can commit another shard of that unit, whatever its lease or its clock says. The shards of a
    # unit not done yet are kept (a stalled attempt may still commit them), and so are all shards of a unit
    # whose done record is unreadable.
    candidates = []
    for key in store.list(q.shards_prefix(job)):
        if q.job_relative(job, key) in listed:
            continue
        up = q.shard_unit_part(key)
        unit = up[0] if up else None
        if unit in bad_units:
            rep.kept.append(
                {
                    "key": key,
                    "reason": f"unit {unit}'s done record is unreadable: its shards are kept until it is fixed",
                }
            )
        elif unit is not None and 0 <= unit < spec.units and unit not in records:
            rep.kept.append({"key": key, "reason": f"unit {unit} is not done: an attempt may still commit it"})
        else:
            candidates.append(key)
    rep.garbage = list(candidates)
    stale_leases = [q.lease_key(job, u) for u in live if u in records]
    if clean:
        for key in candidates:
            gen = store.generation(key)
            if gen is None:
                continue
            try:
                store.delete(key, gen)  # at the generation judged: a shard rewritten since is kept
                rep.cleaned.append(key)
            except NotFound:
                pass
            except PreconditionFailed:
                rep.kept.append({"key": key, "reason": "rewritten since it was judged garbage"})
        for unit in [u for u in live if u in records]:
            try:
                store.delete(q.lease_key(job, unit), live[unit].generation)
                rep.cleaned.append(q.lease_key(job, unit))
            except (NotFound, PreconditionFailed):
                pass
        rep.garbage = []
    else:
        for key in rep.garbage:
            problem(
                "garbage",
                f"{key}: no done record lists it (left by an attempt that died); `verify --clean` removes it",
                key=key,
            )
        rep.garbage += stale_leases  # harmless, reported for --clean only
    rep.problems.sort(key=lambda p: (p.unit if p.unit is not None else -1, p.kind, p.key or ""))
    return rep
