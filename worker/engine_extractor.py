"""The real extractor behind the work loop's UnitExtractor interface (actfleet.worker.work_loop): one job's
engine, input reader and shard writer, loaded once per worker process; plus the dataset's row count that
`actfleet prepare` records in job.json."""

from __future__ import annotations

from typing import Iterable, Iterator

from actfleet import work_queue as q
from actfleet.job_options import JobOptions
from actfleet.worker.samples import Batch, Row
from actfleet.worker.work_loop import PreparedUnit


class EngineExtractor:
    """actfleet.worker.engine + actfleet.worker.inputs + actfleet.worker.shards for one job, reading exactly
    what the job pins (worker/pinning.py): the dataset from its content-addressed copy, the model checked
    file by file. Either differing is refused here, before any unit is claimed."""

    def __init__(self, spec: q.JobSpec, pinned=None):
        """`pinned`: the job_setup.JobInputs this process pinned the job from (`actfleet extract`): its model
        directory and local file copies are used as they are instead of being fetched and hashed again."""
        from actfleet.worker import engine as eng
        from actfleet.worker import inputs, pinning, shards, sources

        self.spec, self.o, self._inputs, self._shards = spec, spec.options, inputs, shards
        self._pinning, self._sources, self._copies = pinning, sources, {}
        if spec.input_files:
            # Each file is copied and checked against its pin when a unit first reads it (pinning.pinned_file).
            self.files = [sources.DataFile.from_json(d) for d in spec.input_files]
        else:  # a job.json from before multi-file inputs: its one file, pinned now and indexed once here
            local = pinning.pinned_input(spec.input, pinning.InputPin(spec.fingerprint, spec.input_generation))
            self.files = [
                inputs.describe(
                    spec.input, local, sources.file_kind(spec.input), spec.fingerprint, spec.input_generation
                )
            ]
            self._copies[0] = pinning.plain_copy(self.files[0], local)
        self._pinned_local = list(pinned.local) if pinned is not None else None
        if len(self.files) == 1:  # one file: checked before any unit is claimed, as always
            self._local(self.files[0])
        self._fingerprint = sources.fingerprint(self.files)
        model_dir = pinned.model_dir if pinned is not None else None
        if spec.model_pin and model_dir is None:
            model_dir = pinning.pinned_model(
                spec.options.model, spec.options.revision, pinning.ModelPin.from_json(spec.model_pin)
            )
        self.engine = eng.Engine(spec.options, model_dir=model_dir)
        self.shard_meta = shard_metadata(spec.options, self.engine, spec.model_pin)

    def fingerprint(self) -> str:
        # Of the files' pins; every copy read was hashed as it was made and refused unless it matched its pin.
        return self._fingerprint

    def _local(self, f):
        i = self.files.index(f)
        if i not in self._copies:
            if self._pinned_local:  # the copy this process pinned (and hashed) the file from
                self._copies[i] = self._pinning.plain_copy(f, self._pinned_local[i])
            else:
                self._copies[i] = self._pinning.pinned_file(f)
        return self._copies[i]

    def model_sha256(self) -> str:
        return self.spec.model_sha256  # pinned_model() checked every file against it

    def rows(self, start: int, stop: int):
        return self._inputs.read_source_rows(
            self.files, self._local, start=start, stop=stop, tokenizer=self.engine.tokenizer, **self.o.input_options()
        )

    def prepare(self, start: int, stop: int) -> PreparedUnit:
        rows = list(self.rows(start, stop))
        prepared = self.engine.prepare(rows)
        return PreparedUnit(start, stop, rows, prepared, prepared.batches)

    def run_stream(self, units: Iterable[PreparedUnit]) -> Iterator[tuple[int, Batch]]:
        return self.engine.run_stream(u.work for u in units)

    def run(self, rows: list[Row]) -> Iterator[Batch]:
        """One row list's Batches, alone (bench/pipeline.py's forward-only side)."""
        return self.engine.run(rows)

    def shard_writer(self, unit: int):
        return _ShardSink(self._shards, self.engine, self.spec, unit, self.shard_meta)


class _ShardSink:
    """Adapts actfleet.worker.shards.ShardWriter to the loop's add()/finish() -> [Shard]."""

    def __init__(self, shards_mod, engine, spec: q.JobSpec, unit: int, meta: dict[str, str]):
        self.out: list = []  # of shards_mod.Shard
        o = spec.options
        self.writer = shards_mod.ShardWriter(
            shard_mb=o.shard_mb,
            model=o.model,
            revision=o.revision,
            job=spec.job,
            unit=unit,
            sites=engine.sites,
            store_dtype=o.store_dtype,
            random_weights=engine.random_weights,
            on_shard=lambda shard: self.out.append(shard),
            extra_metadata=meta,
        )  # self.out is swapped for a fresh list on each take

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
    return shards.job_metadata(
        options,
        max_seq=engine.max_seq,
        d_model=d_model,
        model_files=pin.get("files"),
        resolved_revision=pin.get("revision"),
    )


def count_input_rows(ref: str, options: JobOptions) -> int:
    """The job's sample count: the input's rows as these options read them (ARC augmentations included), as
    prepare counts them."""
    from actfleet.worker import pinning, sources

    files, _ = pinning.pin_files(sources.resolve(ref, **options.source_options()))
    return sum(f.rows for f in files) * samples_per_row(options)


def samples_per_row(options: JobOptions) -> int:
    return options.samples_per_row()
