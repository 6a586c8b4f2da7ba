"""Benchmark: reading one unit of rows from a large JSONL file, at its start and at its end.

Side by side, on the same 300,000-row file (unit of 1,000 rows), both through inputs.read_source_rows:
  peer (no seek index)       read the file from row 0, lines before the unit counted but not parsed,
                             and keep rows [start, stop): O(offset)
  ours (seek index)          seek to the byte offset prepare recorded for the unit's first INDEX_EVERY-th
                             row, skip < INDEX_EVERY lines unparsed, parse the unit: O(unit)
and the same for the file compressed with zstd (peer streams and parses the compressed file from its start, as
the removed single-file reader did; ours reads the worker's decompressed copy, made once: the time to make it
is printed apart). Printed, never asserted. (docs/jobs.md's "before" column is that removed reader, which
parsed every line from row 0.)

Run: .venv/bin/python bench/read_unit.py [--rows 300000] [--unit 1000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actfleet.worker import inputs, pinning  # noqa: E402


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=300_000)
    ap.add_argument("--unit", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["ACTFLEET_DATA_CACHE"] = str(Path(tmp) / "cache")
        path = Path(tmp) / "d.jsonl"
        with open(path, "w") as f:
            for i in range(a.rows):
                f.write(json.dumps({"text": f"row {i}: " + "lorem ipsum dolor sit amet " * 8}) + "\n")
        (file,), (local,) = pinning.pin_files([str(path)])
        unindexed = dataclasses.replace(file, index=[])
        print(f"{a.rows:,} rows, {path.stat().st_size / 2**20:.1f} MiB; unit of {a.unit:,} rows; best of {a.repeats}")
        print(f"{'unit':>16} {'peer (from row 0)':>18} {'ours (seek)':>12} {'peer/ours':>10}")
        for start in (0, a.rows - a.unit):
            stop = start + a.unit
            peer = best(
                lambda: list(inputs.read_source_rows([unindexed], lambda f: local, start=start, stop=stop)), a.repeats
            )
            ours = best(
                lambda: list(inputs.read_source_rows([file], lambda f: local, start=start, stop=stop)), a.repeats
            )
            assert list(inputs.read_source_rows([unindexed], lambda f: local, start=start, stop=stop)) == list(
                inputs.read_source_rows([file], lambda f: local, start=start, stop=stop)
            )
            print(f"{f'{start:,}-{stop - 1:,}':>16} {peer:>17.4f}s {ours:>11.4f}s {peer / ours:>9.1f}x")

        import zstandard

        zpath = Path(tmp) / "d.jsonl.zst"
        zpath.write_bytes(zstandard.ZstdCompressor().compress(path.read_bytes()))
        (zfile,), (zlocal,) = pinning.pin_files([str(zpath)])
        t = time.perf_counter()
        plain = pinning.plain_copy(zfile, zlocal)
        made = time.perf_counter() - t
        start, stop = a.rows - a.unit, a.rows

        def streamed():  # the compressed file parsed from its start
            recs = ((i, rec, why) for i, (rec, why) in enumerate(inputs.head(zfile, zlocal, stop)))
            return list(inputs.render_rows(recs, start=start, stop=stop))

        peer = best(streamed, a.repeats)
        assert streamed() == list(inputs.read_source_rows([zfile], lambda f: plain, start=start, stop=stop))
        ours = best(lambda: list(inputs.read_source_rows([zfile], lambda f: plain, start=start, stop=stop)), a.repeats)
        print(
            f"{'zst, last unit':>16} {peer:>17.4f}s {ours:>11.4f}s {peer / ours:>9.1f}x   "
            f"(decompressed copy made once per worker: {made:.3f}s)"
        )


if __name__ == "__main__":
    main()
