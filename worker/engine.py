"""The extraction engine: rendered text rows in, Batches of stored-token activations out.

    engine = Engine(JobOptions(model="path/to/model", sites=("blocks.6.hook_resid_post",)))
    for batch in engine.run([(0, "some text", None), (1, None, "bad json"), ...]):
        batch.token_ids, batch.sample_ids, batch.positions, batch.acts["blocks.6.hook_resid_post"]

One `run` call: tokenize every row, apply the long-input policy, plan the packing (actfleet.worker.batching, a pure
function of the row list), then stream the batches through one jitted forward pass per shape. The next
batch is dispatched before the previous one's results are copied to the host, so transfer and whatever the
caller does with a Batch (shard writing, upload) overlap with compute. The model is a Flax NNX module
(actfleet.worker.models) whose parameters are placed on a (data, model) mesh (`make_mesh`): with
`model_parallel` N its heads and MLP are split over N devices (actfleet.worker.models.sharding.RULES) and the
batch's rows over the rest.

Determinism: the stored bits for a sample depend only on the rows given to one `run` call (the packing plan
is a pure function of them); the same rows give the same bits.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from actfleet import sites as site_names
from actfleet.errors import InputError
from actfleet.job_options import JobOptions
from actfleet.worker import batching, convert, model_files
from actfleet.worker.models import family_for, sharding
from actfleet.worker.shards import STORE_DTYPES

Row = tuple[int, "str | None", "str | None"]


@dataclass
class Batch:
    """Stored tokens of some samples, sorted by (sample_id, position), plus counters."""

    token_ids: np.ndarray  # int32 [n]
    sample_ids: np.ndarray  # int64 [n]
    positions: np.ndarray  # int32 [n]
    acts: dict[str, np.ndarray]  # site -> [n, d] in the store dtype
    rows: int = 0  # input rows accounted for by this batch (stored here, or skipped)
    computed_tokens: int = 0  # batch shape's tokens, padding included
    padded_tokens: int = 0
    truncated: int = 0
    skipped: dict[int, str] = field(default_factory=dict)  # sample_id -> reason

    @property
    def stored_tokens(self) -> int:
        return len(self.sample_ids)


def make_mesh(devices, model_parallel: int):
    """A (data, model) mesh over `devices`: `model_parallel` devices hold one copy of the model between them
    (its heads and MLP split over them), and len(devices) / model_parallel such groups split the batch.
    ValueError when model_parallel does not divide the device count."""
    import jax
    from jax.sharding import AxisType

    n = len(devices)
    if model_parallel < 1 or n % model_parallel:
        raise ValueError(f"model_parallel {model_parallel} must divide the number of devices ({n})")
    # jax.make_mesh orders the devices along the physical topology (the model axis on the nearest chips).
    return jax.make_mesh((n // model_parallel, model_parallel), sharding.MESH_AXES, devices=devices,
                         axis_types=(AxisType.Auto, AxisType.Auto))


def enable_compilation_cache() -> str:
    """Turn on JAX's persistent compilation cache so a restarted worker does not recompile."""
    import jax

    path = os.environ.get("ACTFLEET_JAX_CACHE") or str(Path.home() / ".cache" / "actfleet" / "jax")
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def place_global(host: np.ndarray, sharding):
    """A host array that every process of the program holds whole (each host reads the same rows) as one
    global jax.Array: each process places only its own devices' slices, so nothing crosses hosts."""
    import jax

    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def fetch_whole(out) -> np.ndarray:
    """The host copy of a result computed replicated (out_shardings = PartitionSpec()): whole vectors, read
    from this process's own device. Refuses anything else: a sharded result's local piece is a slice of each
    vector (the system we replace stored 448-wide halves of an 896-wide model that way)."""
    if not out.is_fully_replicated:
        raise RuntimeError(f"fetch_whole: result sharded as {out.sharding}; gather it replicated first")
    host = np.asarray(out.addressable_data(0))
    if host.shape != out.shape:
        raise RuntimeError(f"fetch_whole: local copy {host.shape} is not the whole result {out.shape}")
    return host


