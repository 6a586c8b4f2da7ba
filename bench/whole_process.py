"""Whole process, start-up and compilation included: `actfleet extract` against a plain transformers script.

Both sides run as fresh subprocesses on the same JSONL file and store the same thing: resid_post of every
layer for every real token, bfloat16 on disk, float32 compute. The peer is bench/hf_extract.py (AutoModel,
padded batches of --hf-batch consecutive rows, output_hidden_states). actfleet runs `actfleet extract
--compute-dtype float32 --positions all` twice per repeat: "cold" with an empty compilation cache
(ACTFLEET_JAX_CACHE pointing at a fresh directory, so it compiles every program) and "warm" with the cache
the cold run just filled (what a second run on the same machine gets). Each figure is the wall time of the
whole subprocess, as a user would time it, next to its CPU time (user + system, all threads: less sensitive
to other load on a shared machine, though spinning thread pools inflate it under contention). The runs of a
repeat are interleaved and the best and median of each side are printed with the ratios, so other load on
the machine hits all sides alike. The transformers script's last hidden state is after the final norm (what
output_hidden_states gives), the same cost as the last layer's resid_post.

Model: Qwen2.5-0.5B's shape (24 layers, vocab 151,936) with random weights (actfleet.demo.tiny_model);
texts are made by decoding random token prefixes, so each row has the planned token count (lognormal,
median --max-len/4, capped at --max-len: the same mix as bench/extract_vs_hf.py's "mixed").

    .venv/bin/python bench/whole_process.py                 # 48 rows up to 256 tokens, 3 repeats
    .venv/bin/python bench/whole_process.py --rows 200 --max-len 512 --repeat 2 --model /tmp/m05
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
WORDS = (
    "the model reads tokens and writes activations to shards in a bucket while spot machines come and go "
    "every row is stored exactly once"
).split()


def write_texts(model_dir: Path, path: Path, rows: int, max_len: int, seed: int) -> list[int]:
    """JSONL rows whose texts tokenize to lognormal lengths (median max_len/4, at most max_len)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    rng = np.random.default_rng(seed)
    want = np.clip(np.round(rng.lognormal(np.log(max_len / 4), 1.0, rows)), 1, max_len).astype(int)
    with open(path, "w") as f:
        for n in want:
            ids = tok(" ".join(rng.choice(WORDS, size=2 * int(n))))["input_ids"][: int(n)]
            f.write(json.dumps({"text": tok.decode(ids)}) + "\n")
    texts = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    return [len(ids) for ids in tok(texts)["input_ids"]]


