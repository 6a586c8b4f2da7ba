"""`actfleet verify`: prove a job's output, or list exactly what is wrong with it.

Checks, from the job's records and the shards themselves:
1. every unit 0..N-1 has its unit record and exactly one done record, covering exactly its row range and
   computed from the dataset bytes and model files job.json pins (the digests each done record carries);
2. every shard a done record lists exists with the listed size and sha256, belongs to that unit, and no
   shard is listed twice; so does the unit's statistics object (stats/, worker/stats.py) that it lists, which
   must also read as one;
3. every input row is accounted for exactly once: the rows stored in a unit's shards (sample ids, or with
   context windows the `source_rows`) plus the ids it lists as skipped (with a reason) are exactly the
   unit's rows, disjoint; no (sample, position) is stored
   twice; the token counts in the done record match the shards;
4. the job itself: rows are derived from the input files job.json pins (their rows x samples per row,
   capped by max_rows), units = ceil(rows / unit_rows), every unit record holds exactly its range, and,
   summed over units, stored + skipped = rows (job.json's own totals are checked, not trusted);
5. foreign objects: every key under units/, leases/, done/, shards/ and stats/ that is not exactly a key the protocol
   writes for a unit of this job ("done/000001.old", "done/1", a shard in a subfolder) is reported, and never
   read as the unit's, never deleted (docs/jobs.md, "Foreign objects");
6. garbage: the shards and statistics objects of done units that their done record does not list (left by
   attempts that lost their lease or died), and leases left on done units. `--clean` deletes them, safely while workers run
   and whatever the clocks say: a done record never changes once created, so no attempt can commit another
   shard of its unit. Shards of units not done yet, and every shard of a unit whose done record is
   unreadable, are kept, each listed with its reason; deletes are at the generation judged.
"""

from __future__ import annotations

import dataclasses
import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np

from actfleet import work_queue as q
from actfleet.errors import ActfleetError
from actfleet.store import NotFound, PreconditionFailed, Store
from actfleet.worker import sources
from actfleet.worker.shards import ShardFormatError, shard_rows


@dataclass
class Problem:
    kind: str  # missing-unit | bad-unit | not-done | bad-record | bad-job | mixed-input | mixed-model |
    #            missing-shard | corrupt-shard | missing-stats | corrupt-stats | rows | foreign | garbage
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
    foreign: list[str] = field(
        default_factory=list
    )  # keys under units/ leases/ done/ shards/ stats/ no protocol writes

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        return d


