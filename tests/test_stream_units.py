"""The work loop streams units through ONE device stream (worker/work_loop.py): the next unit is claimed and
prepared before the current one ends, and the stream takes it before the current unit's last batch is out,
so the device never drains at a unit boundary. Exactly once still holds: a unit commits only after all its
batches are written, and a prefetched unit whose lease is lost commits nothing."""

from __future__ import annotations

import threading

from actfleet import work_queue as q
from actfleet.store import open_store
from actfleet.worker.verify import verify
from actfleet.worker.work_loop import Worker
from tests.fakes import standin_extractor as sx


def runner_order(run, units):
    """(unit index, batch) in the real runner's order (worker/runner.py): each batch is held back until the
    next one exists, so the next unit is taken before the previous unit's last batch is yielded."""
    pending = None
    for k, unit in enumerate(units):
        for batch in run(unit):
            if pending is not None:
                yield pending
            pending = (k, batch)
    if pending is not None:
        yield pending


class Recording(sx.StandinExtractor):
    """The stand-in, logging when each unit is prepared, taken by the stream, and each batch yielded."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.log: list[tuple] = []
        self.streams = 0
        self.lock = threading.Lock()

    def note(self, *entry) -> None:
        with self.lock:
            self.log.append(entry)

    def prepare(self, start, stop):
        p = super().prepare(start, stop)
        self.note("prepared", start)
        return p

    def run_stream(self, units):
        self.streams += 1
        taken: list = []

        def taking():
            for u in units:
                taken.append(u)
                self.note("taken", u.start)
                yield u

        seen: dict[int, int] = {}
        for k, batch in runner_order(self.run, (u.rows for u in taking())):
            seen[k] = seen.get(k, 0) + 1
            self.note("batch", taken[k].start, seen[k] == taken[k].batches)
            yield k, batch

    def at(self, *entry) -> int:
        return self.log.index(entry)


def job(tmp_path, rows=60, unit_rows=20):
    data = sx.write_dataset(tmp_path / "data.jsonl", rows)
    store = open_store(str(tmp_path / "bucket"))
    spec, _ = q.prepare(
        store, "job", input=str(data), fingerprint=sx.fingerprint(data), rows=rows, unit_rows=unit_rows, options={}
    )
    return store, spec, data


def test_units_run_back_to_back_in_one_stream(tmp_path):
    store, spec, data = job(tmp_path)
    ex = Recording(data, batch_rows=4)  # 5 batches a unit
    result = Worker(store, spec, ex, "w1", lease_seconds=30).run()
    assert result.job_complete and result.units_committed == 3 and verify(store, "job").ok
    assert ex.streams == 1  # no drain between units: one stream for the whole job
    starts = [e[1] for e in ex.log if e[0] == "taken"]
    assert sorted(starts) == [0, 20, 40]
    for before, after in zip(starts, starts[1:]):
        last = ex.at("batch", before, True)
        # Claimed and prepared while the unit before it still had batches to yield, and taken by the stream
        # (with the real runner: its first batch launched) before that unit's last batch came out.
        assert ex.at("prepared", after) < ex.at("taken", after) < last


def test_a_unit_commits_only_after_all_its_batches(tmp_path):
    store, spec, data = job(tmp_path)
    ex = Recording(data, batch_rows=4)
    committed_after: dict[int, int] = {}

    def on_event(kind, info):
        if kind == "committed":
            start = spec.unit_range(info["unit"])[0]
            with ex.lock:
                committed_after[start] = len([e for e in ex.log if e[0] == "batch" and e[1] == start])

    Worker(store, spec, ex, "w1", lease_seconds=30, on_event=on_event).run()
    assert committed_after == {0: 5, 20: 5, 40: 5}
    for u in range(3):
        assert q.read_done(store, "job", u).rows_stored == 20


def test_a_lost_lease_on_the_prefetched_unit_discards_its_results(tmp_path):
    store, spec, data = job(tmp_path)
    ex = Recording(data, batch_rows=4, delay=0.02)
    claims: list[int] = []
    stolen: list[q.Lease] = []

    def on_event(kind, info):
        if kind == "claimed":
            claims.append(info["unit"])
            if len(claims) == 2:  # the prefetched unit: another worker takes it over (a short lease)
                stale = q.read_lease(store, "job", info["unit"])
                stale.expires = 0
                stolen.append(q.take_over(store, stale, "thief", 1))

    events: list[tuple[str, int]] = []

    def record(kind, info):
        events.append((kind, info.get("unit")))
        on_event(kind, info)

    result = Worker(store, spec, ex, "w1", lease_seconds=30, on_event=record).run()
    lost = claims[1]
    assert stolen and stolen[0] is not None
    ends = [kind for kind, unit in events if unit == lost and kind in ("abandoned", "committed")]
    assert ends == ["abandoned", "committed"]  # its first attempt committed nothing
    # w1 took the unit again once the thief's lease expired: the done record is that later attempt's
    done = q.read_done(store, "job", lost)
    assert done.worker == "w1" and done.attempt > stolen[0].attempt
    assert result.job_complete and result.units_abandoned == 1 and result.units_committed == 3
    assert verify(store, "job", clean=True).ok  # the abandoned attempt's shards are garbage, listed nowhere


def test_max_units_claims_no_more_even_with_prefetch(tmp_path):
    store, spec, data = job(tmp_path, rows=120)
    claims: list[int] = []
    w = Worker(
        store,
        spec,
        sx.StandinExtractor(data, batch_rows=4),
        "w1",
        lease_seconds=30,
        max_units=2,
        on_event=lambda kind, info: claims.append(info["unit"]) if kind == "claimed" else None,
    )
    result = w.run()
    assert len(claims) == 2 and result.units_committed == 2 and not result.job_complete
    assert list(store.list("job/leases/")) == []
    assert sorted(q.done_units(store, "job")) == sorted(claims)


def test_sigterm_lets_the_prefetched_unit_finish_and_claims_nothing_more(tmp_path):
    store, spec, data = job(tmp_path, rows=120)
    claims: list[int] = []
    w = Worker(
        store, spec, sx.StandinExtractor(data, batch_rows=4, delay=0.02), "w1", lease_seconds=30, drain_seconds=60
    )

    def on_event(kind, info):
        if kind == "claimed":
            claims.append(info["unit"])
            if len(claims) == 2:
                w.request_stop()  # the spot notice arrives just as the next unit was claimed

    w.on_event = on_event
    result = w.run()
    assert result.stopped_by_signal and len(claims) == 2 and result.units_committed == 2
    assert list(store.list("job/leases/")) == [] and sorted(q.done_units(store, "job")) == sorted(claims)
