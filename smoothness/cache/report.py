"""What a cache sweep found, as text: the Pareto front of each model and the printed table."""
from __future__ import annotations

import itertools

import numpy as np
import xarray as xr


def pareto(ds: xr.Dataset, model: str, quality: str = "psnr") -> list[tuple[str, str]]:
    """(method, config) of the runs on the Pareto front of ``model``: no other run has at least the
    theoretical speedup and at least the quality, one of them strictly more. Mean over seeds."""
    mean = ds.sel(model=model).mean("seed")
    pts = [(float(mean.theoretical_speedup.sel({"method": a, "setting": k})), float(mean[quality].sel({"method": a, "setting": k})),
            str(a), str(ds.config.sel({"method": a, "setting": k}).item()))
           for a in ds.method.values for k in ds.setting.values
           if not np.isnan(float(mean[quality].sel({"method": a, "setting": k})))]      # inf PSNR: identical
    front = [p for p in pts if not any(q[0] >= p[0] and q[1] >= p[1] and (q[0] > p[0] or q[1] > p[1]) for q in pts)]
    return [(p[2], p[3]) for p in sorted(front)]


def table(ds: xr.Dataset, front_only: bool = False) -> str:
    """One line per run: calls, speedups and quality; ``*`` marks the model's Pareto front (PSNR)."""
    head = (f"{'model':<18}{'config':<44}{'full':>6}{'cached':>7}{'theo x':>8}{'real x':>8}{'call x':>8}"
            f"{'PSNR':>7}{'SSIM':>7}{'acc':>6}{'FD':>8}")
    lines = [head, "-" * len(head)]
    for m in ds.model.values:
        acc, fd = ds.reference_accuracy.sel(model=m).mean().item(), ds.reference_frechet.sel(model=m).mean().item()
        lines.append(f"{m:<18}{'none':<44}{ds.sizes['step']:>6}{0:>7}{1:>8.2f}{1:>8.2f}{1:>8.2f}"
                     f"{'inf':>7}{1:>7.3f}{acc:>6.2f}{fd:>8.2f}")
        mean = ds.sel(model=m).mean("seed")
        front = {c for _, c in pareto(ds, str(m))}
        for a, k in itertools.product(ds.method.values, ds.setting.values):
            r = mean.sel({"method": a, "setting": k})
            name = str(ds.config.sel({"method": a, "setting": k}).item())
            if np.isnan(r.psnr.item()) or (front_only and name not in front):
                continue
            name = ("*" if name in front else " ") + name
            lines.append(f"{'':<18}{name:<44}{r.full_steps.item():>6.1f}{r.cached_steps.item():>7.1f}"
                         f"{r.theoretical_speedup.item():>8.2f}{r.realized_speedup.item():>8.2f}"
                         f"{r.call_speedup.item():>8.2f}{r.psnr.item():>7.2f}"
                         f"{r.ssim.item():>7.3f}{r.accuracy.item():>6.2f}{r.frechet.item():>8.2f}")
    return "\n".join(lines)