def verify(store: Store, job: str, *, clean: bool = False, now: float | None = None, parallel: int = 8) -> VerifyReport:
    now = store.now() if now is None else now  # leases are judged by the store's clock (docs/jobs.md)
    told = q.read_job(store, job, check=False)  # job.json as written: its totals are checked, not trusted
    # 0. The totals, derived from the pinned input files (an edited rows + units would hide units from every
    # check below); every later check uses `spec`, job.json with the derived totals.
    rows = told.input_rows()
    rows = told.rows if rows is None else rows
    spec = dataclasses.replace(told, rows=rows, units=-(-rows // told.unit_rows))
    rep = VerifyReport(job=job, store=store.url, units_total=spec.units, rows=spec.rows)

    def problem(kind: str, message: str, unit: int | None = None, key: str | None = None) -> None:
        rep.problems.append(Problem(kind, message, unit, key))

    def foreign(key: str, why: str) -> None:
        rep.foreign.append(key)
        problem("foreign", f"{key}: {why}; not an object of the job's protocol: never trusted, never deleted", key=key)

    if told.totals_problem():
        problem("bad-job", f"job.json says {told.totals_problem()}")
    if told.input_files is not None:
        try:
            derived = sources.fingerprint([sources.DataFile.from_json(f) for f in told.input_files])
        except (KeyError, TypeError, ValueError) as e:
            derived = f"unreadable ({e})"
        if derived != told.fingerprint:
            problem(
                "bad-job",
                f"job.json's fingerprint {told.fingerprint[:12]}... is not its input files' {derived[:12]}...",
            )

    # 1. unit records (each exactly the range the derived totals give), done records, leases
    listing = q.list_units(store, job, q.UNITS)
    for key in listing.foreign:
        foreign(key, "not a unit record's name")
    for unit, key in sorted(listing.units.items()):
        if unit >= spec.units:
            foreign(key, f"a unit record for unit {unit}; the job has units 0-{spec.units - 1}")

    def read_unit_record(unit: int) -> bytes | None:
        try:
            return store.read(listing.units[unit])[0]
        except NotFound:
            return None

    in_range = [u for u in range(spec.units) if u in listing.units]
    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        unit_records = dict(zip(in_range, pool.map(read_unit_record, in_range)))
    for unit in range(spec.units):
        data = unit_records.get(unit)
        if data is None:
            problem("missing-unit", f"unit {unit}: unit record {q.unit_key(job, unit)} is missing", unit)
        elif not q.unit_record_matches(spec, unit, data):
            problem(
                "bad-unit",
                f"unit {unit}: unit record {q.unit_key(job, unit)} says {data.decode(errors='replace')[:120]!r}, "
                f"job.json's totals say {q.unit_record(spec, unit).decode()!r} (left by another prepare?)",
                unit,
                q.unit_key(job, unit),
            )
    done_listing = q.list_units(store, job, q.DONE)
    for key in done_listing.foreign:
        foreign(key, "not a done record's name")
    records: dict[int, q.DoneRecord] = {}
    for unit, key in sorted(done_listing.units.items()):
        if not 0 <= unit < spec.units:
            foreign(key, f"a done record for unit {unit}; the job has units 0-{spec.units - 1}")
            continue
        try:
            records[unit] = q.done_record(store.read(key)[0], key, unit)
        except (ActfleetError, NotFound) as e:
            problem("bad-record", f"{key}: {e}", unit, key)
    live = {}
    lease_listing = q.list_units(store, job, q.LEASES)
    for key in lease_listing.foreign:
        foreign(key, "not a lease's name")
    for unit, key in sorted(lease_listing.units.items()):
        if not 0 <= unit < spec.units:
            foreign(key, f"a lease for unit {unit}; the job has units 0-{spec.units - 1}")
            continue
        lease = q.read_lease(store, job, unit)
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
    listed_stats: set[str] = set()  # the statistics objects done records list (job-relative names)
    unreadable: set[str] = set()  # listed names that are no shard (statistics) key of their unit: never read
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
            parsed = q.job_shard(job, q.in_job(job, s.name)) if _plain_name(s.name) else None
            if parsed is None:
                problem("bad-record", f"unit {unit}: lists {s.name!r}, which is no shard name", unit)
                unreadable.add(s.name)
            elif parsed[0] != unit:
                problem("bad-record", f"unit {unit}: lists shard {s.name} of another unit", unit)
            if s.name in listed:
                problem("bad-record", f"shard {s.name} is listed by units {listed[s.name]} and {unit}", unit)
            listed[s.name] = unit
        if rec.stats is not None:
            name = rec.stats.name
            parsed_stats = q.job_stats(job, q.in_job(job, name)) if _plain_name(name) else None
            if parsed_stats is None or parsed_stats[0] != unit:
                problem("bad-record", f"unit {unit}: lists {name!r} as its statistics, no statistics name of it", unit)
                unreadable.add(name)
            else:
                listed_stats.add(name)

    def check_unit(unit: int) -> tuple[list[Problem], int, set[int]]:
        rec = records[unit]
        out: list[Problem] = []
        stored: set[int] = set()
        tokens = 0
        pairs: list[np.ndarray] = []
        for s in rec.shards:
            if s.name in unreadable:
                continue  # already a bad-record problem; reading it could climb out of the job (a ".." name)
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

    def check_stats(unit: int) -> list[Problem]:
        """The unit's statistics object, as its done record lists it: present, its size and sha256, readable."""
        from actfleet.worker import stats as unit_stats

        s = records[unit].stats
        if s is None or s.name in unreadable:
            return []
        key = q.in_job(job, s.name)
        try:
            blob, _ = store.read(key)
        except NotFound:
            return [Problem("missing-stats", f"unit {unit}: statistics object {key} is missing", unit, key)]
        digest = hashlib.sha256(blob).hexdigest()
        if len(blob) != s.bytes or digest != s.sha256:
            return [
                Problem(
                    "corrupt-stats",
                    f"unit {unit}: statistics object {key} has {len(blob)} bytes sha256 {digest[:12]}..., "
                    f"the done record says {s.bytes} bytes {s.sha256[:12]}...",
                    unit,
                    key,
                )
            ]
        try:
            unit_stats.parse(blob, key)
        except ActfleetError as e:
            return [Problem("corrupt-stats", f"unit {unit}: {e}", unit, key)]
        return []

    def check(unit: int) -> tuple[list[Problem], int, set[int]]:
        found, tokens, stored = check_unit(unit)
        return found + check_stats(unit), tokens, stored

    units = sorted(records)
    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        for unit, (found, tokens, stored) in zip(units, pool.map(check, units)):
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
            f"{sum(rep.rows_skipped.values())} skipped); the job's input holds {spec.rows}",
        )

    # 5. garbage: the shards of *done* units that their done record does not list (a key that is no shard key
    # of a unit of the job is foreign: reported, kept). Only those: a done record is created once and never changes, so once it exists no
    # attempt can commit another shard of that unit, whatever its lease or its clock says. The shards of a
    # unit not done yet are kept (a stalled attempt may still commit them), and so are all shards of a unit
    # whose done record is unreadable.
    # Any fault in a unit's record (unreadable, wrong range, a listed name that is no shard of it): its
    # shards are kept, since the record cannot say which of them are committed.
    bad_units = {p.unit for p in rep.problems if p.kind == "bad-record" and p.unit is not None}
    candidates = []
    for key in store.list(q.shards_prefix(job)):
        if q.job_relative(job, key) in listed:
            continue
        parsed = q.job_shard(job, key)
        unit = parsed[0] if parsed else None
        if unit is None:
            foreign(key, "not a shard name")
        elif not 0 <= unit < spec.units:
            foreign(key, f"a shard of unit {unit}; the job has units 0-{spec.units - 1}")
        elif unit in bad_units:
            rep.kept.append(
                {
                    "key": key,
                    "reason": f"unit {unit}'s done record is unreadable or faulty: its shards are kept until it is fixed",
                }
            )
        elif unit not in records:
            rep.kept.append({"key": key, "reason": f"unit {unit} is not done: an attempt may still commit it"})
        else:
            candidates.append(key)
    # The same rule for statistics objects (stats/): an attempt's own name; only the one its unit's done record
    # lists counts (actfleet.work_queue.committed_units); a name stats_key does not spell is foreign.
    for key in store.list(q.stats_prefix(job)):
        if q.job_relative(job, key) in listed_stats:
            continue
        parsed_stats = q.job_stats(job, key)
        unit = parsed_stats[0] if parsed_stats else None
        if unit is None:
            foreign(key, "not a statistics object's name")
        elif not 0 <= unit < spec.units:
            foreign(key, f"statistics of unit {unit}; the job has units 0-{spec.units - 1}")
        elif unit in bad_units:
            rep.kept.append(
                {
                    "key": key,
                    "reason": f"unit {unit}'s done record is unreadable or faulty: its statistics are kept until "
                    "it is fixed",
                }
            )
        elif unit not in records:
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


def _plain_name(name: object) -> bool:
    """A done record's shard name is a relative key with no "." / ".." / empty parts (as shard_key makes)."""
    return isinstance(name, str) and all(p not in ("", ".", "..") and not p.startswith(".") for p in name.split("/"))
