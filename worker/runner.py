"""The device side of extraction: prepared units (worker/preparer.py) in, Batches of stored-token activations
out.

The model is a Flax NNX module (actfleet.worker.models) whose parameters are placed on a (data, model) mesh
(`make_mesh`): with `model_parallel` N its heads and MLP are split over N devices
(actfleet.worker.models.sharding.RULES) and the batch's rows over the rest. One jitted forward pass per batch
shape, and one gather per (shape, stored-token count) that keeps only the stored tokens, on the device, in
shard order; both are compiled ahead of time in a background thread (`precompile`: jit(...).lower(shapes)
.compile()), each exactly once per process.

`run_stream` runs prepared units back to back: each batch is dispatched before the previous one's results are
copied to the host, and the next unit's first batch before the previous unit's last one is collected, so
neither transfers, nor what the caller does with a Batch (shard writing, upload), nor unit boundaries drain
the device.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from actfleet import sites as site_names
from actfleet.errors import InputError
from actfleet.job_options import JobOptions
from actfleet.worker import batching, convert
from actfleet.worker.models import sharding
from actfleet.worker.preparer import Prepared
from actfleet.worker.samples import Batch, Sample
from actfleet.worker.shards import STORE_DTYPES


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
    return jax.make_mesh(
        (n // model_parallel, model_parallel),
        sharding.MESH_AXES,
        devices=devices,
        axis_types=(AxisType.Auto, AxisType.Auto),
    )


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


def _compile_loop(jobs: queue.SimpleQueue) -> None:
    """Compile lowered programs one at a time, in order (a gather's lowering needs its step compiled)."""
    while True:
        fut, lower = jobs.get()
        if fut.set_running_or_notify_cancel():
            try:
                fut.set_result(lower().compile())
            except BaseException as e:  # surfaces where the program is needed
                fut.set_exception(e)


@dataclass
class _Launched:
    """One dispatched batch: its device results (copying to the host) and where its stored tokens came from."""

    pb: batching.PlannedBatch
    take: np.ndarray  # flat indices of the stored tokens in the [rows * width] batch, in shard order
    sample_ids: np.ndarray
    token_ids: np.ndarray
    positions: np.ndarray
    real: int  # non-padding tokens of the batch
    source: tuple[np.ndarray, np.ndarray] | None  # context windows: (source rows, source positions)
    out: tuple = ()  # the gathered arrays on the device, one per site width
    stats: tuple = ()  # per site width: (sum, sum of squares, sum of squared norms, sum of norms[, Gram]) per site


class Runner:
    """The model's parameters on the mesh and its compiled programs, for one job's options and sites.
    `attn_block` is the attention kernel's block size (a tuning knob, not a job option)."""

    def __init__(
        self,
        options: JobOptions,
        family,
        config,
        model_dir: Path,
        sites: tuple[str, ...],
        *,
        model_ref: str,
        attn_block: int = 512,
    ):
        import jax
        import jax.numpy as jnp

        self.options, self.family, self.config, self.model_dir, self.sites = options, family, config, model_dir, sites
        self.model_ref = model_ref
        self.devices = jax.devices()  # every process's devices: the mesh spans the whole slice
        try:
            self.mesh = make_mesh(self.devices, options.model_parallel)
            self.rules = sharding.rules_for(config, options.model_parallel)
        except ValueError as e:
            raise InputError(f"model {model_ref}: {e}") from None
        compute = jnp.bfloat16 if options.compute_dtype == "bfloat16" else jnp.float32
        self._replicated = NamedSharding(self.mesh, PartitionSpec())
        self._batch_sharding = NamedSharding(self.mesh, sharding.partition_spec(("batch", None), self.rules))
        self.graphdef, self.params = self._load_params(compute)
        store = jnp.bfloat16 if options.store_dtype == "bfloat16" else jnp.float32
        # The gather returns one array per distinct site width (d_model, d_mlp, heads * head_dim), sites in
        # shard order within each: one transfer per width instead of one per site.
        widths: dict[int, list[str]] = {}
        for s in sites:
            widths.setdefault(config.site_width(site_names.parse(s)[1]), []).append(s)
        self._groups = tuple(tuple(g) for g in widths.values())

        # float32 means float32: without this, XLA runs float32 matrix products as TF32 on GPUs and as
        # single-pass bfloat16 on TPUs (measured on an H200: 1.3e-3 relative error against transformers).
        precision = "highest" if options.compute_dtype == "float32" else "default"
        graphdef, groups = self.graphdef, self._groups

        def step(params, token_ids, segment_ids, positions):
            model = nnx.merge(graphdef, params)
            with jax.default_matmul_precision(precision):
                acts = model(token_ids, segment_ids, positions, sites=sites, attn_block=attn_block)
            return {k: v.astype(store) for k, v in acts.items()}

        stats_mode = options.stats  # moments | gram | none (actfleet.worker.stats)

        def gather(acts, take, n):
            # On the device, before the copy to the host: only the stored tokens, already in shard order, the
            # sites of one width in one array.
            outs = tuple(jnp.stack([acts[s].reshape(-1, acts[s].shape[-1])[take] for s in group]) for group in groups)
            if stats_mode == "none":
                return outs, ()
            # The statistics of exactly the stored rows (the first n of the padded gather), from the values
            # already cast to the store dtype: float32 sums per batch, summed in float64 by the work loop.
            valid = (jnp.arange(take.shape[0]) < n)[None, :, None]
            stats = []
            for out in outs:
                x = jnp.where(valid, out.astype(jnp.float32), 0.0)
                sq = (x * x).sum(-1)
                part = (x.sum(1), (x * x).sum(1), sq.sum(1), jnp.sqrt(sq).sum(1))
                if stats_mode == "gram":
                    part += (jnp.einsum("snd,sne->sde", x, x, precision=jax.lax.Precision.HIGHEST),)
                stats.append(part)
            return outs, tuple(stats)

        self.step = jax.jit(step)
        # Replicated: every host gets whole vectors, whether the mesh spans hosts or the model is split
        # (the local piece of a sharded result would be a slice of each vector).
        self._gather = jax.jit(gather, out_shardings=self._replicated)
        # Compiled programs by shape (futures: compiled ahead in one background thread, see `precompile`).
        self._programs: dict[tuple, Future] = {}
        self._programs_lock = threading.Lock()
        self._compile_queue: queue.SimpleQueue = queue.SimpleQueue()
        # A daemon thread: a process that is exiting (SIGTERM's drain) never waits for a compilation.
        threading.Thread(target=_compile_loop, args=(self._compile_queue,), name="compile", daemon=True).start()

    @property
    def data_devices(self) -> int:
        """Devices the batch's rows are split over (a batch's row count is a multiple of it)."""
        return self.mesh.shape["data"]

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

    def put_batch(self, host_array: np.ndarray):
        """One host batch array [rows, width] onto the devices: rows split over the mesh's data axis,
        replicated over its model axis (every process holds it whole)."""
        return place_global(host_array, self._batch_sharding)

    # -- streaming -----------------------------------------------------------------------------------

    def run_stream(self, units: Iterable[Prepared]) -> Iterator[tuple[int, Batch]]:
        """(unit index, Batch) for prepared units in order: every input row of a unit is stored in one of its
        batches or listed as skipped in its first. The next unit is taken from `units` (and its first batch
        dispatched) before the previous unit's last batch is collected."""
        pending = None  # (unit index, launched, skipped, truncated, seen)
        for k, prep in enumerate(units):
            seen: set[int] = set()  # context windows: input rows already counted in a batch of this unit
            first = True
            for pb, n in zip(prep.plan, prep.stored):
                launched = self._launch(pb, prep.samples, n)
                if pending is not None:
                    yield pending[0], self._collect(*pending[1:])
                pending = (
                    k,
                    launched,
                    prep.skipped if first else {},
                    prep.truncated if first else 0,
                    seen if prep.windows else None,
                )
                first = False
            if first and prep.n_rows:  # nothing to compute, but rows to account for
                if pending is not None:
                    yield pending[0], self._collect(*pending[1:])
                    pending = None
                yield k, self.empty_batch(prep.skipped, prep.truncated)
        if pending is not None:
            yield pending[0], self._collect(*pending[1:])

    def run(self, prep: Prepared) -> Iterator[Batch]:
        """One prepared unit's Batches."""
        return (batch for _, batch in self.run_stream([prep]))

    # -- compiled programs ----------------------------------------------------------------------------

    def precompile(self, prep: Prepared) -> None:
        """Queue, to the background compile thread, the programs this unit's plan needs that are not compiled."""
        for pb, n in zip(prep.plan, prep.stored):
            self._programs_for(pb.shape, n, wait=False)

    @staticmethod
    def _gather_len(shape: tuple[int, int], stored: int) -> int:
        # The gather is padded to a power of two so its shapes (and compilations) stay few.
        return min(shape[0] * shape[1], max(256, batching.next_pow2(stored)))

    def _programs_for(self, shape: tuple[int, int], stored: int, *, wait: bool = True):
        """(step, gather) compiled for this batch shape and stored-token count: compiled ahead of time in the
        background thread (wait=False only queues them), each exactly once per process."""
        step = self._compile(("step", shape), lambda: self._lower_step(shape))
        take = self._gather_len(shape, stored)
        gather = self._compile(("gather", shape, take), lambda: self._lower_gather(step.result(), take))
        return (step.result(), gather.result()) if wait else None

    def _compile(self, key: tuple, lower) -> Future:
        with self._programs_lock:
            fut = self._programs.get(key)
            if fut is None:
                fut = self._programs[key] = Future()
                self._compile_queue.put((fut, lower))
        return fut

    def _lower_step(self, shape):
        import jax

        batch = jax.ShapeDtypeStruct(shape, np.int32, sharding=self._batch_sharding)
        return self.step.lower(self.params, batch, batch, batch)

    def _lower_gather(self, step, take: int):
        import jax

        return self._gather.lower(
            step.out_info,
            jax.ShapeDtypeStruct((take,), np.int32, sharding=self._replicated),
            jax.ShapeDtypeStruct((), np.int32, sharding=self._replicated),
        )

    # -- one batch ------------------------------------------------------------------------------------

    def _launch(self, pb: batching.PlannedBatch, samples: list[Sample], stored: int) -> _Launched:
        """Build the host arrays for one planned batch and dispatch it (the results stay device futures)."""
        r, p = pb.shape
        token_ids = np.zeros((r, p), np.int32)
        segment_ids = np.zeros((r, p), np.int32)  # 0 = padding; a padding token attends only to padding
        positions = np.tile(np.arange(p, dtype=np.int32), (r, 1))
        for row, members in enumerate(pb.rows):
            at = 0
            for seg, i in enumerate(members, start=1):
                ids = samples[i].token_ids
                token_ids[row, at : at + len(ids)] = ids
                segment_ids[row, at : at + len(ids)] = seg
                positions[row, at : at + len(ids)] = np.arange(len(ids))
                at += len(ids)
            positions[row, at:] = np.arange(p - at)  # padding counts from its own start
        step, gather = self._programs_for(pb.shape, stored)
        put = self.put_batch
        acts = step(self.params, put(token_ids), put(segment_ids), put(positions))
        launched = self._stored_index(pb, samples)
        padded = self._gather_len(pb.shape, stored)
        take = np.pad(launched.take, (0, padded - len(launched.take))).astype(np.int32)
        count = place_global(np.asarray(len(launched.take), np.int32), self._replicated)
        launched.out, launched.stats = gather(acts, place_global(take, self._replicated), count)
        for o in (*launched.out, *(a for part in launched.stats for a in part)):
            o.copy_to_host_async()  # overlaps the transfer with the next batch's compute
        return launched

    @staticmethod
    def _stored_index(pb: batching.PlannedBatch, samples: list[Sample]) -> _Launched:
        """Where the stored tokens sit in the flattened [rows * width] batch, sorted by (sample, position)."""
        r, p = pb.shape
        flat, sids, toks, poss, srows, spos = [], [], [], [], [], []
        real = 0
        for row, members in enumerate(pb.rows):
            at = row * p
            for i in members:
                s = samples[i]
                idx = np.nonzero(s.store_mask)[0]
                flat.append(at + idx)
                sids.append(np.full(len(idx), s.sample_id, np.int64))
                toks.append(s.token_ids[idx])
                poss.append(idx.astype(np.int32))
                if s.source_rows is not None:  # a context window: where each token came from
                    srows.append(s.source_rows[idx])
                    spos.append(s.source_positions[idx])
                at += len(s)
                real += len(s)
        sample_ids = np.concatenate(sids)
        positions = np.concatenate(poss)
        order = np.lexsort((positions, sample_ids))
        source = (np.concatenate(srows)[order], np.concatenate(spos)[order]) if srows else None
        return _Launched(
            pb,
            np.concatenate(flat)[order],
            sample_ids[order],
            np.concatenate(toks)[order],
            positions[order],
            real,
            source,
        )

    def _collect(self, launched: _Launched, skipped: dict[int, str], truncated: int, seen: set | None) -> Batch:
        r, p = launched.pb.shape
        n = len(launched.take)
        acts = {}
        # Per site width, [sites, padded, width]; the first n rows of each site are the stored tokens.
        for group, out in zip(self._groups, launched.out):
            host = fetch_whole(out)
            acts.update({site: host[i, :n] for i, site in enumerate(group)})
        stats = None
        if launched.stats:
            from actfleet.worker.stats import SiteStats

            stats = {}
            for group, part in zip(self._groups, launched.stats):
                arrays = [fetch_whole(a).astype(np.float64) for a in part]
                for i, site in enumerate(group):
                    gram = arrays[4][i] if len(arrays) > 4 else None
                    stats[site] = SiteStats(
                        n, arrays[0][i], arrays[1][i], float(arrays[2][i]), float(arrays[3][i]), gram
                    )
        if seen is None:
            members = sum(len(m) for m in launched.pb.rows)
        else:  # windows: an input row counts in the first batch of its unit that stores one of its tokens
            new = set(np.unique(launched.source[0]).tolist()) - seen
            seen |= new
            members = len(new)
        source = launched.source
        return Batch(
            token_ids=launched.token_ids,
            sample_ids=launched.sample_ids,
            positions=launched.positions,
            acts=acts,
            rows=members + len(skipped),
            computed_tokens=r * p,
            padded_tokens=r * p - launched.real,
            truncated=truncated,
            skipped=dict(skipped),
            source_rows=None if source is None else source[0],
            source_positions=None if source is None else source[1],
            stats=stats,
        )

    def empty_batch(self, skipped: dict[int, str], truncated: int) -> Batch:
        """A unit's accounting when nothing in it is computed (every row skipped)."""
        dtype = STORE_DTYPES[self.options.store_dtype]
        windows = bool(self.options.context_size)
        return Batch(
            token_ids=np.zeros(0, np.int32),
            sample_ids=np.zeros(0, np.int64),
            positions=np.zeros(0, np.int32),
            acts={s: np.zeros((0, self.config.site_width(site_names.parse(s)[1])), dtype) for s in self.sites},
            rows=len(skipped),
            truncated=truncated,
            skipped=dict(skipped),
            source_rows=np.zeros(0, np.int64) if windows else None,
            source_positions=np.zeros(0, np.int32) if windows else None,
        )