class Engine:
    """Loads the model (options.model at options.revision) and tokenizer once; `run` extracts any number of row
    lists with them. The reading options (format, fields, ARC augmentation) and shard_mb are not its business.
    `attn_block` is the attention kernel's block size (a tuning knob, not a job option)."""

    def __init__(self, options: JobOptions, *, attn_block: int = 512, model_dir: Path | None = None):
        import jax
        import jax.numpy as jnp
        from transformers import AutoTokenizer

        enable_compilation_cache()
        self.options = options
        model_ref = options.model
        self.model_ref, self.revision = model_ref, options.revision
        # A fleet worker passes the directory it checked against the job's pin (worker/pinning.py).
        self.model_dir = model_dir or model_files.resolve(model_ref, revision=options.revision)
        hf_config = json.loads((self.model_dir / "config.json").read_text())
        self.family = family_for(hf_config["model_type"])
        try:
            self.config = self.family.Config.from_hf(hf_config)
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"model {model_ref}: config.json lacks or garbles {e}") from None
        self.random_weights = bool(hf_config.get("actfleet_random_weights", False))
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        except Exception as e:  # tokenizers/transformers raise many types for a corrupt tokenizer
            raise InputError(f"model {model_ref}: the tokenizer does not load ({type(e).__name__}: {e})") from None
        try:
            self.sites = site_names.resolve(options.sites, self.config.layers)
        except ValueError as e:
            raise InputError(f"model {model_ref}: {e}") from None
        if not self.sites:
            raise InputError("no capture sites given")
        self.max_seq = options.max_seq or self.config.max_pos
        special = set(self.tokenizer.all_special_ids)
        if self.tokenizer.bos_token_id is not None:
            special.add(self.tokenizer.bos_token_id)
        self.special_ids = np.array(sorted(special), dtype=np.int32)

        self.devices = jax.devices()  # every process's devices: the mesh spans the whole slice
        try:
            self.mesh = make_mesh(self.devices, options.model_parallel)
            self.rules = sharding.rules_for(self.config, options.model_parallel)
        except ValueError as e:
            raise InputError(f"model {model_ref}: {e}") from None
        compute = jnp.bfloat16 if options.compute_dtype == "bfloat16" else jnp.float32
        self._replicated = NamedSharding(self.mesh, PartitionSpec())
        self.graphdef, self.params = self._load_params(compute)
        store = jnp.bfloat16 if options.store_dtype == "bfloat16" else jnp.float32
        # The gather returns one array per distinct site width (d_model, d_mlp, heads * head_dim), sites in
        # shard order within each: one transfer per width instead of one per site.
        widths: dict[int, list[str]] = {}
        for s in self.sites:
            widths.setdefault(self.config.site_width(site_names.parse(s)[1]), []).append(s)
        self._groups = tuple(tuple(g) for g in widths.values())

        # float32 means float32: without this, XLA runs float32 matrix products as TF32 on GPUs and as
        # single-pass bfloat16 on TPUs (measured on an H200: 1.3e-3 relative error against transformers).
        precision = "highest" if options.compute_dtype == "float32" else "default"
        graphdef, sites = self.graphdef, self.sites

        def step(params, token_ids, segment_ids, positions):
            model = nnx.merge(graphdef, params)
            with jax.default_matmul_precision(precision):
                acts = model(token_ids, segment_ids, positions, sites=sites, attn_block=attn_block)
            return {k: v.astype(store) for k, v in acts.items()}

        def gather(acts, take):
            # On the device, before the copy to the host: only the stored tokens, already in shard order, the
            # sites of one width in one array.
            return tuple(jnp.stack([acts[s].reshape(-1, acts[s].shape[-1])[take] for s in group])
                         for group in self._groups)

        self._step = jax.jit(step)
        # Replicated: every host gets whole vectors, whether the mesh spans hosts or the model is split
        # (the local piece of a sharded result would be a slice of each vector).
        self._gather = jax.jit(gather, out_shardings=self._replicated)

    def _load_params(self, dtype):
        """The model's graph and its parameters, each loaded from the checkpoint straight into its shards on
        the mesh (logical axes -> mesh axes by self.rules). Built under nnx.eval_shape: nothing is allocated
        before the checkpoint's values arrive."""
        n_layers = site_names.layers_needed(self.sites)
        abstract = nnx.eval_shape(lambda: self.family.Decoder(self.config, n_layers, dtype))
        graphdef, abstract_state = nnx.split(abstract)

        def placement(variable):
            return NamedSharding(self.mesh, sharding.partition_spec(sharding.logical_axes(variable), self.rules))

        try:
            return graphdef, convert.load_state(self.model_dir, self.config, abstract_state, placement)
        except convert.CheckpointError as e:
            raise InputError(f"model {self.model_ref}: {e}") from None

    def _batch_sharding(self):
        """Rows of a batch split over the mesh's data axis, replicated over its model axis."""
        return NamedSharding(self.mesh, sharding.partition_spec(("batch", None), self.rules))

    def _put_batch(self, host_array: np.ndarray):
        """One host batch array [rows, width] onto the devices (every process holds it whole)."""
        return place_global(host_array, self._batch_sharding())

    def _to_host(self, out) -> list[np.ndarray]:
        """The gathered arrays (one per site width, replicated) as whole numpy arrays."""
        return [fetch_whole(o) for o in out]

    # ------------------------------------------------------------------------------------------------

    def tokenize(self, texts: list[str]) -> list[np.ndarray]:
        if not texts:
            return []
        enc = self.tokenizer(texts, add_special_tokens=True)["input_ids"]
        return [np.asarray(ids, dtype=np.int32) for ids in enc]

    def _store_mask(self, ids: np.ndarray) -> np.ndarray:
        if self.options.positions == "all":
            return np.ones(len(ids), bool)
        if self.options.positions == "last":
            mask = np.zeros(len(ids), bool)
            mask[-1] = True
            return mask
        return ~np.isin(ids, self.special_ids)

    def run(self, rows: Iterable[Row]) -> Iterator[Batch]:
        """Extract the rows; yields Batches (every input row is stored in one batch or listed as skipped)."""
        rows = list(rows)
        todo = [(sid, text) for sid, text, reason in rows if not reason]
        ids = iter(self.tokenize([t if isinstance(t, str) else "" for _, t in todo]))
        return self.run_tokens([(sid, None, reason) if reason else (sid, next(ids), None) for sid, _, reason in rows])

    def run_tokens(self, rows: Iterable[tuple[int, "np.ndarray | None", "str | None"]]) -> Iterator[Batch]:
        """`run` on already tokenized rows: (sample_id, token ids, skip_reason)."""
        skipped: dict[int, str] = {}
        truncated = 0
        seqs: list[tuple[int, np.ndarray, np.ndarray]] = []  # (sample_id, token ids, store mask)
        n_rows = 0
        for sid, ids, reason in rows:
            n_rows += 1
            if reason:
                skipped[sid] = reason
                continue
            ids = np.asarray(ids, dtype=np.int32)
            if len(ids) == 0:
                skipped[sid] = "empty text"
                continue
            if len(ids) > self.max_seq:
                if self.options.long_inputs == "skip":
                    skipped[sid] = f"longer than max_seq ({self.max_seq} tokens)"
                    continue
                ids, truncated = ids[: self.max_seq], truncated + 1
            mask = self._store_mask(ids)
            if not mask.any():
                skipped[sid] = "no tokens to store (all special)"
                continue
            seqs.append((sid, ids, mask))
        return self._batches(seqs, skipped, truncated, n_rows)

    def _batches(self, seqs, skipped, truncated, n_rows) -> Iterator[Batch]:
        planned = batching.plan([len(s[1]) for s in seqs], batch_tokens=self.options.batch_tokens,
                                n_devices=self.mesh.shape["data"])
        first = True
        pending = None
        for pb in planned:
            launched = self._launch(pb, seqs)
            if pending is not None:
                yield self._collect(*pending)
            pending = (launched, pb, seqs, skipped if first else {}, truncated if first else 0)
            first = False
        if pending is not None:
            yield self._collect(*pending)
        elif n_rows:
            yield self._empty_batch(skipped, truncated)

    def _launch(self, pb: batching.PlannedBatch, seqs):
        """Build the host arrays for one planned batch and dispatch it (returns device futures)."""
        import jax

        r, p = pb.shape
        token_ids = np.zeros((r, p), np.int32)
        segment_ids = np.zeros((r, p), np.int32)  # 0 = padding; a padding token attends only to padding
        positions = np.tile(np.arange(p, dtype=np.int32), (r, 1))
        for row, members in enumerate(pb.rows):
            at = 0
            for seg, i in enumerate(members, start=1):
                ids = seqs[i][1]
                token_ids[row, at: at + len(ids)] = ids
                segment_ids[row, at: at + len(ids)] = seg
                positions[row, at: at + len(ids)] = np.arange(len(ids))
                at += len(ids)
            positions[row, at:] = np.arange(p - at)  # padding counts from its own start
        put = self._put_batch
        acts = self._step(self.params, put(token_ids), put(segment_ids), put(positions))
        index = self._stored_index(pb, seqs)
        take = index[0]
        # Pad the gather to a power of two so its shapes (and compilations) stay few.
        padded = min(r * p, max(256, 1 << (len(take) - 1).bit_length()))
        out = self._gather(acts, place_global(np.pad(take, (0, padded - len(take))).astype(np.int32),
                                              self._replicated))
        for o in out:
            o.copy_to_host_async()  # overlaps the transfer with the next batch's compute
        return out, index

    def _stored_index(self, pb: batching.PlannedBatch, seqs):
        """Where the stored tokens sit in the flattened [rows * width] batch, sorted by (sample, position)."""
        r, p = pb.shape
        flat, sids, toks, poss = [], [], [], []
        real = 0
        for row, members in enumerate(pb.rows):
            at = row * p
            for i in members:
                sid, ids, mask = seqs[i]
                idx = np.nonzero(mask)[0]
                flat.append(at + idx)
                sids.append(np.full(len(idx), sid, np.int64))
                toks.append(ids[idx])
                poss.append(idx.astype(np.int32))
                at += len(ids)
                real += len(ids)
        sample_ids = np.concatenate(sids)
        positions = np.concatenate(poss)
        order = np.lexsort((positions, sample_ids))
        return np.concatenate(flat)[order], sample_ids[order], np.concatenate(toks)[order], positions[order], real

    def _collect(self, launched, pb: batching.PlannedBatch, seqs, skipped, truncated) -> Batch:
        out, (take, sample_ids, token_ids, positions, real) = launched
        r, p = pb.shape
        acts = {}
        # Per site width, [sites, padded, width]; the first len(take) rows of each site are the stored tokens.
        for group, host in zip(self._groups, self._to_host(out)):
            acts.update({site: host[i, : len(take)] for i, site in enumerate(group)})
        members = sum(len(m) for m in pb.rows)
        return Batch(token_ids=token_ids, sample_ids=sample_ids, positions=positions,
                     acts=acts, rows=members + len(skipped), computed_tokens=r * p, padded_tokens=r * p - real,
                     truncated=truncated, skipped=dict(skipped))

    def _empty_batch(self, skipped, truncated) -> Batch:
        dtype = STORE_DTYPES[self.options.store_dtype]
        return Batch(token_ids=np.zeros(0, np.int32), sample_ids=np.zeros(0, np.int64), positions=np.zeros(0, np.int32),
                     acts={s: np.zeros((0, self.config.site_width(site_names.parse(s)[1])), dtype) for s in self.sites}, rows=len(skipped), truncated=truncated,
                     skipped=dict(skipped))
