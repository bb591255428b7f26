"""Surface engine against a naive loop and against the floor, measured in one run.

    python benchmarks/bench_surface.py                 # bundled digits DiT and a DiT-S/2-size model
    python benchmarks/bench_surface.py --grid 11 --repeats 3 --rows 1 2

naive: for every grid point, copy the model, add alpha*d1 + beta*d2 to its weights, one forward
       (directions precomputed once, as a careful user would; the copy is part of the loop).
engine: GridEngine, grid points batched (``--batch-size`` points per forward), in the order a surface
        evaluates them: a grid of alpha x beta over +-0.1, alpha-major (rows share their alpha). Each
        point carries ``--rows`` inputs: a local-mode surface stacks every requested step and seed.
floor:  the same number of plain batched forwards of the unperturbed model (no perturbation at all).
Prints times and the ratios naive/engine (goal >= 10x on the bundled model) and engine/floor
(goal <= 1.2x). Each repeat times engine, floor and naive back to back, so load drift on a shared
machine hits all three alike; ratios are medians of the per-repeat ratios, printed with their range
(the spread is the machine's noise: on a shared VM the engine, being more memory-bound than the floor,
swings more with its neighbours' memory traffic). The load average is
printed before and after: figures taken with other jobs on the cores are not the quiet-machine ones.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time

import torch

from smoothness.surface.engine import GridEngine, Perturbation
from smoothness.models import build
from smoothness.surface.perturb import DirectionSpec, directions


def _median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(name, model, side, batch_size, repeats, naive_points, rows=1):
    c = model.config
    x = torch.randn(rows, c.in_channels, c.input_size, c.input_size, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500]) if rows == 1 else torch.linspace(960, 0, rows).long()    # one x_t per step
    y = torch.ones(rows, dtype=torch.long)
    spec = DirectionSpec()
    engine = GridEngine(model, Perturbation("weights", spec))
    axis = torch.linspace(-0.1, 0.1, side)
    alphas, betas = axis.repeat_interleave(side), axis.repeat(side)      # alpha-major, as surface.py
    points = side * side

    def run_engine():
        for i in range(0, points, batch_size):
            engine.forward(x, t, y, (alphas[i:i + batch_size], betas[i:i + batch_size]))

    def run_floor():
        for i in range(0, points, batch_size):
            g = len(alphas[i:i + batch_size])
            model(x.repeat(g, 1, 1, 1), t.repeat(g), y.repeat(g))

    dirs = directions(model, spec)
    params = dict(model.named_parameters())

    def run_naive():
        for i in range(naive_points):
            m = copy.deepcopy(model)
            mp = dict(m.named_parameters())
            with torch.no_grad():
                for n, (d1, d2) in dirs.items():
                    mp[n].add_(alphas[i] * d1 + betas[i] * d2)
            m(x, t, y)

    with torch.inference_mode():
        run_engine(), run_floor()                               # warm-up (and direction cache)
        scale = points / naive_points
        runs = [(_median_time(run_engine, 1), _median_time(run_floor, 1), _median_time(run_naive, 1) * scale)
                for _ in range(repeats)]
    del params
    te, tf, tn = (statistics.median(r[i] for r in runs) for i in range(3))
    speedups, ratios = [n / e for e, f, n in runs], [e / f for e, f, n in runs]
    speedup, ratio = statistics.median(speedups), statistics.median(ratios)
    name = f"{name}, {rows} row{'s' if rows > 1 else ''}/pt"
    print(f"{name:<46} {points:>4} pts  naive {tn:7.2f}s  engine {te:6.2f}s  floor {tf:6.2f}s  "
          f"naive/engine {speedup:5.1f}x ({min(speedups):.1f}-{max(speedups):.1f})  "
          f"engine/floor {ratio:4.2f}x ({min(ratios):.2f}-{max(ratios):.2f})  "
          f"(medians and ranges of {repeats} interleaved repeats)")
    return speedup, ratio


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", type=int, default=21, help="points per axis (default: 21, a 21 x 21 grid)")
    p.add_argument("--batch-size", type=int, default=64, help="grid points per forward (default: 64)")
    p.add_argument("--repeats", type=int, default=7, help="(default: 7)")
    p.add_argument("--naive-points", type=int, default=20, help="naive loop points timed, scaled up (default: 20)")
    p.add_argument("--rows", type=int, nargs="+", default=[1],
                   help="x_t rows each grid point carries on the bundled model, one run per value: 1 is one "
                        "step of one seed (README's --step 250), 2 the default surface's steps 10 and 250, "
                        "which a local surface evaluates together (default: 1)")
    p.add_argument("--skip-s2", action="store_true", help="only the bundled model")
    p.add_argument("--bundled", default="digits-skip-dit", choices=["digits-skip-dit", "digits-dit"],
                   help="bundled model to measure (default: digits-skip-dit)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own)")
    args = p.parse_args()
    if args.threads is not None:
        if args.threads < 1:
            p.error(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if min(args.rows) < 1:
        p.error(f"--rows must be at least 1, got {min(args.rows)}")
    load = lambda: " ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average {load()}")
    from smoothness.models import bundled
    try:
        digits = bundled.load(args.bundled)
        label = f"{args.bundled} (DiT-D/2, 16x16x1)"
    except Exception:
        torch.manual_seed(0)
        arch = "DiT-D/2-skip" if "skip" in args.bundled else "DiT-D/2"
        digits = build(arch, input_size=16, in_channels=1, num_classes=10).eval()
        label = f"{arch} random (16x16x1)"
    for rows in args.rows:
        bench(label, digits, args.grid, args.batch_size, args.repeats, args.naive_points, rows)
    if not args.skip_s2:
        torch.manual_seed(0)
        s2 = build("DiT-S/2-skip", input_size=32, in_channels=4, num_classes=1000).eval()
        with torch.no_grad():
            for prm in s2.parameters():
                if prm.requires_grad:
                    prm.normal_(0, 0.02)
        # A single S/2 forward already keeps 2 cores busy: fewer points, smaller chunks.
        bench("DiT-S/2-skip random (32x32x4)", s2, 6, max(args.batch_size // 4, 8), args.repeats, 4)
    print(f"load average after: {load()}")


if __name__ == "__main__":
    main()
