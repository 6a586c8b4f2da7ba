"""A small, deterministic stand-in for the JAX extractor, for testing the work queue in isolation.

It implements actfleet.worker.work_loop.UnitExtractor over a JSONL file: a row's "tokens" are its UTF-8 bytes, its
"activations" a fixed numpy function of (token, position, layer), so every run over the same rows yields the
same bits. Malformed lines are skipped with a reason and empty texts store nothing, like the real reader and
engine. Shards are real safetensors (token_ids, sample_ids, positions, one [n, D] tensor per site).
The real engine is exercised by the chaos and command tests; this one keeps the loop's tests fast and lets
them inject slowness or failures.

Every shard is stamped with the attempt that wrote it (string metadata "attempt": the worker id, a random
nonce per process, a counter of the process's unit attempts, and whatever the loop passes to name the
attempt), so two attempts at a unit never produce equal bytes: an attempt that overwrites another's shard,
or a done record that mixes two attempts' shards, fails verify's sha256 check instead of passing by accident.
The tensors stay a pure function of the rows (the chaos tests compare them bit for bit through done records).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import save

from actfleet.worker.samples import Batch
from actfleet.worker.shards import Shard
from actfleet.worker.work_loop import PreparedUnit

D = 8
SITES = ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post")
PROCESS_NONCE = secrets.token_hex(8)  # a restarted worker process is a new nonce
_ATTEMPTS = itertools.count(1)  # shard writers made in this process (one per unit attempt), over all extractors


def write_dataset(path: Path, n: int, *, bad_every: int = 0, empty_every: int = 0) -> Path:
    lines = []
    for i in range(n):
        if bad_every and i % bad_every == bad_every - 1:
            lines.append('{"text": "unterminated')
        elif empty_every and i % empty_every == empty_every - 1:
            lines.append(json.dumps({"text": ""}))
        else:
            lines.append(json.dumps({"text": f"row {i}: " + "abcdefgh"[: 1 + i % 8] * (1 + i % 3)}))
    path.write_text("\n".join(lines) + "\n")
    return path


def count_rows(path: Path) -> int:
    return sum(1 for _ in open(path, "rb"))


def fingerprint(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass
class StandinWriter:
    shard_tokens: int
    unit: int
    attempt: str = ""  # stamped into every shard's metadata: different bytes for every attempt
    parts: list = field(default_factory=list)
    part: int = 0

    def add(self, batch: Batch) -> list[Shard]:
        self.parts.append(batch)
        if sum(len(b.sample_ids) for b in self.parts) >= self.shard_tokens:
            return [self._flush()]
        return []

    def finish(self) -> list[Shard]:
        return [self._flush()] if self.parts else []

    def _flush(self) -> Shard:
        cat = {k: np.concatenate([getattr(b, k) for b in self.parts]) for k in ("token_ids", "sample_ids", "positions")}
        for site in SITES:
            cat[site] = np.concatenate([b.acts[site] for b in self.parts])
        self.parts = []
        meta = {"format_version": "1", "model": "standin", "attempt": self.attempt}
        shard = Shard(self.unit, self.part, save(cat, metadata=meta), len(cat["sample_ids"]))
        self.part += 1
        return shard


def stream_units(run, units):
    """A fake's run_stream from its per-unit run: (unit index, batch), one unit after the other (the real
    runner also takes the next unit before the previous one's last batch is out: tests/test_stream_units.py
    covers that order)."""
    for k, unit in enumerate(units):
        for batch in run(unit):
            yield k, batch


@dataclass
class StandinExtractor:
    path: Path
    shard_tokens: int = 64
    batch_rows: int = 4
    delay: float = 0.0  # seconds per batch, to give signals and kills something to interrupt
    worker: str = ""  # the worker id, part of the attempt stamp

    def fingerprint(self) -> str:
        return fingerprint(self.path)

    def model_sha256(self) -> str:
        return ""  # no model files: stand-in jobs pin none

    def rows(self, start: int, stop: int):
        with open(self.path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if i >= stop:
                    break
                if i < start:
                    continue
                try:
                    yield i, json.loads(line)["text"], None
                except (json.JSONDecodeError, KeyError, TypeError):
                    yield i, None, "malformed JSON"

    def prepare(self, start: int, stop: int) -> PreparedUnit:
        rows = list(self.rows(start, stop))
        texts = sum(1 for r in rows if r[1] is not None)
        return PreparedUnit(start, stop, rows, rows, batches=-(-texts // self.batch_rows))

    def run_stream(self, units):
        return stream_units(self.run, (u.rows for u in units))

    def run(self, rows):
        rows = [r for r in rows if r[1] is not None]
        for k in range(0, len(rows), self.batch_rows):
            if self.delay:
                time.sleep(self.delay)
            chunk = rows[k : k + self.batch_rows]
            tok, sid, pos = [], [], []
            for sample_id, text, _ in chunk:
                data = text.encode()
                tok += list(data)
                sid += [sample_id] * len(data)
                pos += list(range(len(data)))
            tok_a = np.array(tok, dtype=np.int32)
            pos_a = np.array(pos, dtype=np.int32)
            acts = {
                site: np.sin(np.outer(tok_a + 0.5 * pos_a, np.arange(1, D + 1)) * (li + 1)).astype(np.float32)
                for li, site in enumerate(SITES)
            }
            yield Batch(
                tok_a,
                np.array(sid, dtype=np.int64),
                pos_a,
                acts,
                rows=len(chunk),
                computed_tokens=len(tok),
                padded_tokens=0,
            )

    def shard_writer(self, unit: int, *attempt, **attempt_kw) -> StandinWriter:
        """A fresh writer for one attempt at `unit`. Whatever else the loop passes (the lease's attempt, its
        tag) is stamped too; the stamp is unique per attempt even without it (worker, process nonce, count)."""
        extra = [str(a) for a in attempt] + [f"{k}={v}" for k, v in sorted(attempt_kw.items())]
        stamp = "/".join([self.worker or "?", PROCESS_NONCE, str(next(_ATTEMPTS)), *extra])
        return StandinWriter(self.shard_tokens, unit, stamp)


def main(argv=None) -> int:
    """`python -m tests.fakes.standin_extractor STORE JOB WORKER DATA [DELAY] [LEASE_S] [DRAIN_S]`: one worker
    process running the real work loop (with SIGTERM drain) over the stand-in extractor.

    JOB may be a comma-separated list of jobs over the same DATA, worked in turn (a SIGTERM ends the list
    too): a fleet of such workers goes through the end of a job, where expired leases are taken over, many
    times. Each event line carries its job."""
    import signal
    import sys

    # A SIGTERM before the work loop's handler is installed (a replacement worker still importing) must drain
    # like any other, not kill the process: remember it and pass it on.
    early: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: early.append(signum))
    print("started {}", flush=True)  # from here on a SIGTERM drains (harnesses wait for this line)

    from actfleet.errors import ActfleetError
    from actfleet.store import open_store
    from tests.fakes.lease_audit import audited

    args = argv if argv is not None else sys.argv[1:]
    store_url, jobs, worker_id, data = args[:4]
    delay = float(args[4]) if len(args) > 4 else 0.0
    lease_s = float(args[5]) if len(args) > 5 else 5.0
    store = audited(open_store(store_url))  # $ACTFLEET_LEASE_AUDIT: log take-overs (tests/fakes/lease_audit.py)
    try:
        return _work_jobs(store, jobs, worker_id, data, delay, lease_s, args, early)
    except ActfleetError as e:  # as the CLI does: one line, the error's exit code
        print(f"actfleet: {e}", file=sys.stderr, flush=True)
        return e.exit_code


def _work_jobs(store, jobs: str, worker_id: str, data: str, delay: float, lease_s: float, args: list, early) -> int:
    from actfleet import work_queue as q
    from actfleet.worker.work_loop import Worker, install_sigterm

    for job in jobs.split(","):
        w = Worker(
            store,
            q.read_job(store, job),
            StandinExtractor(Path(data), delay=delay, worker=worker_id),
            worker_id,
            lease_seconds=lease_s,
            drain_seconds=float(args[6]) if len(args) > 6 else 25.0,
            on_event=lambda kind, info, job=job: print(kind, json.dumps({"job": job, **info}), flush=True),
        )
        install_sigterm(w)
        if early:
            w.request_stop()
        r = w.run()
        print("result", json.dumps({"job": job, **r.__dict__}), flush=True)
        if r.stopped_by_signal:
            break
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
