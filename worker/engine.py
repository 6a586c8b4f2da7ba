"""The extraction engine: the job's model and tokenizer loaded once, with a host-side preparer and a
device-side runner over them.

    engine = Engine(JobOptions(model="path/to/model", sites=("blocks.6.hook_resid_post",)))
    for batch in engine.run([(0, "some text", None), (1, None, "bad json"), ...]):
        batch.token_ids, batch.sample_ids, batch.positions, batch.acts["blocks.6.hook_resid_post"]

`prepare` (worker/preparer.py: tokenize, long-input policy or context windows, packing plan; no device)
also queues the compilation of the programs its plan needs; `run_stream` (worker/runner.py) streams
prepared units through the device back to back, so a caller that prepares unit u+1 while unit u computes
never lets the device drain at a unit boundary. `run` is both for one row list.

Determinism: the stored bits for a sample depend only on the rows given to one `prepare` call (the packing
plan is a pure function of them); the same rows give the same bits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

from actfleet import sites as site_names
from actfleet.errors import InputError
from actfleet.job_options import JobOptions
from actfleet.worker import compile_cache, model_files
from actfleet.worker.background import in_thread
from actfleet.worker.models import family_for
from actfleet.worker.models.config_check import UnsupportedConfig
from actfleet.worker.preparer import Prepared, Preparer, TokenRow
from actfleet.worker.runner import Runner
from actfleet.worker.samples import Batch, Row


def check_lengths(options: JobOptions, model_dir: Path, config=None) -> int:
    """The model's context length; InputError if --max-seq or --context-size exceed it."""
    if config is None:
        try:
            hf_config = json.loads((model_dir / "config.json").read_text())
            config = family_for(hf_config["model_type"]).Config.from_hf(hf_config)
        except Exception:  # a missing or broken config: the Engine reports it, naming the file
            return 0
    for flag, value in (("--max-seq", options.max_seq), ("--context-size", options.context_size)):
        if value > config.max_pos:
            raise InputError(f"{flag} {value}: longer than the model's context ({config.max_pos} tokens)")
    return config.max_pos


def _load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


class Engine:
    """Loads the model (options.model at options.revision) and tokenizer once; `run` extracts any number of row
    lists with them. The reading options (format, fields, ARC augmentation) and shard_mb are not its business.
    `attn_block` is the attention kernel's block size (a tuning knob, not a job option)."""

    def __init__(self, options: JobOptions, *, attn_block: int = 512, model_dir: Path | None = None):
        from actfleet.worker.hf_logging import quiet_transformers

        quiet_transformers()  # before transformers is imported
        compile_cache.enable()
        self.options = options
        model_ref = options.model
        self.model_ref, self.revision = model_ref, options.revision
        # A fleet worker passes the directory it checked against the job's pin (worker/pinning.py).
        self.model_dir = model_dir or model_files.resolve(model_ref, revision=options.revision)
        hf_config = json.loads((self.model_dir / "config.json").read_text())
        self.family = family_for(hf_config["model_type"])
        try:
            self.config = self.family.Config.from_hf(hf_config)
        except UnsupportedConfig as e:  # names the field and why: nothing to add
            raise InputError(f"model {model_ref}: {e}") from None
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"model {model_ref}: config.json lacks or garbles {e}") from None
        check_lengths(options, self.model_dir, self.config)
        self.vocab_size = int(hf_config.get("vocab_size") or 0)
        self.random_weights = bool(hf_config.get("actfleet_random_weights", False))
        # transformers (and the torch it imports) loads in a thread while the weights load here: start-up time.
        tokenizer = in_thread(_load_tokenizer, self.model_dir)
        try:
            self.sites = site_names.resolve(options.sites, self.config.layers)
            if hasattr(self.config, "check_sites"):  # a family without some site kinds (GPT-NeoX's resid_mid)
                self.config.check_sites(self.sites)
        except ValueError as e:
            raise InputError(f"model {model_ref}: {e}") from None
        if not self.sites:
            raise InputError("no capture sites given")
        self.max_seq = options.max_seq or self.config.max_pos
        self.runner = Runner(
            options, self.family, self.config, self.model_dir, self.sites, model_ref=model_ref, attn_block=attn_block
        )
        try:
            self.tokenizer = tokenizer.result()
        except Exception as e:  # tokenizers/transformers raise many types for a corrupt tokenizer
            raise InputError(f"model {model_ref}: the tokenizer does not load ({type(e).__name__}: {e})") from None
        self.preparer = Preparer(
            options,
            self.tokenizer,
            vocab_size=self.vocab_size,
            max_seq=self.max_seq,
            n_devices=self.runner.data_devices,
        )

    def tokenize(self, texts: list[str], add_special_tokens: bool = True):
        return self.preparer.tokenize(texts, add_special_tokens)

    def prepare(self, rows: Iterable[Row]) -> Prepared:
        """The host side of `run` (tokenize, policy, plan); queues the compilation of what the plan needs."""
        prep = self.preparer.prepare(rows)
        self.runner.precompile(prep)
        return prep

    def prepare_tokens(self, rows: Iterable[TokenRow]) -> Prepared:
        """`prepare` on already tokenized rows: (sample_id, token ids, skip_reason)."""
        prep = self.preparer.prepare_tokens(rows)
        self.runner.precompile(prep)
        return prep

    def run(self, rows: Iterable[Row]) -> Iterator[Batch]:
        """Extract the rows; yields Batches (every input row is stored in one batch or listed as skipped)."""
        return self.runner.run(self.prepare(rows))

    def run_tokens(self, rows: Iterable[TokenRow]) -> Iterator[Batch]:
        """`run` on already tokenized rows."""
        return self.runner.run(self.prepare_tokens(rows))

    def run_stream(self, units: Iterable[Prepared]) -> Iterator[tuple[int, Batch]]:
        """(unit index, Batch) for prepared units in order, without draining the device between them."""
        return self.runner.run_stream(units)