def timed_run(cmd: list[str], env: dict) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds (user + system, the process and its threads), stdout)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        secs = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode:
            sys.exit(f"{' '.join(cmd[:4])}... failed ({proc.returncode}):\n{err.read().decode()[-3000:]}")
        compiled = re.search(
            r"compilation: (\d+) programs compiled, (\d+) loaded from the cache.*, ([\d.]+) s", err.read().decode()
        )
        stdout = out.read().decode()
        if compiled:  # actfleet's stderr line: carry it in the summary we print from
            summary = json.loads(stdout.strip().splitlines()[-1])
            summary["compile"] = {
                "compiled": int(compiled[1]),
                "cache_hits": int(compiled[2]),
                "compile_seconds": float(compiled[3]),
            }
            stdout = json.dumps(summary)
        return secs, usage.ru_utime + usage.ru_stime, stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=48)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hf-batch", type=int, default=8, help="transformers rows per padded batch")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", help="reuse (or create here) the model directory; default: a temporary one")
    ap.add_argument("--actfleet-args", default="", help="extra `actfleet extract` flags (experiments)")
    ap.add_argument(
        "--baseline",
        metavar="PYTHONPATH",
        help="also time, cold, the actfleet package found on this PYTHONPATH (e.g. the code before a "
        "change, assembled as actfleet/ with worker/ infra/ bootstrap/ inside)",
    )
    a = ap.parse_args()

    from actfleet.demo.tiny_model import make_tiny_model

    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    actfleet = [sys.executable, "-c", "from actfleet.cli import main; main()"]
    with tempfile.TemporaryDirectory(prefix="actfleet-whole-") as tmp:
        root = Path(tmp)
        model = Path(a.model) if a.model else root / "model"
        if not (model / "config.json").is_file():
            make_tiny_model(
                model,
                layers=a.layers,
                hidden=896,
                heads=14,
                kv_heads=2,
                intermediate=4864,
                vocab=151936,
                tie=True,
                max_pos=32768,
            )
        layers = json.loads((model / "config.json").read_text())["num_hidden_layers"]
        data = root / "data.jsonl"
        lengths = write_texts(model, data, a.rows, a.max_len, a.seed)
        print(
            f"model: Qwen2.5-0.5B shape, {layers} layers, random weights; {a.rows} rows, {sum(lengths)} tokens, "
            f"lengths median {int(np.median(lengths))} max {max(lengths)}; resid_post x {layers}, float32 "
            f"compute, bfloat16 stored; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start"
        )

        times: dict[str, list[float]] = {"transformers": [], "actfleet cold": [], "actfleet warm": []}
        if a.baseline:
            times["baseline cold"] = []
        cpu: dict[str, list[float]] = {k: [] for k in times}
        info = {}
        for r in range(a.repeat):
            cache = root / f"jax-cache-{r}"  # empty: the cold run compiles everything, the warm run reuses it
            af_env = dict(env, ACTFLEET_JAX_CACHE=str(cache))
            out = root / "out"
            cmd = [
                *actfleet,
                "extract",
                "--model",
                str(model),
                "--input",
                str(data),
                "--out",
                str(out),
                "--overwrite",
                "--compute-dtype",
                "float32",
                "--store-dtype",
                "bfloat16",
                "--positions",
                "all",
                "--sites",
                "resid_post",
                "--layers",
                "all",
                "--json",
                *a.actfleet_args.split(),
            ]
            runs = [
                (
                    "transformers",
                    [
                        sys.executable,
                        str(HERE / "hf_extract.py"),
                        str(model),
                        str(data),
                        str(root / "hf-out"),
                        "--batch",
                        str(a.hf_batch),
                    ],
                    env,
                ),
                ("actfleet cold", cmd, af_env),
                ("actfleet warm", cmd, af_env),
            ]
            if a.baseline:
                runs.append(
                    (
                        "baseline cold",
                        cmd,
                        dict(af_env, PYTHONPATH=a.baseline, ACTFLEET_JAX_CACHE=str(root / f"jax-cache-base-{r}")),
                    )
                )
            if r % 2:  # alternate who goes first (the warm run must follow its cold run)
                runs = runs[1:] + runs[:1]
            for name, c, e in runs:
                shutil.rmtree(root / "hf-out", ignore_errors=True)
                secs, cpu_secs, stdout = timed_run(c, e)
                times[name].append(secs)
                cpu[name].append(cpu_secs)
                summary = json.loads(stdout.strip().splitlines()[-1])
                info[name] = summary
                assert summary["stored_tokens"] == sum(lengths), (name, summary["stored_tokens"], sum(lengths))
            print(
                f"  repeat {r}: " + ", ".join(f"{k} {v[-1]:.1f} s (CPU {cpu[k][-1]:.1f} s)" for k, v in times.items()),
                flush=True,
            )

        print(f"\n{'side':<15} {'best s':>8} {'median s':>9} {'tok/s (best)':>13} {'CPU s (median)':>15}   runs (wall)")
        for name, v in times.items():
            print(
                f"{name:<15} {min(v):>8.1f} {statistics.median(v):>9.1f} {sum(lengths) / min(v):>13.1f} "
                f"{statistics.median(cpu[name]):>15.1f}   " + ", ".join(f"{x:.1f}" for x in v)
            )
        hf = times["transformers"]
        for name in [k for k in times if k != "transformers"]:
            paired = sorted(h / x for h, x in zip(hf, times[name]))
            print(
                f"ratio transformers / {name}: {min(hf) / min(times[name]):.2f}x best vs best, "
                f"{statistics.median(paired):.2f}x median of paired runs ({', '.join(f'{p:.2f}' for p in paired)}); "
                f"CPU time {statistics.median(cpu['transformers']) / statistics.median(cpu[name]):.2f}x"
            )
        for name in [k for k in times if k != "transformers"]:
            s = info[name]
            c = s.get("compile", {})
            print(
                f"{name}: padding {s['padding_fraction']:.1%}, loop {s['seconds']:.1f} s"
                + (
                    f", programs compiled {c.get('compiled')}, cache hits {c.get('cache_hits')}, "
                    f"compile {c.get('compile_seconds')} s"
                    if c
                    else ""
                )
            )


if __name__ == "__main__":
    main()
