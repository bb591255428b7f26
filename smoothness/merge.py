"""Merge the shard files of one surface run or one cache sweep into its result.

    python -m smoothness.surface --shard 0/2 --out results      # on one node (or a job-array task)
    python -m smoothness.surface --shard 1/2 --out results      # on another
    python -m smoothness.merge results/surface_*.shard-*-of-2.nc --out results/surface.nc
    python -m smoothness.merge results/cache_sweep_*.shard-*-of-4.nc --out results/sweep.nc --figures

Shards of another configuration or split, a shard given twice or missing, overlapping or unfilled
cells are refused with one line (exit 2). The result equals a one-process run bit for bit (CPU).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cli import run_cli
from .io_utils import check_writable, read_netcdf
from .cache import cli as cache_cli
from .cache import shards
from .surface import io
from .surface.cli import write_figures


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m smoothness.merge", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", type=Path, help="the shard files (<name>.shard-I-of-N.nc)")
    p.add_argument("--out", type=Path, required=True, help="the merged result (.nc)")
    p.add_argument("--figures", action="store_true", help="also draw the result's figures beside it")
    args = p.parse_args(argv)
    if args.out.suffix != ".nc":
        raise ValueError(f"--out {str(args.out)!r} is not allowed; give the result's path ending in .nc")
    check_writable(args.out.parent)
    parts = [read_netcdf(f, "shard file") for f in args.files]
    if shards.is_sweep(parts[0]):
        ds = shards.merge(parts, [str(f) for f in args.files])
        if args.figures:
            paths = cache_cli.write(ds, args.out.parent, args.out.stem)
        else:
            cache_cli.save(ds, args.out)
            paths = [args.out]
    else:
        ds = io.merge([io.check_schema(p, str(f)) for p, f in zip(parts, args.files)], [str(f) for f in args.files])
        io.save(ds, args.out)
        paths = [args.out] + (write_figures(ds, args.out.parent, args.out.stem) if args.figures else [])
    print(f"merged {len(args.files)} shards: " + ", ".join(str(q) for q in paths))



if __name__ == "__main__":
    sys.exit(run_cli(main))
