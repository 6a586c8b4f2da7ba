"""Activation statistics: per unit, per stored site, what trainers otherwise make an extra pass for.

Each committed unit carries, per site, the stored rows' count, sum and sum of squares per dimension (float64),
the sum of their squared norms and of their norms, and with `--stats gram` the d x d Gram matrix (sum of
x x^T). The runner computes them on the device, in float32 per batch, from the activations already cast to
the store dtype (so they describe exactly the stored bits), and the work loop sums the batches in float64
(`UnitStats`); an extractor whose Batches carry none (a test stand-in) gets them computed here on the host.

Where they are stored: one small safetensors object per unit attempt, `stats/000042.a2-5f1c9a2b.stats.safetensors`
(actfleet.work_queue.stats_key), listed in the done record with its size and sha256 like a shard. Not in the
done record itself: status and reconcile read every done record, and d floats per site (d^2 with a Gram
matrix) would make them large; not found by name either: a unit re-done after a take-over writes a second
object under its own attempt's name, and only the one its (single, create-once) done record lists is counted.

Totals (`job_totals`) read exactly the committed units' objects (actfleet.work_queue.committed_units), one
at a time (memory: one unit's statistics plus the totals, whatever the job's size), each checked against its
recorded size and sha256. What the numbers are (docs/research.md, "Normalisation statistics"):

    mean         sum / count                                     per dimension
    variance     sumsq / count - mean^2   (population)           per dimension
    mean_sqnorm  sqnorm / count                                  E ||x||^2
    mean_norm    norm / count                                    E ||x||
    norm_scaling_factor  sqrt(d) / mean_norm                     SAELens's (estimate_norm_scaling_factor)
    covariance   gram / count - mean mean^T                      with --stats gram
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

import numpy as np

from actfleet.errors import InputError

FORMAT = "actfleet-stats"
FORMAT_VERSION = "1"
FIELDS = ("count", "sum", "sumsq", "sqnorm", "norm", "gram")


class NoStatistics(InputError):
    """A committed unit carries no statistics object (--stats none, or committed before statistics)."""


@dataclass
class SiteStats:
    """Sums over the stored rows of one site (float64; count exact)."""

    count: int
    sum: np.ndarray  # [d]
    sumsq: np.ndarray  # [d]
    sqnorm: float
    norm: float
    gram: np.ndarray | None = None  # [d, d], --stats gram only

    @staticmethod
    def zeros(d: int, gram: bool = False) -> "SiteStats":
        return SiteStats(0, np.zeros(d), np.zeros(d), 0.0, 0.0, np.zeros((d, d)) if gram else None)

    @staticmethod
    def of_rows(x: np.ndarray, gram: bool = False) -> "SiteStats":
        """From host rows [n, ...] (each row flattened to d, as exports flatten per-head sites), in float64."""
        x = np.asarray(x)
        # the width from the shape, not -1: a unit whose rows were all skipped has n = 0 and must still sum
        x = x.reshape(len(x), int(np.prod(x.shape[1:]))).astype(np.float64)
        sq = np.einsum("nd,nd->n", x, x)
        return SiteStats(
            len(x), x.sum(0), (x * x).sum(0), float(sq.sum()), float(np.sqrt(sq).sum()), x.T @ x if gram else None
        )

    @property
    def d(self) -> int:
        return len(self.sum)

    def add(self, other: "SiteStats") -> None:
        if other.d != self.d:
            raise InputError(f"statistics of width {other.d} added to width {self.d}: not one site")
        if (self.gram is None) != (other.gram is None):
            raise InputError(
                "statistics with and without a Gram matrix cannot be summed (units made with other --stats)"
            )
        self.count += other.count
        self.sum += other.sum
        self.sumsq += other.sumsq
        self.sqnorm += other.sqnorm
        self.norm += other.norm
        if self.gram is not None:
            self.gram += other.gram

    # -- what trainers use ----------------------------------------------------------------------------

    def mean(self) -> np.ndarray:
        return self.sum / max(1, self.count)

    def variance(self) -> np.ndarray:
        """Population variance per dimension (clipped at 0: rounding can make a constant dimension's negative)."""
        m = self.mean()
        return np.maximum(self.sumsq / max(1, self.count) - m * m, 0.0)

    def covariance(self) -> np.ndarray | None:
        if self.gram is None:
            return None
        m = self.mean()
        return self.gram / max(1, self.count) - np.outer(m, m)

    def summary(self) -> dict:
        """The scalars (JSON-ready); the per-dimension arrays are mean() and variance()."""
        n = max(1, self.count)
        mean_norm = self.norm / n
        var = self.variance()
        return {
            "d": self.d,
            "count": self.count,
            "mean_norm": mean_norm,
            "mean_sqnorm": self.sqnorm / n,
            "norm_scaling_factor": math.sqrt(self.d) / mean_norm if mean_norm > 0 else None,
            "mean_variance": float(var.mean()) if self.d else 0.0,
            "mean_abs_mean": float(np.abs(self.mean()).mean()) if self.d else 0.0,
            "gram": self.gram is not None,
        }


class UnitStats(dict):
    """site -> SiteStats for one unit attempt, summed from its Batches in float64."""

    def __init__(self, gram: bool = False):
        super().__init__()
        self.gram = gram

    def add_batch(self, batch) -> None:
        parts = batch.stats
        if parts is None:  # an extractor that computes none (a test stand-in): the host does it
            parts = {site: SiteStats.of_rows(a, self.gram) for site, a in batch.acts.items()}
        for site, part in parts.items():
            if site not in self:
                self[site] = SiteStats.zeros(part.d, self.gram)
            self[site].add(part)

    def to_bytes(self, metadata: dict[str, str] | None = None) -> bytes:
        """The unit's statistics object: safetensors, float64 sums and an int64 count per site."""
        from actfleet.worker.shards import safetensors_bytes

        tensors = {}
        for site, s in self.items():
            tensors[f"{site}/count"] = np.array([s.count], np.int64)
            tensors[f"{site}/sum"] = s.sum
            tensors[f"{site}/sumsq"] = s.sumsq
            tensors[f"{site}/sqnorm"] = np.array([s.sqnorm])
            tensors[f"{site}/norm"] = np.array([s.norm])
            if s.gram is not None:
                tensors[f"{site}/gram"] = s.gram
        meta = {
            **(metadata or {}),
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "sites": json.dumps(list(self)),
            "gram": "true" if self.gram else "false",
        }
        return safetensors_bytes(tensors, meta)


def parse(blob: bytes, what: str) -> dict[str, SiteStats]:
    """A statistics object's sites. InputError naming `what` for bytes that are not one."""
    from actfleet.worker.shards import ShardFormatError, read_tensors

    try:
        tensors, meta = read_tensors(blob)
        if meta.get("format") != FORMAT:
            raise ShardFormatError(f"format {meta.get('format')!r}, not {FORMAT}")
        out = {}
        for site in json.loads(meta["sites"]):
            t = {f: tensors.get(f"{site}/{f}") for f in FIELDS}
            out[site] = SiteStats(
                int(t["count"][0]),
                np.array(t["sum"], np.float64),
                np.array(t["sumsq"], np.float64),
                float(t["sqnorm"][0]),
                float(t["norm"][0]),
                None if t["gram"] is None else np.array(t["gram"], np.float64),
            )
        return out
    except (ShardFormatError, KeyError, TypeError, ValueError) as e:
        raise InputError(f"{what}: not a readable statistics object ({e})") from None


@dataclass
class JobTotals:
    sites: dict[str, SiteStats]
    units_counted: int
    units_total: int
    where: str

    def to_json(self) -> dict:
        return {
            "where": self.where,
            "units_counted": self.units_counted,
            "units_total": self.units_total,
            "sites": {site: s.summary() for site, s in self.sites.items()},
        }

    def arrays(self) -> dict[str, np.ndarray]:
        """{site}.mean, {site}.variance (and {site}.covariance with a Gram matrix), float64."""
        out = {}
        for site, s in self.sites.items():
            out[f"{site}.mean"] = s.mean()
            out[f"{site}.variance"] = s.variance()
            if s.gram is not None:
                out[f"{site}.covariance"] = s.covariance()
        return out

    def save(self, path) -> None:
        """The arrays as safetensors, the scalars as its JSON metadata "summary" (safetensors metadata is
        strings only): `safetensors.numpy.load_file(path)` or `safe_open` read it."""
        from actfleet.worker.shards import safetensors_bytes

        blob = safetensors_bytes(
            self.arrays(), {"format": "actfleet-stats-totals", "summary": json.dumps(self.to_json())}
        )
        with open(path, "wb") as f:
            f.write(blob)


def job_totals(store, job: str, units: int, *, where: str, sites=None) -> JobTotals:
    """Sum the statistics of the job's committed units (each exactly once: the objects their done records
    list). InputError naming the unit when a committed unit has none, or an object fails its size or sha256."""
    from actfleet import work_queue as q
    from actfleet.store import NotFound

    records = q.committed_units(store, job, units)
    missing = [r.unit for r in records if r.stats is None]
    if missing:
        raise NoStatistics(
            f"{where}: unit {missing[0]} ({len(missing)} of {len(records)} committed units) carries no statistics "
            f"(committed with --stats none, or before statistics existed): its totals would be wrong"
        )
    wanted = None if sites is None else set(sites)
    totals: dict[str, SiteStats] = {}
    for rec in records:  # one at a time: memory stays one unit's statistics (a Gram matrix each) + totals
        key = q.in_job(job, rec.stats.name)
        named = q.job_stats(job, key)
        if named is None or named[0] != rec.unit:  # never read an object the record cannot name (as verify)
            raise InputError(f"{where}: unit {rec.unit}'s done record lists {rec.stats.name!r}, not its statistics")
        try:
            blob, _ = store.read(key)
        except NotFound:
            raise InputError(f"{where}: unit {rec.unit}'s statistics {key} are missing") from None
        digest = hashlib.sha256(blob).hexdigest()
        if len(blob) != rec.stats.bytes or digest != rec.stats.sha256:
            raise InputError(
                f"{where}: unit {rec.unit}'s statistics {key} have {len(blob)} bytes sha256 {digest[:12]}..., "
                f"the done record says {rec.stats.bytes} bytes {rec.stats.sha256[:12]}... (corrupt)"
            )
        for site, s in parse(blob, key).items():
            if wanted is not None and site not in wanted:
                continue
            if site not in totals:
                totals[site] = SiteStats.zeros(s.d, s.gram is not None)
            totals[site].add(s)
    if wanted is not None and records:
        absent = sorted(wanted - set(totals))
        if absent:
            raise InputError(f"{where}: no statistics for site {absent[0]} (the job's: {', '.join(totals)})")
    return JobTotals(totals, len(records), units, where)
