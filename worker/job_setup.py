"""The setup every job goes through before its units exist, once for `actfleet prepare` and `actfleet extract`:
resolve the dataset to files, pin the model, check the lengths against it, pin the files (rows counted from
exactly the bytes pinned), and check that the rows have the field the options read. Nothing is written to
the store or to --out here, so a bad input fails (exit 2, one line) before anything exists."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from actfleet import work_queue as q
from actfleet.job_options import JobOptions


@dataclass(frozen=True)
class JobInputs:
    """What a job reads, pinned: the arguments of work_queue.prepare (and the model directory loaded)."""

    source: str  # the dataset reference as the job records it
    files: list  # worker/sources.py DataFile, in row order
    rows: int  # samples: the files' rows x samples per row, capped by max_rows
    fingerprint: str  # sources.fingerprint(files)
    local: list  # the local copies the files were pinned from (Paths, one per file)
    model_dir: Path
    model_pin: dict  # worker/pinning.py ModelPin JSON

    def prepare_args(self) -> dict:
        """The keyword arguments of work_queue.prepare that say what is read."""
        return {
            "input": self.source,
            "fingerprint": self.fingerprint,
            "rows": self.rows,
            "input_generation": self.files[0].generation if len(self.files) == 1 else None,
            "model_pin": self.model_pin,
            "input_files": [f.to_json() for f in self.files],
        }


def pin_job_inputs(options: JobOptions, source: str) -> JobInputs:
    """Resolve and pin the dataset and the model of a job; InputError (one line) on a missing or misread
    dataset, a broken model directory, or lengths the model cannot take."""
    from actfleet.worker import inputs, pinning, sources
    from actfleet.worker.engine import check_lengths
    from actfleet.worker.engine_extractor import samples_per_row

    # The dataset reference first: it is cheap, and a typo in it should not wait for a model download.
    refs = sources.resolve(source, **options.source_options())
    model_dir, model = pinning.pin_model(options.model, options.revision)
    check_lengths(options, model_dir)
    per = samples_per_row(options)
    files, local = pinning.pin_files(refs, options.max_rows, per)
    inputs.check_field(inputs.head(files[0], local[0], 1000), what=source, **options.input_options())
    rows = q.sample_count(options, (f.rows for f in files))
    return JobInputs(
        source=source,
        files=files,
        rows=rows,
        fingerprint=sources.fingerprint(files),
        local=local,
        model_dir=model_dir,
        model_pin=model.to_json(),
    )
