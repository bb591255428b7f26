"""Figures of a cache sweep (``smoothness.cache.sweep``): every method on one quality-vs-MACs plane
with each model's Pareto front marked, and the teaser's cosine of cached against uncached outputs
along the chain."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import xarray as xr

from ..cache import METHODS
from ..cache.report import pareto
from ..diffusion import chain_label

PANELS = (  # (quality variable, speedup variable, y label)
    ("psnr", "theoretical_speedup", "PSNR against uncached run (dB)"),
    ("ssim", "theoretical_speedup", "SSIM against uncached run"),
    ("accuracy", "theoretical_speedup", "classifier accuracy"),
    ("psnr", "call_speedup", "PSNR against uncached run (dB)"),   # realized, from call times within the run
)
MARKERS = {"reuse": "o", "taylor1": "^", "taylor2": "v", "foca": "D"}     # by forecast


def chain_title(ds: xr.Dataset) -> str:
    """``DDPM-50, cfg 3.0``: the sweep's chain, from its attrs."""
    return f"{chain_label(ds.attrs['sampler'], ds.attrs['num_sampling_steps'])}, cfg {ds.attrs['cfg_scale']}"


def method_color(spec: str) -> str:
    """One colour per registered method (forecasting variants share their method's colour)."""
    name = spec.partition("+")[0]
    order = list(METHODS) + [name]
    return plt.get_cmap("tab10")(order.index(name) % 10)


def _points(ds: xr.Dataset, model: str, method: str, x: str, y: str):
    """[(x, y, config)] of one model and method spec, sorted by x; mean over seeds."""
    mean = ds.sel({"model": model, "method": method}).mean("seed")
    pts = [(float(mean[x].sel(setting=k)), float(mean[y].sel(setting=k)),
            str(ds.config.sel({"method": method, "setting": k}).item())) for k in ds.setting.values]
    return sorted(p for p in pts if np.isfinite(p[0]) and np.isfinite(p[1]))


def _front(ds: xr.Dataset, model: str, x: str, y: str):
    """(x, y) of the Pareto front of one model on one plane, by increasing x."""
    if x == "theoretical_speedup":
        keep = set(c for _, c in pareto(ds, model, y))
    else:
        keep = None
    pts = [p for a in ds.method.values for p in _points(ds, model, str(a), x, y)]
    if keep is None:
        keep = {p[2] for p in pts if not any(q[0] >= p[0] and q[1] >= p[1] and (q[0] > p[0] or q[1] > p[1])
                                             for q in pts)}
    return sorted((p[0], p[1]) for p in pts if p[2] in keep and np.isfinite(p[1]))


def figure(ds: xr.Dataset):
    """Matplotlib: one column per model, rows PSNR / SSIM / accuracy against theoretical speedup and PSNR
    against realized speedup (``call_speedup``: call wall times within the cached run, insensitive to
    load drift between runs); one colour per method, marker by forecast, the Pareto front as a line."""
    panels = [p for p in PANELS if np.isfinite(ds[p[0]].values).any()]
    models = [str(m) for m in ds.model.values]
    fig, axes = plt.subplots(len(panels), len(models), figsize=(4.6 * len(models), 3.1 * len(panels)),
                             squeeze=False, sharex="col")
    for col, model in enumerate(models):
        for row, (y, x, ylabel) in enumerate(panels):
            ax = axes[row, col]
            for a in ds.method.values:
                pts = _points(ds, model, str(a), x, y)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], MARKERS[str(a).partition("+")[2] or "reuse"],
                            color=method_color(str(a)), ms=5, alpha=0.85, label=str(a))
            front = _front(ds, model, x, y)
            ax.plot([p[0] for p in front], [p[1] for p in front], "-", color="k", lw=1, alpha=0.6,
                    label="Pareto front")
            ax.set_ylabel(ylabel, fontsize=8)
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(f"{model}\n{chain_title(ds)}, seeds {ds.attrs['seeds']}", fontsize=9)
            if row == len(panels) - 1 or panels[row + 1][1] != x:
                ax.set_xlabel("theoretical speedup (MACs, x)" if x == "theoretical_speedup"
                              else "realized speedup (call wall times within the run, x)", fontsize=8)
    legend = {}
    for ax in axes.flat:                                   # every method, whichever model ran it
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    order = [str(a) for a in ds.method.values if str(a) in legend] + ["Pareto front"]
    handles, labels = [legend[k] for k in order], order
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=7)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def figure_plotly(ds: xr.Dataset):
    import plotly.graph_objects as go
    fig = go.Figure()
    for model in ds.model.values:
        for a in ds.method.values:
            pts = _points(ds, str(model), str(a), "theoretical_speedup", "psnr")
            if pts:
                fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="markers",
                                         name=f"{model} / {a}", text=[p[2] for p in pts]))
        front = _front(ds, str(model), "theoretical_speedup", "psnr")
        fig.add_trace(go.Scatter(x=[p[0] for p in front], y=[p[1] for p in front], mode="lines",
                                 name=f"{model} Pareto front"))
    fig.update_layout(xaxis_title="theoretical speedup (MACs, x)", yaxis_title="PSNR against uncached run (dB)",
                      title=f"quality vs speedup, {chain_label(ds.attrs['sampler'], ds.attrs['num_sampling_steps'])}")
    return fig


def setting_of(ds: xr.Dataset, method: str, **values) -> int:
    """The ``setting`` index of ``method`` whose settings equal ``values`` (e.g. interval=2, k=1)."""
    ok = np.ones(ds.sizes["setting"], dtype=bool)
    for name, v in values.items():
        ok &= ds[f"setting_{name}"].sel({"method": method}).values == v
    names = ds.config.sel({"method": method}).values
    hits = np.flatnonzero(ok & (names != ""))
    if not len(hits):
        raise ValueError(f"{method} has no setting with {values}; it has {[n for n in names if n]}")
    return int(hits[0])


def teaser(ds: xr.Dataset, series, interval: int = 2, k: int | None = None):
    """Cosine similarity to the uncached outputs against the timestep, one curve per (model, method)
    pair of ``series``, at the first window of (interval, k)."""
    k = k if k is not None else int(np.nanmax(ds.setting_k.values))
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for model, method in series:
        want = {"interval": interval, "k": k} if np.isfinite(ds.setting_k.sel({"method": method}).values).any() \
            else {"interval": interval}
        at = setting_of(ds, method, **want)
        y = ds["step_cosine"].sel({"model": model, "method": method, "setting": at}).mean("seed").values
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
