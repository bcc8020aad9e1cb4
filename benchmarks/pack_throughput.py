"""Throughput of `opdcache pack` and `opdcache unpack` on a worst-case synthetic cache.

    .venv/bin/python benchmarks/pack_throughput.py [--positions 4000000] [--dir DIR]
    .venv/bin/python benchmarks/pack_throughput.py --tiny   # 20k positions; what the test suite runs

Builds a run (synthetic cache over a 152k vocabulary, k = 16, plus config and budget: incompressible
Parquet, as a real cache is), then prints, in MB of run data per second:
  - pack (tar + zstd into one file, fsynced);
  - unpack (streamed extraction, fsync per file, sha256 of every part against its record), and of it
    the integrity check alone;
  - a plain `shutil.copytree` of the same run, for scale, and the archive / run size ratio.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from opdcache.cache.synthetic import write_benchmark_cache
from opdcache.loop import start_run
from opdcache.pack import pack_run, unpack_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--positions", type=int, default=4_000_000, help="cache positions (~145 B each)")
    ap.add_argument("--mean-len", type=int, default=4000)
    ap.add_argument("--dir", help="where to write the run and archive (default: a temporary directory)")
    ap.add_argument("--tiny", action="store_true", help="CI size: 20,000 positions")
    args = ap.parse_args()
    if args.tiny:
        vars(args).update(positions=20_000, mean_len=200)

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        base = Path(tmp)
        t0 = time.perf_counter()
        run = write_benchmark_cache(base / "run", args.positions, args.mean_len)
        start_run(None, run, [])
        parts = len(run.shards(run.cache_round(0)))
        print(f"synthetic run: {parts} parts written in {time.perf_counter() - t0:.1f} s")

        packed = pack_run(run, base / "run.tar.zst", progress=False)
        mb = packed.bytes / 1e6
        print(f"run data: {mb:.1f} MB in {packed.files} files")
        print(f"pack MB/s: {packed.mb_per_s:.0f} ({packed.seconds:.2f} s)")
        print(f"archive / run size: {packed.archive_bytes / packed.bytes:.3f}")
        un = unpack_run(base / "run.tar.zst", base / "copy", progress=False)
        assert un.bytes == packed.bytes and un.parts_checked == parts
        print(f"unpack MB/s: {un.mb_per_s:.0f} ({un.seconds:.2f} s, checks included)")
        print(f"unpack check MB/s: {mb / un.check_seconds:.0f} (sha256 of {un.parts_checked} parts)")
        t0 = time.perf_counter()
        shutil.copytree(run.root, base / "plain", symlinks=True)
        print(f"copytree MB/s: {mb / (time.perf_counter() - t0):.0f} (no fsync, for scale)")


if __name__ == "__main__":
    main()
