"""Figures of the analyses: correlation scatter, feature-dynamics heat map, spectral norms.

Like ``plots.surfaces``: every function takes a Dataset and returns a matplotlib Figure; none reads files
or computes anything but seed means.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import xarray as xr

COLORS = [f"C{i}" for i in range(10)]


def _check(ds: xr.Dataset, dim: str, value, what: str):
    allowed = [str(v) for v in ds[dim].values]
    if str(value) not in allowed:
        raise ValueError(f"unknown {what} {value!r}; allowed: {', '.join(allowed)}")


def _seed(da: xr.DataArray, seed):
    if seed is None:
        return da.mean("seed")
    _check(da.to_dataset(name="v"), "seed", seed, "seed")
    return da.sel(seed=seed)


def _wants_log(values: np.ndarray) -> bool:
    v = values[np.isfinite(values)]
    return v.size > 1 and (v > 0).all() and v.max() / v.min() > 30


# ------------------------------------------------------------------ correlation
def correlation_scatter(ds: xr.Dataset, score: str = "mean_deviation", error: str = "rel_l2", ax=None):
    """Caching error (y) against a smoothness score (x) at every (model, step): seed means, bars
    spanning the seeds' range; one colour per model, each point labelled with its step."""
    _check(ds, "score", score, "score")
    _check(ds, "error", error, "error")
    fig, ax = (plt.subplots(figsize=(6.4, 4.8)) if ax is None else (ax.figure, ax))
    x_all, y_all = ds.smoothness.sel(score=score), ds.caching_error.sel(error=error)
    for i, m in enumerate(ds.model.values):
        x, y = x_all.sel(model=m), y_all.sel(model=m)                  # (step, seed)
        xm, ym = x.mean("seed").values, y.mean("seed").values
        xerr = np.stack([xm - x.min("seed").values, x.max("seed").values - xm])
        yerr = np.stack([ym - y.min("seed").values, y.max("seed").values - ym])
        method = f" ({ds.method.sel(model=m).item()})" if "method" in ds.coords else ""
        ax.errorbar(xm, ym, xerr=xerr, yerr=yerr, fmt="o", color=COLORS[i % 10], ecolor=COLORS[i % 10],
                    alpha=0.85, capsize=2, label=f"{m}{method}")
        for s, xv, yv in zip(ds.step.values, xm, ym):
            ax.annotate(f"{int(s)}", (xv, yv), textcoords="offset points", xytext=(4, 4), fontsize=7,
                        color=COLORS[i % 10])
    if _wants_log(x_all.mean("seed").values):
        ax.set_xscale("log")
    if _wants_log(y_all.mean("seed").values):
        ax.set_yscale("log")
    units = ds.error_units.sel(error=error).item() if "error_units" in ds.coords else ""
    ax.set_xlabel(f"smoothness score: {score} (larger = rougher)")
    ax.set_ylabel(f"caching error: {error}" + (f" ({units})" if units not in ("", "1") else ""))
    if "spearman" in ds:
        r = ds.sel(group="all", score=score, error=error)
        pct = f"{100 * ds.attrs.get('confidence', 0.95):g} %"
        ax.set_title(f"Spearman rho {float(r.spearman):+.2f} [{float(r.spearman_low):+.2f}, "
                     f"{float(r.spearman_high):+.2f}], Pearson r {float(r.pearson):+.2f} "
                     f"[{float(r.pearson_low):+.2f}, {float(r.pearson_high):+.2f}]\n"
                     f"n = {int(r.n_points)} (model, step) points, {pct} bootstrap over {ds.sizes['seed']} seeds; "
                     f"{ds.attrs.get('chain', '')}, labels = steps", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------ dynamics
def dynamics_heatmap(ds: xr.Dataset, metric: str = "rel_l2", seed=None, log_scale: bool = True):
    """One panel per model: block (y, 0 at the bottom) against timestep (x, from t = 999 on the left
    to 0 on the right, the sampling order); one colour scale shared by all panels."""
    from matplotlib.colors import LogNorm, Normalize
    _check(ds, "metric", metric, "metric")
    da = _seed(ds["change"].sel(metric=metric), seed)                  # (model, block, step)
    vals = da.values
    finite = vals[np.isfinite(vals) & (vals > 0)] if log_scale else vals[np.isfinite(vals)]
    lo, hi = (finite.min(), finite.max()) if finite.size else (1e-6, 1.0)
    norm = LogNorm(lo, max(hi, lo * 1.0001)) if log_scale else Normalize(lo, hi)
    n = ds.sizes["model"]
    fig, axes = plt.subplots(n, 1, figsize=(8.0, 2.2 + 1.8 * n), squeeze=False, sharex=True)
    t = ds.timestep.values
    edges = np.concatenate([[t[0] + (t[0] - t[1]) / 2 if len(t) > 1 else t[0] + 0.5],
                            (t[:-1] + t[1:]) / 2, [t[-1] - (t[-2] - t[-1]) / 2 if len(t) > 1 else t[-1] - 0.5]])
    b = ds.block.values
    b_edges = np.concatenate([[b[0] - 0.5], (b[:-1] + b[1:]) / 2, [b[-1] + 0.5]])
    mesh = None
    for ax, m in zip(axes[:, 0], ds.model.values):
        z = np.ma.masked_invalid(da.sel(model=m).transpose("block", "step").values)
        if log_scale:
            z = np.ma.masked_less_equal(z, 0)
        mesh = ax.pcolormesh(edges, b_edges, z, cmap="magma", norm=norm, shading="flat")
        ax.set_xlim(edges[0], edges[-1])                             # t decreasing to the right
        ax.set_ylabel("block")
        ax.set_title(f"{m}", fontsize=9)
    axes[-1, 0].set_xlabel("timestep t (sampling runs left to right)")
    label = ds.metric_long_name.sel(metric=metric).item() if "metric_long_name" in ds.coords else metric
    fig.colorbar(mesh, ax=axes[:, 0].tolist(), label=f"{metric}", shrink=0.9)
    who = "mean over seeds" if seed is None else f"seed {seed}"
    fig.suptitle(f"{label}\n{ds.attrs.get('chain', '')}, {who}", fontsize=9)
    return fig


# ------------------------------------------------------------------ spectral norms
def spectral_norms(ds: xr.Dataset, seed=None):
    """Left: per-unit sigma (``sigma_unit``, else ``sigma_block``) against unit, one colour per model,
    darker for later steps. Right: end-to-end sigma against timestep (when measured)."""
    from matplotlib.ticker import MaxNLocator
    per = "sigma_unit" if "sigma_unit" in ds else ("sigma_block" if "sigma_block" in ds else None)
    panels = [p for p in (per, "sigma_end_to_end" if "sigma_end_to_end" in ds else None) if p]
    if not panels:
        raise ValueError("the dataset holds no sigma_* variable; compute at least one map")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.4 * len(panels), 4.2), squeeze=False)
    steps = ds.step.values
    for p, ax in zip(panels, axes[0]):
        da = _seed(ds[p], seed)
        for i, m in enumerate(ds.model.values):
            if p == "sigma_end_to_end":
                ax.plot(ds.timestep.values, da.sel(model=m).values, "o-", color=COLORS[i % 10], label=str(m))
            else:
                for k, s in enumerate(steps):
                    shade = 0.35 + 0.65 * (k + 1) / len(steps)
                    ax.plot(ds.unit.values, da.sel(model=m, step=s).values, "o-", ms=3, color=COLORS[i % 10],
                            alpha=shade, label=f"{m}, step {int(s)} (t={int(ds.timestep.sel(step=s))})")
        if p == "sigma_end_to_end":
            ax.set_xlabel("timestep t")
            ax.invert_xaxis()
            ax.set_title("end to end: h_embed -> h_final", fontsize=9)
        else:
            ax.set_xlabel("unit (block on DiT)")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_title("per unit: " + ("fusion + blocks, skip fixed" if p == "sigma_unit" else "blocks alone"),
                         fontsize=9)
        ax.set_ylabel("largest singular value of the Jacobian")
        if _wants_log(da.values):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=1 if len(steps) * ds.sizes["model"] <= 8 else 2)
    who = "mean over seeds" if seed is None else f"seed {seed}"
    fig.suptitle(f"Jacobian spectral norms, {ds.attrs.get('chain', '')}, {who}", fontsize=9)
    fig.tight_layout()
    return fig
