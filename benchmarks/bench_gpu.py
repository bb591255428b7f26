"""GPU benchmark in one script (about 8 minutes on one GPU): surfaces and Skip-Cache at DiT-XL/2 size.

    python benchmarks/bench_gpu.py                      # on a GPU box: DiT-XL/2-skip, the paper's settings
    python benchmarks/bench_gpu.py --small --device cpu # smoke test at reduced size (DiT-S/2-skip, short chains)

1. Surfaces (random weights, 32x32x4 latents, one step, one x_t per point): the batched engine against
   the naive per-point loop (copy, perturb, forward) and against the floor (the same number of plain
   batched forwards) on a 21 x 21 grid; goal engine >= 10x naive and <= 1.2x the floor.
2. Skip-Cache (DDPM-250, CFG, batch 8, k = 4, the official dit-c2i rule): realized and theoretical
   speedup and their ratio for N = 2..5; goal ratio >= 0.95 (the paper: 1.46 / 1.73 / 1.93 / 2.03x on
   an A100).
3. Peak device memory of each part.
Prints the device name, torch version and every setting.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from smoothness.cache import CacheConfig, apply_cache, flops
from smoothness.diffusion import Diffusion, SamplerConfig
from smoothness.models import build
from smoothness.surface.engine import GridEngine, Perturbation
from smoothness.surface.perturb import DirectionSpec, directions


def random_model(name: str, device, dtype):
    model = build(name, input_size=32, in_channels=4, num_classes=1000)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval().to(device=device, dtype=dtype)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _peak(device) -> str:
    if device.type != "cuda":
        return "n/a on CPU"
    gib = torch.cuda.max_memory_allocated(device) / 2 ** 30
    torch.cuda.reset_peak_memory_stats(device)
    return f"{gib:.2f} GiB"


def surfaces(model, device, side: int, batch: int, naive_points: int):
    x = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0)).to(device, next(model.parameters()).dtype)
    t, y = torch.tensor([500], device=device), torch.tensor([207], device=device)
    engine = GridEngine(model, Perturbation("weights", DirectionSpec()))
    axis = torch.linspace(-0.1, 0.1, side)
    alphas, betas = axis.repeat_interleave(side), axis.repeat(side)
    n = side * side
    run_engine = lambda: [engine.forward(x, t, y, (alphas[i:i + batch], betas[i:i + batch])) for i in range(0, n, batch)]
    run_floor = lambda: [model(x.repeat(len(alphas[i:i + batch]), 1, 1, 1), t.repeat(len(alphas[i:i + batch])),
                               y.repeat(len(alphas[i:i + batch]))) for i in range(0, n, batch)]
    dirs = directions(model, DirectionSpec())

    def run_naive():
        for i in range(naive_points):
            m = copy.deepcopy(model)
            mp = dict(m.named_parameters())
            with torch.no_grad():
                for name, (d1, d2) in dirs.items():
                    mp[name].add_(alphas[i] * d1.to(mp[name]) + betas[i] * d2.to(mp[name]))
            m(x, t, y)
    with torch.inference_mode():
        run_engine(), run_floor()                                       # warm-up
        te, tf = _timed(run_engine, device), _timed(run_floor, device)
        tn = _timed(run_naive, device) * n / naive_points
    print(f"surfaces, {side} x {side} grid, {batch} points per forward: naive {tn:.1f}s, engine {te:.1f}s, floor "
          f"{tf:.1f}s; naive/engine {tn / te:.1f}x (goal >= 10), engine/floor {te / tf:.2f}x (goal <= 1.2); "
          f"peak memory {_peak(device)}")


def skip_cache(model, device, steps: int, batch: int):
    sampler = SamplerConfig(num_steps=steps, cfg_scale=1.5, cfg_channels=3)
    diffusion = Diffusion.for_config(sampler)
    y = torch.arange(batch, device=device) * 100
    shape = (batch, 4, 32, 32)
    dtype = next(model.parameters()).dtype
    run = lambda: diffusion.sample(model, shape, y, sampler, seed=0, device=device, dtype=dtype)
    with torch.inference_mode():
        run()                                                            # warm-up
        base = statistics.median(_timed(run, device) for _ in range(2))
        print(f"Skip-Cache, DDPM-{steps}, CFG 1.5, batch {batch}, k = 4, dit-c2i rule: uncached {base:.1f}s")
        for n in range(2, 6):
            cfg = CacheConfig.preset("dit-c2i", interval=n)
            with apply_cache(model, cfg):
                sec = statistics.median(_timed(run, device) for _ in range(2))
            theo = flops.theoretical_speedup(model, cfg, diffusion.chain, batch=2 * batch)
            print(f"  N={n}: {sec:.1f}s, realized {base / sec:.2f}x, theoretical {theo:.2f}x, "
                  f"ratio {base / sec / theo:.3f} (goal >= 0.95)")
    print(f"  peak memory {_peak(device)}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="(default: cuda)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="(default: float32; TF32 on)")
    p.add_argument("--small", action="store_true", help="DiT-S/2-skip, a 6 x 6 grid and DDPM-12: a smoke test")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            p.error("--device cuda: no GPU here; use --small --device cpu for a smoke test")
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        name = torch.cuda.get_device_name(device)
    else:
        name = "CPU"
    size = "DiT-S/2-skip" if args.small else "DiT-XL/2-skip"
    print(f"{name}, torch {torch.__version__}, {size} random weights, {args.dtype}")
    model = random_model(size, device, getattr(torch, args.dtype))
    surfaces(model, device, 6 if args.small else 21, 8 if args.small else 32, 2 if args.small else 8)
    skip_cache(model, device, 12 if args.small else 250, 2 if args.small else 8)


if __name__ == "__main__":
    main()
