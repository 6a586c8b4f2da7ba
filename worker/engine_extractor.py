"""The real extractor behind the work loop's UnitExtractor interface (actfleet.worker.work_loop): one job's
engine, input reader and shard writer, loaded once per worker process; plus the dataset's row count that
`actfleet prepare` records in job.json."""

from __future__ import annotations

from actfleet.job_options import JobOptions
from actfleet.worker import work_queue as q


class EngineExtractor:
    """actfleet.worker.engine + actfleet.worker.inputs + actfleet.worker.shards for one job, reading exactly
    what the job pins (worker/pinning.py): the dataset from its content-addressed copy, the model checked
    file by file. Either differing is refused here, before any unit is claimed."""

    def __init__(self, spec: q.JobSpec):
        from actfleet.worker import engine as eng, inputs, pinning, shards

        self.spec, self.o, self._inputs, self._shards = spec, spec.options, inputs, shards
        self.input = pinning.pinned_input(spec.input, pinning.InputPin(spec.fingerprint, spec.input_generation))
        model_dir = None
        if spec.model_pin:
            model_dir = pinning.pinned_model(spec.options.model, spec.options.revision,
                                             pinning.ModelPin.from_json(spec.model_pin))
        self.engine = eng.Engine(spec.options, model_dir=model_dir)
        self.shard_meta = shard_metadata(spec.options, self.engine, spec.model_pin)

    def fingerprint(self) -> str:
        return self.input.name.split(".", 1)[0]  # the copy's content address, computed as it was made

    def model_sha256(self) -> str:
        return self.spec.model_sha256  # pinned_model() checked every file against it

    def rows(self, start: int, stop: int):
        return self._inputs.read_rows(str(self.input), tokenizer=self.engine.tokenizer, start=start, stop=stop,
                                      **self.o.input_options())

    def run(self, rows):
        return self.engine.run(rows)

    def shard_writer(self, unit: int):
        return _ShardSink(self._shards, self.engine, self.spec, unit, self.shard_meta)


class _ShardSink:
    """Adapts actfleet.worker.shards.ShardWriter to the loop's add()/finish() -> [Shard]."""

    def __init__(self, shards_mod, engine, spec: q.JobSpec, unit: int, meta: dict[str, str]):
        self.out: list = []  # of shards_mod.Shard
        o = spec.options
        self.writer = shards_mod.ShardWriter(
            shard_mb=o.shard_mb, model=o.model, revision=o.revision, job=spec.job, unit=unit, sites=engine.sites,
            store_dtype=o.store_dtype, random_weights=getattr(engine, "random_weights", False),
            on_shard=lambda shard: self.out.append(shard), extra_metadata=meta)  # self.out is swapped for a fresh list on each take

    def add(self, batch) -> list:
        self.writer.add(batch)
        out, self.out = self.out, []
        return out

    def finish(self) -> list:
        self.writer.close()
        out, self.out = self.out, []
        return out


def shard_metadata(options: JobOptions, engine, model_pin: dict | None) -> dict[str, str]:
    """The job_metadata strings every shard of this job carries (worker/shards.py), from the options, the
    loaded engine and the model pin (job.json's; `actfleet extract` pins the directory it loaded)."""
    from actfleet.worker import shards

    pin = model_pin or {}
    config = getattr(engine, "config", None)
    d_model = getattr(config, "hidden", None) or getattr(config, "hidden_size", None) or 0
    return shards.job_metadata(options, max_seq=engine.max_seq, d_model=d_model, model_files=pin.get("files"),
                               resolved_revision=pin.get("revision"))


def count_input_rows(path: str, options: JobOptions) -> int:
    """The job's sample count: the dataset's rows as these options read them (ARC augmentations included)."""
    from actfleet.worker import inputs

    return inputs.count_rows(path, **options.input_options())
