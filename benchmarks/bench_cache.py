"""Skip-Cache speed on the CPU: realized / theoretical speedup and the machinery's overhead, in one run.

    python benchmarks/bench_cache.py                        # DiT-S/2-skip, 32x32x4 latents, random weights
    python benchmarks/bench_cache.py --steps 20 --repeats 5 --threads 1

Runs a DDPM chain of ``--steps`` steps (batch: one label x CFG 2 = 2 rows) with no cache, with
Skip-Cache N = 1 (everything full, through the cache machinery) and N = 2..6 (pure 1:N pattern, no
timestep window, k units on each side). Each configuration drives its own copy of the model and the
chains advance *step by step in turn* (round robin), each step timed alone, so a change in machine
load hits every configuration alike; the median over ``--repeats`` chains is reported. One thread by
default: on a shared CPU, two OpenMP threads competing with other jobs make timings erratic.

realized = time(no cache) / time(N); theoretical = MACs(no cache) / MACs(N) from
``smoothness.cache.flops``; goal realized / theoretical >= 0.98 (paper: 0.987 on an A100).
overhead = time(N = 1) / time(no cache) - 1; goal <= 3 %.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import platform
import statistics
import time

import torch

from smoothness.cache import CacheConfig, apply_cache, flops
from smoothness.diffusion import Diffusion, SamplerConfig
from smoothness.models import build


def random_model(name: str, seed: int = 0):
    """DiT-size model with every weight drawn N(0, 0.02) (DiT init zeroes adaLN and the head)."""
    model = build(name, input_size=32, in_channels=4, num_classes=1000)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="DiT-S/2-skip", help="(default: DiT-S/2-skip)")
    p.add_argument("--steps", type=int, default=12, help="DDPM steps per chain (default: 12)")
    p.add_argument("--k", type=int, default=2, help="units recomputed on each side (default: 2 of 12)")
    p.add_argument("--repeats", type=int, default=3, help="(default: 3)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = random_model(args.model)
    sampler = SamplerConfig(num_steps=args.steps, cfg_scale=1.5)
    diffusion = Diffusion.for_config(sampler)
    shape, y = (1, 4, 32, 32), torch.tensor([207])
    configs = {"no cache": None}
    for n in range(1, 7):
        configs[f"N={n}"] = CacheConfig(interval=n, k=args.k, t_start=1000, t_stop=-1)   # pure 1:N

    copies = {name: copy.deepcopy(model) for name in configs}            # one model per configuration
    with torch.inference_mode():                                          # warm-up
        for m in copies.values():
            m(torch.zeros(2, 4, 32, 32), torch.tensor([500, 500]), torch.tensor([1, 1000]))
    times = {name: [] for name in configs}
    for _ in range(args.repeats):
        with contextlib.ExitStack() as stack, torch.inference_mode():
            chains = {}
            for name, cfg in configs.items():
                if cfg is not None:
                    stack.enter_context(apply_cache(copies[name], cfg))
                chains[name] = diffusion.sample_steps(copies[name], shape, y, sampler, seed=0)
            total = dict.fromkeys(configs, 0.0)
            for _ in range(args.steps):                                   # round robin, one step each
                for name, chain in chains.items():
                    t0 = time.perf_counter()
                    next(chain)
                    total[name] += time.perf_counter() - t0
        for name in configs:
            times[name].append(total[name])
    med = {name: statistics.median(v) for name, v in times.items()}
    base = med["no cache"]
    print(f"{args.model}, 32x32x4 latents, DDPM-{args.steps}, batch 2 (CFG), k={args.k}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"median of {args.repeats}")
    print(f"{'config':<10}{'mask':<{args.steps + 2}}{'seconds':>9}{'realized':>10}{'theoretical':>13}{'ratio':>8}")
    for name, cfg in configs.items():
        if cfg is None:
            print(f"{name:<10}{'F' * args.steps:<{args.steps + 2}}{base:>9.2f}{1:>10.3f}{1:>13.3f}{1:>8.3f}")
            continue
        theo = flops.theoretical_speedup(model, cfg, diffusion.chain)
        real = base / med[name]
        print(f"{name:<10}{cfg.schedule(diffusion.chain).mask:<{args.steps + 2}}{med[name]:>9.2f}{real:>10.3f}"
              f"{theo:>13.3f}{real / theo:>8.3f}")
    print(f"overhead of the cache machinery (N=1 vs no cache): {100 * (med['N=1'] / base - 1):+.2f} %")
    ratios = [base / med[f"N={n}"] / flops.theoretical_speedup(model, configs[f"N={n}"], diffusion.chain)
              for n in range(2, 7)]
    print(f"realized / theoretical, N=2..6: min {min(ratios):.3f}, mean {statistics.mean(ratios):.3f}")


if __name__ == "__main__":
    main()
