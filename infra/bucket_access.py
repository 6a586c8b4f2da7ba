"""What the workers' service account may do in the activations bucket (docs/infrastructure.md, "Permissions").

Least privilege with IAM conditions on bucket-level bindings (the bucket has uniform bucket-level access, which
conditions require):

- write (roles/storage.objectUser: objects, no IAM) only under the job prefix `{store prefix}/{job}/`;
- read (roles/storage.objectViewer) only the fleet config object and the job's dataset (exactly those object
  names: never `fleet.toml.bak` or `d.jsonl.private`) and the model (the objects under `model/`), where they are
  in this bucket;
- list object names in the bucket. `storage.objects.list` is checked against the bucket, not against an object,
  so a condition on `resource.name.startsWith(".../objects/PREFIX")` never matches a list call and would deny
  every listing; the list grant is therefore its own binding, conditioned on `resource.type` being the bucket.
  Objects are never of that type, so it grants no reads: a worker sees names, not content, outside its prefixes.

Every grant ends at a boundary: an exact name (`==`) or a prefix ending in "/". Names are quoted as CEL string
literals by `cel_string`: CEL strings are code points, so a character outside the BMP must be one 8-digit
U-escape (JSON's surrogate pair for U+1F600 is two code points in CEL, or a parse error, and never matches). A gs://
store in another bucket is refused: no grant here would let the workers write there.

A compromised worker can thus neither rewrite the fleet.toml that every worker fetches at boot nor touch another
job's shards. Pure functions (no cdktf), so they are tested without a synth; infra/stacks.py renders them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from actfleet.config import Config
from actfleet.errors import ConfigError
from actfleet.infra.startup_script import config_object_name
from actfleet.store import join, parse_gs

LIST_ROLE = "roles/storage.objectViewer"
READ_ROLE = "roles/storage.objectViewer"
WRITE_ROLE = "roles/storage.objectUser"
BUCKET_TYPE = "storage.googleapis.com/Bucket"


@dataclass(frozen=True)
class Grant:
    name: str  # the construct id suffix: worker-<name>
    role: str
    title: str
    description: str
    expression: str


def _in_bucket(url: str, bucket: str) -> str | None:
    """The object name (or prefix) of a gs:// URL in `bucket`; None for another bucket or a non-gs URL."""
    if not url.startswith("gs://"):
        return None
    found, name = parse_gs(url)
    return name if found == bucket else None


def cel_string(text: str) -> str:
    """`text` as a CEL string literal of the same code points, in ASCII (the CEL spec's escapes)."""
    out = []
    for ch in text:
        n = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif 0x20 <= n < 0x7F:
            out.append(ch)
        elif n <= 0xFFFF:
            out.append(f"\\u{n:04x}")
        else:  # one code point: \U and 8 hex digits (never a surrogate pair)
            out.append(f"\\U{n:08x}")
    return '"' + "".join(out) + '"'


def _object(bucket: str, name: str) -> str:
    return f"projects/_/buckets/{bucket}/objects/{name}"


def object_condition(bucket: str, names: Sequence[str] = (), prefixes: Sequence[str] = ()) -> str:
    """Objects named exactly one of `names`, or under one of `prefixes` (each must end with "/")."""
    if any(not p.endswith("/") for p in prefixes):
        raise ValueError(f"a prefix grant must end at a boundary (a '/'): {list(prefixes)}")
    return " || ".join(
        [f"resource.name == {cel_string(_object(bucket, n))}" for n in names]
        + [f"resource.name.startsWith({cel_string(_object(bucket, p))})" for p in prefixes]
    )


def job_prefix(config: Config) -> str | None:
    """The object prefix the job's records and shards live under, with its trailing "/" (None: a store that is
    not gs://, e.g. a local directory in tests). ConfigError for a gs:// store in another bucket."""
    bucket = config.storage.bucket
    if config.job.store.startswith("gs://") and parse_gs(config.job.store)[0] != bucket:
        raise ConfigError(
            f'job.store = "{config.job.store}": not in storage.bucket "{bucket}"; the workers are granted '
            f"writes only in the fleet's bucket (docs/infrastructure.md, Permissions): use gs://{bucket}/PREFIX"
        )
    store = _in_bucket(config.job.store, bucket)
    return None if store is None else join(store, config.job.name) + "/"


def read_objects(config: Config) -> tuple[list[str], list[str]]:
    """(exact object names, "/"-ended prefixes) workers read besides their job: the config, the dataset (a gs://
    dataset is one file, actfleet.worker.sources), the model directory."""
    bucket = config.storage.bucket
    names = [config_object_name(config)]
    data = _in_bucket(config.job.input, bucket)
    if data:
        names.append(data)
    model = _in_bucket(config.job.options.model, bucket)
    return names, [model + "/"] if model else []


def worker_grants(config: Config) -> list[Grant]:
    bucket, config_name = config.storage.bucket, config_object_name(config)
    write = job_prefix(config)
    if write is not None and (config_name.startswith(write) or write.startswith(config_name)):
        raise ConfigError(
            f"job.name = {config.job.name!r} with job.store = {config.job.store!r}: the workers' "
            f"writable prefix gs://{bucket}/{write} would hold the fleet config "
            f"gs://{bucket}/{config_name}; choose another job name or store prefix"
        )
    grants = [
        Grant(
            "list",
            LIST_ROLE,
            "list object names",
            "storage.objects.list is checked on the bucket, never on an object name; objects are never of "
            "this type, so this grants no reads",
            f'resource.type == "{BUCKET_TYPE}"',
        ),
        Grant(
            "read",
            READ_ROLE,
            "read the config and the job inputs",
            "the fleet config, the dataset and the model files; nothing else is readable outside the job prefix",
            object_condition(bucket, *read_objects(config)),
        ),
    ]
    if write is not None:
        grants.append(
            Grant(
                "write",
                WRITE_ROLE,
                "write the job prefix",
                f"leases, worker records and shards of job {config.job.name!r} only",
                object_condition(bucket, prefixes=[write]),
            )
        )
    return grants
