"""Synth cost, cold vs cached, for 12 and 1,000 workers (docs/infrastructure.md: synth is slow, so it is cached).

Each measurement is a fresh `python` process doing what `actfleet synth` does (load the config, then
actfleet.infra.synth_cache.synth), timed from outside, so interpreter start-up and imports are included:
  cold   = empty cache: imports cdktf + the provider bindings and synthesizes both stacks;
  cached = the same config again: a cache hit, which imports no cdktf.
The peer for the ratio is the cold synth, measured side by side in the same run.

    .venv/bin/python bench/synth.py [--workers 12 1000] [--repeat 1]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CONFIG = """
[fleet]
id = "bench"
project = "my-project"
region = "us-central1"
zones = {zones}
[repo]
url = "https://github.com/example/actfleet.git"
commit = "0123456789abcdef0123456789abcdef01234567"
[storage]
bucket = "my-project-acts"
[state]
path = "{state}"
[job]
model = "Qwen/Qwen2.5-0.5B"
input = "gs://my-project-acts/d.jsonl"
layers = [6]
"""

PROBE = """
import json, sys
from actfleet.config import load
from actfleet.infra.synth_cache import synth
s = synth(load(sys.argv[1]), cache_dir=sys.argv[2])
size = sum(p.stat().st_size for p in s.dir.rglob("cdk.tf.json"))
print(json.dumps({"cached": s.cached, "inner_seconds": s.seconds, "json_bytes": size,
                  "cdktf_imported": any(m.startswith(("cdktf", "jsii")) for m in sys.modules)}))
"""


def zones_for(workers: int) -> str:
    """Spread workers over 4 zones (the last takes the remainder)."""
    per, rest = divmod(workers, 4)
    counts = [per] * 3 + [per + rest]
    return "{ " + ", ".join(f'"us-central1-{z}" = {n}' for z, n in zip("abcd", counts)) + " }"


def timed_synth(config: Path, cache: Path) -> tuple[float, dict]:
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(config), str(cache)], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return time.perf_counter() - start, json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, nargs="+", default=[12, 1000])
    ap.add_argument("--repeat", type=int, default=1, help="cold/cached pairs per size (best is reported)")
    args = ap.parse_args()

    print(f"{'workers':>8} {'cold s':>8} {'cached s':>9} {'ratio':>8} {'json MB':>8}  notes")
    for workers in args.workers:
        best_cold, best_hit, info = float("inf"), float("inf"), {}
        for _ in range(args.repeat):
            with tempfile.TemporaryDirectory() as tmp:
                config = Path(tmp) / "fleet.toml"
                config.write_text(CONFIG.format(zones=zones_for(workers), state=Path(tmp) / "state"))
                cold, cold_info = timed_synth(config, Path(tmp) / "cache")
                hit, hit_info = timed_synth(config, Path(tmp) / "cache")
                assert not cold_info["cached"] and hit_info["cached"], (cold_info, hit_info)
                assert not hit_info["cdktf_imported"], "a cache hit imported cdktf"
                best_cold, best_hit, info = min(best_cold, cold), min(best_hit, hit), cold_info
        print(
            f"{workers:>8} {best_cold:>8.2f} {best_hit:>9.3f} {best_cold / best_hit:>7.0f}x "
            f"{info['json_bytes'] / 1e6:>8.2f}  cache hit imports no cdktf"
        )


if __name__ == "__main__":
    main()
