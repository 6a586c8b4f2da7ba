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

`prepare` does the host-side part of a run (tokenize, policy, plan) and queues, to a background compile
thread, the programs its plan needs that are not compiled yet (ahead of time: jit(...).lower(shapes).compile());
`run_stream` runs prepared units back to back, dispatching the next unit's first batch before the previous
unit's last one is collected, so the device does not drain at unit boundaries. Callers prepare unit u+1
while unit u computes.

Determinism: the stored bits for a sample depend only on the rows given to one `run` call (the packing plan
is a pure function of them); the same rows give the same bits.

Context windows (options.context_size N > 0, docs/jobs.md): the rows of one `run` call are tokenized without
special tokens, joined (separator, BOS at each window start) and cut into windows of exactly N tokens, as
SAELens's concat_and_batch_sequences does; each window is a sample (sample id = first row of the call * 2**20
+ window number), and its Batch carries per stored token the source row and the position in that row
(-1 for an inserted BOS or separator). Windows never span two `run` calls (two units); a call's final
partial window is dropped, as SAELens drops the stream's.
"""

from __future__ import annotations

import json
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from actfleet import sites as site_names
from actfleet.errors import InputError
from actfleet.job_options import JobOptions
from actfleet.worker import batching, compile_cache, convert, model_files
from actfleet.worker.models import family_for, sharding
from actfleet.worker.models.config_check import UnsupportedConfig
from actfleet.worker.shards import STORE_DTYPES

Row = tuple[int, "str | list[int] | None", "str | None"]  # (sample id, text or token ids, skip reason)
WINDOW_ID_BITS = 20  # window sample id = first row of the unit << 20 | window number within the unit


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
    skipped: dict[int, str] = field(default_factory=dict)  # sample_id (input row) -> reason
    source_rows: np.ndarray | None = None  # int64 [n], context windows only: the input row of each token
    source_positions: np.ndarray | None = None  # int32 [n]: its position in that row (-1: inserted BOS/separator)

    @property
    def stored_tokens(self) -> int:
        return len(self.sample_ids)


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


@dataclass
class Prepared:
    """A row list made ready to run: tokenized, long-input policy applied, packing planned (Engine.prepare)."""

    seqs: list  # (sample_id, token ids, store mask)
    skipped: dict[int, str]
    truncated: int
    n_rows: int
    plan: list  # of batching.PlannedBatch
    stored: list[int]  # stored tokens per planned batch
    seen: set = field(default_factory=set)  # context windows: input rows already counted in a batch


def _load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _in_thread(fn, *args) -> Future:
    """fn(*args) in a daemon thread; its result or exception comes out of the Future."""
    fut: Future = Future()

    def target():
        try:
            fut.set_result(fn(*args))
        except BaseException as e:
            fut.set_exception(e)

    threading.Thread(target=target, name=fn.__name__, daemon=True).start()
    return fut


def _compile_loop(jobs: queue.SimpleQueue) -> None:
    """Compile lowered programs one at a time, in order (a gather's lowering needs its step compiled)."""
    while True:
        fut, lower = jobs.get()
        if fut.set_running_or_notify_cancel():
            try:
                fut.set_result(lower().compile())
            except BaseException as e:  # surfaces where the program is needed
                fut.set_exception(e)


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
        from actfleet.worker.hf_logging import quiet_transformers

        quiet_transformers()  # before transformers is imported
        import jax
        import jax.numpy as jnp

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
        tokenizer = _in_thread(_load_tokenizer, self.model_dir)
        try:
            self.sites = site_names.resolve(options.sites, self.config.layers)
            if hasattr(self.config, "check_sites"):  # a family without some site kinds (GPT-NeoX's resid_mid)
                self.config.check_sites(self.sites)
        except ValueError as e:
            raise InputError(f"model {model_ref}: {e}") from None
        if not self.sites:
            raise InputError("no capture sites given")
        self.max_seq = options.max_seq or self.config.max_pos

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
        # Compiled programs by shape (futures: compiled ahead in one background thread, see `prepare`).
        self._programs: dict[tuple, Future] = {}
        self._programs_lock = threading.Lock()
        self._compile_queue: queue.SimpleQueue = queue.SimpleQueue()
        # A daemon thread: a process that is exiting (SIGTERM's drain) never waits for a compilation.
        threading.Thread(target=_compile_loop, args=(self._compile_queue,), name="compile", daemon=True).start()

        try:
            self.tokenizer = tokenizer.result()
        except Exception as e:  # tokenizers/transformers raise many types for a corrupt tokenizer
            raise InputError(f"model {model_ref}: the tokenizer does not load ({type(e).__name__}: {e})") from None
        special = set(self.tokenizer.all_special_ids)
        if self.tokenizer.bos_token_id is not None:
            special.add(self.tokenizer.bos_token_id)
        self.special_ids = np.array(sorted(special), dtype=np.int32)


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

    def tokenize(self, texts: list[str], add_special_tokens: bool = True) -> list[np.ndarray]:
        if not texts:
            return []
        enc = self.tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
        return [np.asarray(ids, dtype=np.int32) for ids in enc]

    def token_rows(self, rows: list[Row], add_special_tokens: bool = True) -> list[tuple]:
        """(sample id, token ids | None, reason): texts tokenized in one call; pre-tokenized rows (lists of ids,
        options.tokens_field) checked against the vocabulary (InputError naming the row and field)."""
        texts = [t for _, t, reason in rows if not reason and isinstance(t, str)]
        enc = iter(self.tokenize(texts, add_special_tokens))
        out = []
        for sid, t, reason in rows:
            if reason:
                out.append((sid, None, reason))
            elif isinstance(t, str):
                out.append((sid, next(enc), None))
            else:
                ids = np.asarray(t, dtype=np.int64)
                bad = np.nonzero((ids < 0) | (ids >= (self.vocab_size or 1 << 31)))[0]
                if len(bad):
                    raise InputError(f"row {sid}: field {self.options.tokens_field!r} holds token id {ids[bad[0]]}, "
                                     f"outside the model's vocabulary (0..{self.vocab_size - 1})")
                out.append((sid, ids.astype(np.int32), None))
        return out

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
        return self.run_prepared(self.prepare(rows))

    def run_tokens(self, rows: Iterable[tuple[int, "np.ndarray | None", "str | None"]]) -> Iterator[Batch]:
        """`run` on already tokenized rows: (sample_id, token ids, skip_reason)."""
        return self.run_prepared(self.prepare_tokens(rows))

    def run_prepared(self, prepared: Prepared) -> Iterator[Batch]:
        return (batch for _, batch in self.run_stream([prepared]))

    def prepare(self, rows: Iterable[Row]) -> Prepared:
        """The host side of `run` (tokenize, policy, plan); queues the compilation of what the plan needs."""
        rows = list(rows)
        if self.options.context_size:
            return self.prepare_windows(self.token_rows(rows, add_special_tokens=False))
        return self.prepare_tokens(self.token_rows(rows))

    def prepare_tokens(self, rows: Iterable[tuple[int, "np.ndarray | None", "str | None"]]) -> Prepared:
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
        return self._prepared(seqs, skipped, truncated, n_rows)

    def prepare_windows(self, rows: list[tuple[int, "np.ndarray | None", "str | None"]]) -> Prepared:
        o, tok = self.options, self.tokenizer
        # A tokenizer without a BOS token (Qwen2's) uses EOS for it, as TransformerLens (and so SAELens) does.
        bos_id = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        bos = bos_id if o.prepend_bos else None
        if o.prepend_bos and bos is None:
            raise InputError("--prepend-bos: the tokenizer has no BOS (nor EOS) token; pass --no-prepend-bos")
        sep = {"eos": tok.eos_token_id, "bos": bos_id, "none": None}[o.separator]
        if o.separator != "none" and sep is None:
            raise InputError(f"--separator {o.separator}: the tokenizer has no {o.separator.upper()} token; pass "
                             f"--separator none or another")
        if bos is not None and o.context_size < 2:
            raise InputError("--context-size 1 with --prepend-bos leaves no room for text: use 2 or more")
        docs, skipped = [], {}
        for sid, ids, reason in rows:
            if reason:
                skipped[sid] = reason
            elif ids is None or len(ids) == 0:
                skipped[sid] = "empty text"
            else:
                docs.append((sid, np.asarray(ids, np.int32)))
        windows = cut_windows(docs, o.context_size, bos=bos, sep=sep, concat=o.concat)
        base = rows[0][0] << WINDOW_ID_BITS if rows else 0
        if len(windows) >= 1 << WINDOW_ID_BITS:
            raise InputError(f"{len(windows)} context windows in one unit: use a smaller unit (--unit-rows)")
        seqs, stored = [], set()
        for k, (ids, src_rows, src_pos) in enumerate(windows):
            mask = self._store_mask(ids)
            stored.update(np.unique(src_rows[mask]).tolist())
            if mask.any():
                seqs.append((base + k, ids, mask, src_rows, src_pos))
        in_windows = set()
        for _, src_rows, _ in windows:
            in_windows.update(np.unique(src_rows).tolist())
        for sid, _ in docs:
            if sid not in stored:
                skipped[sid] = ("no stored token in its windows" if sid in in_windows else
                                "only in the unit's final partial window" if o.concat else
                                f"shorter than the context size ({o.context_size} tokens)")
        return self._prepared(seqs, skipped, 0, len(rows))

    def _prepared(self, seqs, skipped, truncated, n_rows) -> Prepared:
        planned = batching.plan([len(s[1]) for s in seqs], batch_tokens=self.options.batch_tokens,
                                n_devices=self.mesh.shape["data"])
        stored = [sum(int(seqs[i][2].sum()) for row in pb.rows for i in row) for pb in planned]
        for pb, n in zip(planned, stored):
            self._programs_for(pb.shape, n, wait=False)
        return Prepared(seqs, skipped, truncated, n_rows, planned, stored)

    def run_stream(self, units: Iterable[Prepared]) -> Iterator[tuple[int, Batch]]:
        """(unit index, Batch) for prepared units in order, as `run` would yield them unit by unit. The next
        unit is taken from `units` (and its first batch dispatched) before the previous unit's last batch
        is collected."""
        pending = None
        for k, prep in enumerate(units):
            first = True
            for pb, n in zip(prep.plan, prep.stored):
                launched = self._launch(pb, prep.seqs, n)
                if pending is not None:
                    yield pending[0], self._collect(*pending[1:])
                pending = (k, launched, pb, prep.seqs, prep.skipped if first else {},
                           prep.truncated if first else 0, prep.seen)
                first = False
            if first and prep.n_rows:  # nothing to compute, but rows to account for
                if pending is not None:
                    yield pending[0], self._collect(*pending[1:])
                    pending = None
                yield k, self._empty_batch(prep.skipped, prep.truncated)
        if pending is not None:
            yield pending[0], self._collect(*pending[1:])

    # -- compiled programs ----------------------------------------------------------------------------

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

        batch = jax.ShapeDtypeStruct(shape, np.int32, sharding=self._batch_sharding())
        return self._step.lower(self.params, batch, batch, batch)

    def _lower_gather(self, step, take: int):
        import jax

        return self._gather.lower(step.out_info, jax.ShapeDtypeStruct((take,), np.int32, sharding=self._replicated))

    def _launch(self, pb: batching.PlannedBatch, seqs, stored: int):
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
        step, gather = self._programs_for(pb.shape, stored)
        put = self._put_batch
        acts = step(self.params, put(token_ids), put(segment_ids), put(positions))
        index = self._stored_index(pb, seqs)
        take = index[0]
        padded = self._gather_len(pb.shape, stored)
        out = gather(acts, place_global(np.pad(take, (0, padded - len(take))).astype(np.int32), self._replicated))
        for o in out:
            o.copy_to_host_async()  # overlaps the transfer with the next batch's compute
        return out, index

    def _stored_index(self, pb: batching.PlannedBatch, seqs):
        """Where the stored tokens sit in the flattened [rows * width] batch, sorted by (sample, position)."""
        r, p = pb.shape
        flat, sids, toks, poss, srows, spos = [], [], [], [], [], []
        real = 0
        for row, members in enumerate(pb.rows):
            at = row * p
            for i in members:
                sid, ids, mask = seqs[i][:3]
                idx = np.nonzero(mask)[0]
                flat.append(at + idx)
                sids.append(np.full(len(idx), sid, np.int64))
                toks.append(ids[idx])
                poss.append(idx.astype(np.int32))
                if len(seqs[i]) == 5:  # a context window: where each token came from
                    srows.append(seqs[i][3][idx])
                    spos.append(seqs[i][4][idx])
                at += len(ids)
                real += len(ids)
        sample_ids = np.concatenate(sids)
        positions = np.concatenate(poss)
        order = np.lexsort((positions, sample_ids))
        source = (np.concatenate(srows)[order], np.concatenate(spos)[order]) if srows else None
        return (np.concatenate(flat)[order], sample_ids[order], np.concatenate(toks)[order], positions[order], real,
                source)

    def _collect(self, launched, pb: batching.PlannedBatch, seqs, skipped, truncated, seen) -> Batch:
        out, (take, sample_ids, token_ids, positions, real, source) = launched
        r, p = pb.shape
        acts = {}
        # Per site width, [sites, padded, width]; the first len(take) rows of each site are the stored tokens.
        for group, host in zip(self._groups, self._to_host(out)):
            acts.update({site: host[i, : len(take)] for i, site in enumerate(group)})
        if source is None:
            members = sum(len(m) for m in pb.rows)
        else:  # windows: an input row counts in the first batch that stores one of its tokens
            new = set(np.unique(source[0]).tolist()) - seen
            seen |= new
            members = len(new)
        return Batch(token_ids=token_ids, sample_ids=sample_ids, positions=positions,
                     acts=acts, rows=members + len(skipped), computed_tokens=r * p, padded_tokens=r * p - real,
                     truncated=truncated, skipped=dict(skipped),
                     source_rows=None if source is None else source[0],
                     source_positions=None if source is None else source[1])

    def _empty_batch(self, skipped, truncated) -> Batch:
        dtype = STORE_DTYPES[self.options.store_dtype]
        windows = bool(self.options.context_size)
        return Batch(token_ids=np.zeros(0, np.int32), sample_ids=np.zeros(0, np.int64), positions=np.zeros(0, np.int32),
                     acts={s: np.zeros((0, self.config.site_width(site_names.parse(s)[1])), dtype)
                           for s in self.sites}, rows=len(skipped), truncated=truncated,
                     skipped=dict(skipped), source_rows=np.zeros(0, np.int64) if windows else None,
                     source_positions=np.zeros(0, np.int32) if windows else None)

def cut_windows(docs: list[tuple[int, np.ndarray]], n: int, *, bos: int | None, sep: int | None, concat: bool
                ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Documents (row, token ids) -> windows of exactly n tokens: (ids int32, source rows int64, source
    positions int32, -1 for an inserted token). With concat, SAELens's concat_and_batch_sequences
    (begin_batch_token=bos, sequence_separator_token=sep, begin_sequence_token=None): every window starts with
    `bos` unless its first token already is it; between two documents in a window comes `sep` unless the next
    document starts with it; the final partial window is dropped. Without concat, each document is cut alone
    the same way (every window BOS-first), its final partial window dropped. n >= 2 when bos is given."""
    if bos is not None and n < 2:
        raise ValueError("a window of one token cannot start with BOS and hold text")
    out = []
    cur: list[tuple[int, int, int]] = []  # (token, row, position)

    def flush():
        if len(cur) == n:
            a = np.array(cur, dtype=np.int64)
            out.append((a[:, 0].astype(np.int32), a[:, 1], a[:, 2].astype(np.int32)))
        cur.clear()

    for row, ids in docs:
        if not concat:
            cur.clear()
        offset = 0
        while offset < len(ids):
            if not cur:  # a new window
                prefix = [(bos, row, -1)] if bos is not None and ids[offset] != bos else []
            else:
                prefix = [(sep, row, -1)] if sep is not None and ids[offset] != sep else []
            room = n - len(cur)
            prefix = prefix[:room]
            take = room - len(prefix)
            cur.extend(prefix)
            cur.extend((int(t), row, offset + j) for j, t in enumerate(ids[offset: offset + take]))
            offset += min(take, len(ids) - offset)
            if len(cur) == n:
                flush()
    return out
