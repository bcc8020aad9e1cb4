"""Scoring throughput and cache size on a worst-case synthetic cache.

    .venv/bin/python benchmarks/score_throughput.py [--positions 5000000] [--threads 1] [--dir DIR]
    .venv/bin/python benchmarks/score_throughput.py --tiny   # 20k positions; what the test suite runs

Prints, for >= 5 M positions over a 152k vocabulary (k = 16, ~70 % overlap, uniform random ids):
  - positions/s of the scoring math (eqs. 6-12 on the ragged layout) and of a straightforward torch
    implementation on padded [B, T, k] tensors (the reference code's shape), and their ratio;
  - positions/s of the whole `score` stage, of Parquet decode of the columns it reads, and their
    ratio (how far the stage is from being bound by decode);
  - cache bytes per position, in total and per column.
Goals (issue #2): math >= 20 M positions/s/core; stage close to decode; <= 160 B/position.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from opdcache.cache.shards import flat, read_cache_shard
from opdcache.cache.synthetic import write_benchmark_cache
from opdcache.score import reliability as rl
from opdcache.score.stage import _columns_needed, score_run
from opdcache.score.torch_reference import prune_opd_weights
from opdcache.variant import VariantSpec


def best_of(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--positions", type=int, default=5_000_000)
    ap.add_argument("--mean-len", type=int, default=4000)
    ap.add_argument("--threads", type=int, default=1, help="threads for torch and Arrow")
    ap.add_argument("--dir", help="where to write the synthetic run (default: a temporary directory)")
    ap.add_argument("--tiny", action="store_true", help="CI size: 20,000 positions")
    args = ap.parse_args()
    if args.tiny:
        vars(args).update(positions=20_000, mean_len=200)
    torch.set_num_threads(args.threads)
    pa.set_cpu_count(args.threads)
    pa.set_io_thread_count(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.dir or tmp) / "bench-run"
        t0 = time.perf_counter()
        run = write_benchmark_cache(root, args.positions, args.mean_len)
        files = run.shards(run.cache_round(0))
        print(f"synthetic cache: {len(files)} shards written in {time.perf_counter() - t0:.1f} s")

        # --- storage
        n = 0
        per_col: dict[str, int] = {}
        for f in files:
            md = pq.ParquetFile(f).metadata
            for g in range(md.num_row_groups):
                for c in range(md.num_columns):
                    col = md.row_group(g).column(c)
                    name = col.path_in_schema.split(".")[0]
                    per_col[name] = per_col.get(name, 0) + col.total_compressed_size
            n += len(flat(read_cache_shard(f, ["response_ids"])[0].column("response_ids"))[0])
        total = sum(f.stat().st_size for f in files)
        print(f"positions: {n:,}")
        print(f"cache bytes/position: {total / n:.1f} (goal <= 160; raw int32/fp32 ~400)")
        for name, size in per_col.items():
            if size / n >= 0.05:
                print(f"  {name:<34} {size / n:6.1f}")

        # --- math, in memory
        spec = VariantSpec()
        tables = [read_cache_shard(f, _columns_needed(spec))[0] for f in files]
        s_ids = np.concatenate([flat(t.column("student_topk_ids"))[0] for t in tables]).reshape(-1, 16)
        t_ids = np.concatenate([flat(t.column("teacher_topk_ids"))[0] for t in tables]).reshape(-1, 16)
        lengths = np.concatenate([np.diff(flat(t.column("response_ids"))[1]) for t in tables])
        offsets = np.concatenate(([0], np.cumsum(lengths)))

        def math() -> None:
            o = rl.topk_overlap(s_ids, t_ids)
            r = rl.reliability(rl.cumulative_bad(rl.overlap_bad_events(o, spec.gamma), offsets), spec.w_drop)
            rl.loss_weight(r, spec.w_base)
            rl.effective_length(r, offsets)

        math()  # JIT warm-up
        t_math = best_of(math)
        print(f"mean overlap: {rl.topk_overlap(s_ids[:100_000], t_ids[:100_000]).mean():.3f}")

        # torch reference on padded [B, T, k], in batches of 16 responses to bound memory
        b, t_max = len(lengths), int(lengths.max())
        mask = np.arange(t_max)[None, :] < lengths[:, None]
        batch = 16
        dense = []
        for i in range(0, b, batch):
            m = mask[i : i + batch]
            s = np.zeros((len(m), t_max, 16), np.int64)
            t = np.zeros((len(m), t_max, 16), np.int64)
            lo, hi = offsets[i], offsets[min(i + batch, b)]
            s[m], t[m] = s_ids[lo:hi], t_ids[lo:hi]
            dense.append((torch.from_numpy(s), torch.from_numpy(t), torch.from_numpy(m)))

        def torch_ref() -> None:
            for s, t, m in dense:
                prune_opd_weights(s, t, m)

        t_torch = best_of(torch_ref, repeat=1)
        print(f"math (ragged, numba+numpy): {n / t_math / 1e6:8.1f} M positions/s  (goal >= 20 per core)")
        print(f"torch [B,T,k] reference:    {n / t_torch / 1e6:8.1f} M positions/s")
        print(f"ratio math / torch:         {t_torch / t_math:8.1f}x")

        # --- whole stage vs. Parquet decode of the columns it reads
        def decode() -> None:
            for f in files:
                read_cache_shard(f, _columns_needed(spec), validate=False)

        t_decode = best_of(decode)
        t_stage = best_of(lambda: score_run(run, "bench", spec, progress=False, workers=1), repeat=2)
        print(f"parquet decode (needed cols): {n / t_decode / 1e6:6.2f} M positions/s")
        print(f"score stage (read+score+write), 1 worker: {n / t_stage / 1e6:4.2f} M positions/s")
        print(f"stage time / decode time:      {t_stage / t_decode:4.2f}")
        cores = os.cpu_count() or 1
        pa.set_cpu_count(cores)  # Arrow decodes in its own pool: one thread would serialize the workers
        t_par = best_of(lambda: score_run(run, "bench", spec, progress=False, workers=cores), repeat=2)
        print(f"score stage, {cores} workers: {n / t_par / 1e6:4.2f} M positions/s")
        print(
            f"speed-up {cores} workers / 1:  {t_stage / t_par:4.2f}x  (goal >= 1.7 with 2; Arrow threads 1 -> {cores})"
        )
        pa.set_cpu_count(args.threads)
        score_bytes = sum(f.stat().st_size for f in run.shards(run.variant("bench") / "round=0"))
        print(f"score bytes/position: {score_bytes / n:.1f}")


if __name__ == "__main__":
    main()
