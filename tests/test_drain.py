"""The rollout's drain request (infra/rollout.py) as the work loop sees it: read between units, the units
held are finished and committed, nothing more is claimed, the record says "drained"."""

from __future__ import annotations

import pytest

from actfleet import work_queue as q
from actfleet.store import open_store
from actfleet.worker.work_loop import Worker
from tests.fakes import standin_extractor as sx
from tests.test_queue import standin_job


@pytest.fixture
def store(tmp_path):
    return open_store(str(tmp_path / "bucket"))


class DrainAfter:
    """Wraps a store: once `units` done records are written, reconcile's drain request appears."""

    def __init__(self, inner, units: int, worker: str):
        self.inner, self.units, self.worker, self.done = inner, units, worker, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def create(self, key, data, *a, **kw):
        out = self.inner.create(key, data, *a, **kw)
        if "/done/" in key:
            self.done += 1
            if self.done == self.units:
                self.inner.put(q.drain_key("job", self.worker), b"{}")
        return out


def test_a_drain_request_is_honoured_between_units(tmp_path, store):
    spec, data = standin_job(tmp_path, store, rows=60, unit_rows=10)  # 6 units
    drained = DrainAfter(store, 1, "w1")
    result = Worker(drained, spec, sx.StandinExtractor(data), "w1", lease_seconds=30, stream_units=False).run()
    assert result.units_committed == 1 and result.units_abandoned == 0 and not result.job_complete
    assert q.read_worker_records(store, "job")["w1"].state == "drained"
    assert not list(store.list("job/leases/"))  # nothing claimed after the drain, nothing left held


def test_without_a_drain_request_the_worker_runs_the_job(tmp_path, store):
    spec, data = standin_job(tmp_path, store, rows=30, unit_rows=10)
    result = Worker(store, spec, sx.StandinExtractor(data), "w1", lease_seconds=30).run()
    assert result.units_committed == 3 and result.job_complete
    assert q.read_worker_records(store, "job")["w1"].state == "finished"
