"""Surfaces and cache sweeps on 1 and on 2 gloo ranks (torchrun) on the bundled pair: bit-identity and
wall-time ratio.

    python benchmarks/bench_scale.py                     # 21 x 21 grid at step 250, both bundled models
    python benchmarks/bench_scale.py --grid 11 --ranks 2 3
    python benchmarks/bench_scale.py --tool cache        # the cache sweep: Skip-Cache, FORA, deep-reuse, N = 2..4

Each run is the real command (``python -m smoothness.surface`` alone, then under
``python -m torch.distributed.run --nproc-per-node R``), one torch thread per process so that R ranks
use R cores. Prints each run's wall time, the ratio to one rank and whether the merged surface equals
the one-rank surface bit for bit. On the 2-core project machine 2 ranks can at best halve the time;
rendezvous, model loading and every rank's reference chunk are the fixed cost.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import xarray as xr

ROOT = Path(__file__).resolve().parents[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TIMES = {"realized_speedup", "call_speedup", "seconds", "realized_over_theoretical", "reference_seconds"}


def _values(ds: xr.Dataset) -> dict:
    """Every variable but the wall times."""
    return {v: ds[v].values.copy() for v in ds.data_vars if v not in TIMES}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        np.array_equal(a[v], b[v], equal_nan=a[v].dtype.kind == "f") for v in a)


def run(ranks: int, tool: str, argv: list[str], out: Path) -> tuple[float, dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    launch = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                                                  str(ranks), "--master-addr", "127.0.0.1", "--master-port", str(_port())]
    t0 = time.perf_counter()
    subprocess.run([*launch, "-m", f"smoothness.{tool}", *argv, "--out", str(out)], check=True, env=env, cwd=ROOT,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    (nc,) = [p for p in out.glob("*.nc") if ".shard-" not in p.name and ".partial" not in p.name]
    with xr.open_dataset(nc, engine="h5netcdf") as ds:
        return seconds, _values(ds)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", type=int, default=21, help="points per axis (default: 21)")
    p.add_argument("--ranks", type=int, nargs="+", default=[2], help="rank counts to compare with 1 (default: 2)")
    p.add_argument("--batch-size", type=int, default=16, help="grid points per chunk (default: 16)")
    p.add_argument("--tool", choices=["surface", "cache"], default="surface", help="(default: surface)")
    args = p.parse_args(argv)
    if args.tool == "surface":
        argv = ["--step", "250", f"--grid=-0.25:0.25:{args.grid}", "--batch-size", str(args.batch_size)]
        what = f"surfaces at step 250, {args.grid} x {args.grid} grid, {args.batch_size} points per chunk"
    else:
        argv = ["--methods", "skip-cache,fora,deep-reuse", "--intervals", "2,3,4", "--per-class", "1"]
        what = "cache sweep, skip-cache / fora / deep-reuse, N = 2..4, DDPM-50, 10 samples"
    print(f"bundled pair, {what}, {os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    with tempfile.TemporaryDirectory() as tmp:
        base, ref = run(1, args.tool, argv, Path(tmp) / "r1")
        print(f"1 rank : {base:7.1f}s")
        for r in args.ranks:
            sec, vals = run(r, args.tool, argv, Path(tmp) / f"r{r}")
            print(f"{r} ranks: {sec:7.1f}s  1-rank time / {r}-rank time {base / sec:4.2f}x  "
                  f"bit-identical to 1 rank (wall times aside): {_same(vals, ref)}")


if __name__ == "__main__":
    main()
