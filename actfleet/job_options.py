"""The options a job pins, defined once: `JobOptions`, its defaults, its allowed values and its JSON form.

Everything that changes the stored bits or rows is a field here. fleet.toml's [job] table
(actfleet.config) produces one, `actfleet prepare` writes one into job.json (actfleet.work_queue.JobSpec),
`actfleet extract` builds one from its flags, and the engine (actfleet.worker.engine.Engine) runs with one.
The command-line defaults and choices are read from here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from actfleet import sites as site_names

FORMATS = ("text", "chat", "arc")
POSITIONS = ("all", "non-special", "last")
LONG_INPUTS = ("skip", "truncate")
DTYPES = ("bfloat16", "float32")
SEPARATORS = ("eos", "bos", "none")  # the token between concatenated documents in a context window

# Job settings that are not extraction options (job.json pins unit_rows separately; leases are per worker).
DEFAULT_UNIT_ROWS = 1000
DEFAULT_LEASE_SECONDS = 300


@dataclass(frozen=True)
class JobOptions:
    model: str = ""  # a local dir, gs:// prefix or hub id ("" only for jobs whose extractor needs none)
    revision: str = "main"
    # Which rows (actfleet.worker.sources): a hub dataset's split, subset (config) and revision.
    split: str = "train"
    subset: str = ""
    dataset_revision: str = "main"
    max_rows: int = 0  # 0: every row; else only the first max_rows rows (test-size runs)
    max_tokens: int = 0  # extract only: stop after the unit in which the stored tokens reach this (0: no limit)
    format: str = "text"  # text | chat | arc
    text_field: str = "text"
    messages_field: str = "messages"
    tokens_field: str = ""  # pre-tokenized input: the field holding each row's token ids ("" = tokenize text)
    arc_augmentations: int = 0
    arc_seed: int = 0
    sites: tuple[str, ...] = (site_names.name("resid_post", site_names.ALL_LAYERS),)  # site names, see actfleet.sites
    positions: str = "non-special"  # all | non-special | last
    max_seq: int = 0  # 0: the model's context length
    long_inputs: str = "skip"  # skip | truncate
    batch_tokens: int = 16384
    compute_dtype: str = "bfloat16"  # bfloat16 | float32
    store_dtype: str = "bfloat16"  # bfloat16 | float32
    shard_mb: float = 512  # approximate shard size in MiB (2**20 bytes)
    model_parallel: int = 1  # devices that split one copy of the model (heads, MLP); the rest split the batch
    # Context windows (docs/jobs.md, "Context windows"): 0 = one sample per document, as before.
    context_size: int = 0  # N > 0: documents are tokenized, joined and cut into windows of exactly N tokens
    separator: str = "eos"  # eos | bos | none: the token put between documents joined in one window
    prepend_bos: bool = True  # every window starts with BOS
    concat: bool = True  # False: each document is cut into its own windows

    def __post_init__(self):
        if isinstance(self.sites, list):
            object.__setattr__(self, "sites", tuple(self.sites))
        for key, allowed in (("format", FORMATS), ("positions", POSITIONS), ("long_inputs", LONG_INPUTS),
                             ("compute_dtype", DTYPES), ("store_dtype", DTYPES), ("separator", SEPARATORS)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key} {getattr(self, key)!r}: use one of {', '.join(allowed)}")
        for key in ("model", "revision", "text_field", "messages_field", "tokens_field", "split", "subset",
                    "dataset_revision"):
            if not isinstance(getattr(self, key), str):
                raise ValueError(f"{key} {getattr(self, key)!r}: must be a string")
        for key in ("prepend_bos", "concat"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{key} {getattr(self, key)!r}: must be true or false")
        if self.tokens_field and self.format != "text":
            raise ValueError(f"tokens_field {self.tokens_field!r}: pre-tokenized rows need format text")
        for key, lo in (("arc_augmentations", 0), ("arc_seed", 0), ("max_seq", 0), ("batch_tokens", 1),
                        ("max_rows", 0), ("max_tokens", 0), ("context_size", 0), ("model_parallel", 1)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(f"{key} {value!r}: must be an integer >= {lo}")
        if isinstance(self.shard_mb, bool) or not isinstance(self.shard_mb, (int, float)) or self.shard_mb <= 0:
            raise ValueError(f"shard_mb {self.shard_mb!r}: must be a number > 0")
        if not isinstance(self.sites, tuple) or not all(isinstance(s, str) and site_names.is_name(s)
                                                        for s in self.sites):
            raise ValueError(f"sites {self.sites!r}: must be site names like hook_embed or blocks.6.hook_resid_post")

    def input_options(self) -> dict[str, Any]:
        """How the dataset is read into rows: the keyword arguments of actfleet.worker.inputs.read_rows/count_rows."""
        return {"format": self.format, "text_field": self.text_field, "messages_field": self.messages_field,
                "tokens_field": self.tokens_field, "arc_augmentations": self.arc_augmentations,
                "arc_seed": self.arc_seed}

    def source_options(self) -> dict[str, Any]:
        """How the input reference resolves to files: keyword arguments of actfleet.worker.sources.resolve."""
        return {"split": self.split, "subset": self.subset, "revision": self.dataset_revision}

    def replace(self, **changes: Any) -> "JobOptions":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """The JSON form job.json stores (sites as a list)."""
        return {**dataclasses.asdict(self), "sites": list(self.sites)}

    @staticmethod
    def from_json(d: dict[str, Any], what: str = "options") -> "JobOptions":
        """From the JSON form; missing keys take the defaults. Unknown keys or bad values raise ValueError."""
        if not isinstance(d, dict):
            raise ValueError(f"{what}: must be a JSON object")
        unknown = sorted(set(d) - set(KEYS))
        if unknown:
            raise ValueError(f"{what}: unknown options {', '.join(unknown)}")
        return JobOptions(**d)


KEYS = tuple(f.name for f in dataclasses.fields(JobOptions))
DEFAULTS = JobOptions()
