"""Figures from datasets. Every function takes data and returns a figure; none reads files.

Axes convention (loss-landscape's transposed axes are a known bug): x is always alpha, y is beta.
Arrays are laid out as Z[j, i] = f(alpha_i, beta_j), matching ``np.meshgrid(alpha, beta)``.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import xarray as xr


def _panel(ds: xr.Dataset, readout: str | None, seed) -> xr.DataArray:
    s = ds["surface"]
    s = s.sel(readout=readout if readout is not None else s.readout.values[0])
    s = s.mean("seed") if seed is None else s.sel(seed=seed)
    return s


def _xyz(da: xr.DataArray):
    a, b = da["alpha"].values, da["beta"].values
    X, Y = np.meshgrid(a, b)                                        # (n_beta, n_alpha)
    return X, Y, da.transpose("beta", "alpha").values


def _zlim(s: xr.DataArray):
    lo, hi = float(s.min()), float(s.max())
    pad = 0.02 * (hi - lo or 1.0)
    return lo - pad, hi + pad


def _cells(s: xr.DataArray):
    """(row, col, step, model, panel, zlo, zhi) for each model (column) and step (row); the models of a
    row share one z range."""
    models, steps = list(s.model.values), list(s.step.values)
    for r, step in enumerate(steps):
        zlo, zhi = _zlim(s.sel(step=step))
        for c, model in enumerate(models):
            yield r, c, step, model, s.sel(model=model, step=step), zlo, zhi


def surfaces(ds: xr.Dataset, readout: str | None = None, seed=None, kind: str = "3d", cmap: str = "viridis"):
    """The paper's layout: models side by side, one row per step; the models of a row share one z
    range (as the paper's Fig. 2, whose rows have their own ranges). ``kind`` is ``"3d"``
    (plot_surface) or ``"contour"`` (filled contours)."""
    if kind not in ("3d", "contour"):
        raise ValueError(f"unknown kind {kind!r}; allowed: 3d, contour")
    s = _panel(ds, readout, seed)
    models, steps = list(s.model.values), list(s.step.values)
    fig = plt.figure(figsize=(4.2 * len(models), 3.6 * len(steps)))
    metric = ds["surface"].attrs.get("long_name", "similarity")
    for r, c, step, model, da, zlo, zhi in _cells(s):
        X, Y, Z = _xyz(da)
        idx = r * len(models) + c + 1
        title = f"{model}\nstep {int(step)} (t={int(da.timestep)})"
        if kind == "3d":
            ax = fig.add_subplot(len(steps), len(models), idx, projection="3d")
            ax.plot_surface(X, Y, Z, cmap=cmap, vmin=zlo, vmax=zhi, linewidth=0, antialiased=True)
            ax.set_zlim(zlo, zhi)
            ax.set_zlabel(metric, fontsize=7)
        else:
            ax = fig.add_subplot(len(steps), len(models), idx)
            cs = ax.contourf(X, Y, Z, levels=np.linspace(zlo, zhi, 16), cmap=cmap)
            fig.colorbar(cs, ax=ax, shrink=0.8, label=metric)
        pad = 8 if kind == "3d" else 4.0                   # 3D: keep the labels clear of the tick labels
        ax.set_xlabel("alpha", labelpad=pad)
        ax.set_ylabel("beta", labelpad=pad)
        ax.set_title(title, fontsize=9)
    src = ds.attrs.get("mode", "")
    fig.suptitle(f"{metric} of the {s.readout.item() if s.readout.size == 1 else ''} under {src} perturbation "
                 f"({ds.attrs.get('norm', '')}-normalized, {ds.attrs.get('chain', '')})", fontsize=10)
    fig.tight_layout()
    return fig


def heatmap(ds: xr.DataArray | xr.Dataset, model=None, step=None, readout: str | None = None, seed=None):
    """Seaborn heatmaps, one panel per model (column) and step (row), as ``surfaces`` lays them out;
    ``model`` / ``step`` pick one. In each panel columns are alpha and rows beta (beta increasing
    upwards); the models of a row share one colour range."""
    import seaborn as sns
    s = _panel(ds, readout, seed)
    s = s.sel(model=[model] if model is not None else list(s.model.values),
              step=[step] if step is not None else list(s.step.values))
    n_models, n_steps = s.sizes["model"], s.sizes["step"]
    fig, axes = plt.subplots(n_steps, n_models, figsize=(6 * n_models, 5 * n_steps), squeeze=False)
    label = ds["surface"].attrs.get("long_name", "")
    for r, c, st, m, da, zlo, zhi in _cells(s):
        table = da.transpose("beta", "alpha").to_pandas().iloc[::-1]
        table.index = [f"{v:.3g}" for v in table.index]
        table.columns = [f"{v:.3g}" for v in table.columns]
        ax = axes[r, c]
        sns.heatmap(table, ax=ax, cmap="viridis", vmin=zlo, vmax=zhi, cbar_kws={"label": label})
        ax.set_xlabel("alpha")
        ax.set_ylabel("beta")
        ax.set_title(f"{m} step {int(st)} (t={int(da.timestep)})")
    fig.tight_layout()
    return fig


def surfaces_plotly(ds: xr.Dataset, readout: str | None = None, seed=None):
    """Interactive 3D surfaces (plotly), one per model and step; save with ``write_html``."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots
    s = _panel(ds, readout, seed)
    models, steps = list(s.model.values), list(s.step.values)
    fig = make_subplots(rows=len(steps), cols=len(models), specs=[[{"type": "surface"}] * len(models)] * len(steps),
                        subplot_titles=[f"{m} step {int(st)}" for st in steps for m in models])
    metric = ds["surface"].attrs.get("long_name", "similarity")
    for r, c, step, model, da, zlo, zhi in _cells(s):
        _, _, Z = _xyz(da)
        fig.add_trace(go.Surface(x=da["alpha"].values, y=da["beta"].values, z=Z, cmin=zlo, cmax=zhi,
                                 colorscale="Viridis", showscale=False, name=f"{model} step {int(step)}",
                                 hovertemplate="alpha %{x:.3g}<br>beta %{y:.3g}<br>" + metric + " %{z:.5f}<extra></extra>"),
                      row=r + 1, col=c + 1)
    fig.update_scenes(xaxis_title="alpha", yaxis_title="beta", zaxis_title=metric)
    fig.update_layout(height=420 * len(steps), width=520 * len(models), title=f"{metric} surfaces")
    return fig
