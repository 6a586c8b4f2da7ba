"""The real extractor behind the work loop's UnitExtractor interface (actfleet.worker.work_loop): one job's
engine, input reader and shard writer, loaded once per worker process; plus the dataset's fingerprint and row
count that `actfleet prepare` pins in job.json."""

from __future__ import annotations

from actfleet.errors import InputError
from actfleet.job_options import JobOptions
from actfleet.worker import work_queue as q


class EngineExtractor:
    """actfleet.worker.engine + actfleet.worker.inputs + actfleet.worker.shards for one job."""

    def __init__(self, spec: q.JobSpec):
        from actfleet.worker import engine as eng, inputs, shards

        self.spec, self.o, self._inputs, self._shards = spec, spec.options, inputs, shards
        self.engine = eng.Engine(spec.options)

    def fingerprint(self) -> str:
        return input_fingerprint(self.spec.input)

    def rows(self, start: int, stop: int):
        return self._inputs.read_rows(self.spec.input, tokenizer=self.engine.tokenizer, start=start, stop=stop,
                                      **self.o.input_options())

    def run(self, rows):
        return self.engine.run(rows)

    def shard_writer(self, unit: int):
        return _ShardSink(self._shards, self.engine, self.spec, unit)


class _ShardSink:
    """Adapts actfleet.worker.shards.ShardWriter to the loop's add()/finish() -> [Shard]."""

    def __init__(self, shards_mod, engine, spec: q.JobSpec, unit: int):
        self.out: list = []  # of shards_mod.Shard
        o = spec.options
        self.writer = shards_mod.ShardWriter(
            shard_mb=o.shard_mb, model=o.model, revision=o.revision, job=spec.job, unit=unit, sites=engine.sites,
            store_dtype=o.store_dtype, random_weights=getattr(engine, "random_weights", False),
            on_shard=lambda shard: self.out.append(shard))  # self.out is swapped for a fresh list on each take

    def add(self, batch) -> list:
        self.writer.add(batch)
        out, self.out = self.out, []
        return out

    def finish(self) -> list:
        self.writer.close()
        out, self.out = self.out, []
        return out


def input_fingerprint(path: str) -> str:
    """sha256 of the dataset's bytes, streamed (a local file or a gs:// object)."""
    from actfleet.hashing import sha256_file, sha256_stream

    if path.startswith("gs://"):
        from google.cloud import storage

        bucket, _, name = path[len("gs://"):].partition("/")
        try:
            with storage.Client().bucket(bucket).blob(name).open("rb") as f:
                return sha256_stream(f)
        except Exception as e:
            raise InputError(f"{path}: cannot read the dataset ({type(e).__name__}: {e})") from None
    try:
        return sha256_file(path)
    except OSError as e:
        raise InputError(f"{path}: cannot read the dataset ({e.strerror})") from None


def count_input_rows(path: str, options: JobOptions) -> int:
    """The job's sample count: the dataset's rows as these options read them (ARC augmentations included)."""
    from actfleet.worker import inputs

    return inputs.count_rows(path, **options.input_options())
