"""Benchmark: useful tokens/s from prepared units to committed shards, against forward-only tokens/s.

Both sides use the same engine, model, data and units, measured side by side in one run:

- forward-only: `engine.run(rows)` once per unit, consuming the batches (numpy arrays on the host) and
  storing nothing;
- pipeline: `actfleet work`'s loop in-process (claim, extract, serialize with ShardWriter, upload to a
  local-filesystem store with fsync, create done records) over a freshly prepared job.

Statistics overhead (issue 23.1, goal <= 3%): the same pipeline with the job's per-unit activation
statistics (`--stats moments`, the default, and `gram`) against `--stats none`, side by side in the same
run, alternating; ratio = with / without (`--only-stats`: just this table).

"Useful tokens" are stored tokens (no padding, no skipped rows). Printed for one layer and for all layers;
ratio = pipeline / forward-only (the issue's aim: 0.9 or better), best of each side and the median of the
paired runs, plus the ratio of the median CPU times (forward / pipeline: the extra work the pipeline does,
less sensitive than wall time to other load on a shared machine). Warm-up runs first on both paths so
neither pays for compilation.

    python bench/pipeline.py [--rows 256] [--unit-rows 64] [--layers 4 --hidden 256] [--repeat 2] [--only-stats]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from actfleet import work_queue as q  # noqa: E402
from actfleet.hashing import sha256_file  # noqa: E402
from actfleet.job_options import JobOptions  # noqa: E402
from actfleet.store import open_store  # noqa: E402
from actfleet.worker.engine_extractor import EngineExtractor, count_input_rows  # noqa: E402
from actfleet.worker.work_loop import Worker  # noqa: E402

WORDS = (
    "the model reads tokens and writes activations to shards in a bucket while spot machines come and go "
    "every row is stored exactly once"
).split()


def write_texts(path: Path, rows: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(rows):
            n = max(4, int(rng.lognormvariate(4.0, 0.6)))  # median ~55 words
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(n))}) + "\n")


def options(model: str, sites: list[str], stats: str = "moments") -> JobOptions:
    return JobOptions(
        model=model,
        sites=tuple(sites),
        batch_tokens=4096,
        compute_dtype="float32",
        store_dtype="bfloat16",
        shard_mb=8,
        stats=stats,
    )


def forward_only(ex: EngineExtractor, spec: q.JobSpec) -> tuple[int, float, float]:
    tokens, t0, c0 = 0, time.perf_counter(), time.process_time()
    for unit in range(spec.units):
        rows = list(ex.rows(*spec.unit_range(unit)))
        for batch in ex.run(rows):
            tokens += len(batch.sample_ids)
    return tokens, time.perf_counter() - t0, time.process_time() - c0


def pipeline(ex: EngineExtractor, spec_template: q.JobSpec, root: Path, tag: str) -> tuple[int, float, float]:
    store = open_store(str(root / tag))
    spec, _ = q.prepare(
        store,
        spec_template.job,
        input=spec_template.input,
        fingerprint=spec_template.fingerprint,
        rows=spec_template.rows,
        unit_rows=spec_template.unit_rows,
        options=spec_template.options,
    )
    t0, c0 = time.perf_counter(), time.process_time()
    result = Worker(store, spec, ex, "bench", lease_seconds=600).run()
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert result.job_complete
    return result.tokens, secs, cpu


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--unit-rows", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--model", help="a model directory (default: a tiny random Qwen2 made on the spot)")
    ap.add_argument("--only-stats", action="store_true", help="only the statistics-overhead comparison")
    args = ap.parse_args(argv)

    from actfleet.demo.tiny_model import make_tiny_model

    with tempfile.TemporaryDirectory(prefix="actfleet-bench-") as tmp:
        root = Path(tmp)
        model = args.model or str(
            make_tiny_model(
                root / "model",
                layers=args.layers,
                hidden=args.hidden,
                heads=max(2, args.hidden // 64),
                kv_heads=max(1, args.hidden // 128),
                intermediate=args.hidden * 4,
            )
        )
        data = root / "data.jsonl"
        write_texts(data, args.rows)
        fp = sha256_file(data)
        print(
            f"model {model} ({'random weights' if not args.model else 'given'}), {args.rows} rows, "
            f"units of {args.unit_rows}, repeat {args.repeat}, best of each side"
        )
        print(
            f"{'sites':<12} {'forward tok/s':>14} {'pipeline tok/s':>15} {'ratio':>7} {'tokens':>9}   (best of each side)"
        )
        site_sets = (
            ("one layer", [f"blocks.{args.layers - 1}.hook_resid_post"]),
            ("all layers", ["blocks.*.hook_resid_post"]),
        )
        for label, sites in () if args.only_stats else site_sets:
            opts = options(model, sites)
            rows = count_input_rows(str(data), opts)
            spec = q.JobSpec(
                job=f"bench-{label.replace(' ', '-')}",
                input=str(data),
                fingerprint=fp,
                rows=rows,
                unit_rows=args.unit_rows,
                units=-(-rows // args.unit_rows),
                options=opts,
            )
            ex = EngineExtractor(spec)
            forward_only(ex, spec)  # warm-up: compile every shape both sides use
            fwd, pipe, cpu_f, cpu_p = [], [], [], []
            for r in range(args.repeat):  # alternate (and swap who goes first), so drift hits both sides alike
                if r % 2:
                    tok_p, s_p, c_p = pipeline(ex, spec, root, f"{label}-{r}")
                    tok_f, s_f, c_f = forward_only(ex, spec)
                else:
                    tok_f, s_f, c_f = forward_only(ex, spec)
                    tok_p, s_p, c_p = pipeline(ex, spec, root, f"{label}-{r}")
                assert tok_f == tok_p, (tok_f, tok_p)
                fwd.append(tok_f / s_f)
                pipe.append(tok_p / s_p)
                cpu_f.append(c_f)
                cpu_p.append(c_p)
            f, p = max(fwd), max(pipe)
            med = statistics.median(b / a for a, b in zip(fwd, pipe))
            cpu_ratio = statistics.median(cpu_f) / statistics.median(cpu_p)
            print(
                f"{label:<12} {f:>14,.0f} {p:>15,.0f} {p / f:>7.2f} {tok_f:>9,}   median paired ratio {med:.2f}, "
                f"CPU-time ratio {cpu_ratio:.2f}"
                f"   (runs: fwd {', '.join(f'{x:,.0f}' for x in fwd)}; pipe {', '.join(f'{x:,.0f}' for x in pipe)})"
            )
        stats_overhead(model, data, fp, args, site_sets, root)


def stats_overhead(model: str, data: Path, fp: str, args, site_sets, root: Path) -> None:
    """Pipeline tok/s with each --stats mode against --stats none, alternating runs (same model and data)."""
    print(f"\nstatistics overhead: pipeline tok/s, --stats MODE against --stats none (best of {args.repeat} each)")
    print(f"{'sites':<12} {'mode':<8} {'none tok/s':>11} {'with tok/s':>11} {'ratio':>7} {'overhead':>9}")
    for label, sites in site_sets:
        spec_of, ex_of = {}, {}
        for mode in ("none", "moments", "gram"):
            opts = options(model, sites, mode)
            rows = count_input_rows(str(data), opts)
            spec_of[mode] = q.JobSpec(
                job=f"stats-{mode}-{label.replace(' ', '-')}",
                input=str(data),
                fingerprint=fp,
                rows=rows,
                unit_rows=args.unit_rows,
                units=-(-rows // args.unit_rows),
                options=opts,
            )
            ex_of[mode] = EngineExtractor(spec_of[mode])
            pipeline(ex_of[mode], spec_of[mode], root, f"warm-{mode}-{label}")  # compile every shape
        for mode in ("moments", "gram"):
            base, withs, cpu_b, cpu_w = [], [], [], []
            for r in range(args.repeat):
                order = ("none", mode) if r % 2 == 0 else (mode, "none")
                for m in order:
                    tok, secs, cpu = pipeline(ex_of[m], spec_of[m], root, f"s-{m}-{label}-{mode}-{r}")
                    (base if m == "none" else withs).append(tok / secs)
                    (cpu_b if m == "none" else cpu_w).append(cpu)
            b, w = max(base), max(withs)
            # CPU time (this process, all threads) is less sensitive than wall time to a shared machine's load.
            cpu_ratio = statistics.median(cpu_b) / statistics.median(cpu_w)
            print(
                f"{label:<12} {mode:<8} {b:>11,.0f} {w:>11,.0f} {w / b:>7.3f} {1 - w / b:>8.1%}"
                f"   CPU-time ratio {cpu_ratio:.3f}"
                f"   (runs: none {', '.join(f'{x:,.0f}' for x in base)}; with {', '.join(f'{x:,.0f}' for x in withs)})"
            )


if __name__ == "__main__":
    main()
