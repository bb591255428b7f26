"""Figures of a cache sweep (``smoothness.cache.sweep``): quality against speedup, and the teaser's
cosine of cached against uncached outputs along the chain."""
from __future__ import annotations

import itertools

import matplotlib.pyplot as plt
import numpy as np
import xarray as xr

from ..cache import METHODS
from ..diffusion import chain_label


def chain_title(ds: xr.Dataset) -> str:
    """``DDPM-50, cfg 3.0``: the sweep's chain, from its attrs."""
    return f"{chain_label(ds.attrs['sampler'], ds.attrs['num_sampling_steps'])}, cfg {ds.attrs['cfg_scale']}"


def _points(ds: xr.Dataset):
    """(model, method, [(theoretical speedup, realized, psnr, label)]) for each series."""
    mean = ds.mean("seed")
    for m, a in itertools.product(ds.model.values, ds.method.values):
        sub = mean.sel({"model": m, "method": a})
        pts = []
        for n, k, w in itertools.product(ds.interval.values, ds.k.values, ds.window.values):
            r = sub.sel({"interval": n, "k": k, "window": w})
            if not np.isnan(r.psnr.item()):
                pts.append((r.theoretical_speedup.item(), r.realized_speedup.item(), r.psnr.item(),
                            f"N={n} k={k} {w}"))
        if pts:
            yield str(m), str(a), sorted(pts)


def figure(ds: xr.Dataset):
    """Matplotlib: PSNR (y) against theoretical speedup (x), one line per model and method."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    colors = dict(zip(METHODS, ["C0", "C1", "C2", "C3", "C7"]))              # one colour per method
    lines = dict(zip([str(m) for m in ds.model.values], ["o-", "s--", "^:", "D-."]))   # one style per model
    for m, a, pts in _points(ds):
        ax.plot([p[0] for p in pts], [p[2] for p in pts], lines.get(m, "o-"), color=colors.get(a),
                label=f"{m} / {a}")
    ax.set_xlabel("theoretical speedup (MACs, x)")
    ax.set_ylabel("PSNR against uncached run (dB)")
    ax.set_title(f"{chain_title(ds)}, seeds {ds.attrs['seeds']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def figure_plotly(ds: xr.Dataset):
    import plotly.graph_objects as go
    fig = go.Figure()
    for m, a, pts in _points(ds):
        fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[2] for p in pts], mode="lines+markers",
                                 name=f"{m} / {a}", text=[f"{p[3]}<br>realized {p[1]:.2f}x" for p in pts]))
    fig.update_layout(xaxis_title="theoretical speedup (MACs, x)", yaxis_title="PSNR against uncached run (dB)",
                      title=f"quality vs speedup, {chain_label(ds.attrs['sampler'], ds.attrs['num_sampling_steps'])}")
    return fig


def teaser(ds: xr.Dataset, series, interval: int = 2, k: int | None = None):
    """Cosine similarity to the uncached outputs against the timestep, one curve per (model, method)
    pair of ``series``."""
    k = k if k is not None else int(ds.k.values[-1])
    sel = ds["step_cosine"].sel(interval=interval, k=k).isel(window=0).mean("seed")
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for model, method in series:
        y = sel.sel({"model": model, "method": method}).values     # "method" is also a .sel keyword
        ax.plot(ds.timestep.values, y, "o-", ms=3, label=f"{method} on {model}")
    ax.invert_xaxis()
    ax.set_xlabel("denoising timestep t (sampling runs left to right)")
    ax.set_ylabel("cosine similarity, cached vs uncached output")
    ax.set_title(f"{chain_title(ds)}, N={interval}, k={k}, samples {len(ds.attrs['classes']) * ds.attrs['per_class']}",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
