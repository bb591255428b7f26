"""Scalar smoothness scores of surfaces: what the correlation with caching quality uses.

All scores work on the deviation from the origin value, dev = |f(alpha, beta) - f(0, 0)| (that is
1 - cosine, or the relative distance itself), so larger always means less smooth:

    mean_deviation    mean of dev over the grid (the paper's flatness, as one number)
    at_radius         mean dev on the circle sqrt(alpha^2 + beta^2) = radius (bilinear interpolation)
    total_variation   mean |grad dev| over the grid (how fast it changes)
    laplacian_energy  mean (laplacian of dev)^2 over the grid (how jagged it is)
    curvature         (d2/dalpha2 + d2/dbeta2) dev / 2 at the origin, by finite differences
"""
from __future__ import annotations

import numpy as np
import xarray as xr

from .similarity import METRICS


def deviation(surface: xr.DataArray) -> xr.DataArray:
    origin = surface.sel(alpha=0.0, beta=0.0)
    return abs(surface - origin)


def _second_derivative(f, x, axis):
    """Second derivative along ``axis`` on a possibly non-uniform grid (np.gradient twice)."""
    return np.gradient(np.gradient(f, x, axis=axis), x, axis=axis)


def _origin_curvature(dev: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    i, j = int(np.flatnonzero(a == 0)[0]), int(np.flatnonzero(b == 0)[0])

    def d2(f_minus, f0, f_plus, h1, h2):                      # three-point, non-uniform spacing
        return 2 * (h2 * f_minus - (h1 + h2) * f0 + h1 * f_plus) / (h1 * h2 * (h1 + h2))
    out = []
    for axis_vals, idx, take in ((a, i, lambda k: dev[..., k, j]), (b, j, lambda k: dev[..., i, k])):
        if 0 < idx < len(axis_vals) - 1:
            out.append(d2(take(idx - 1), take(idx), take(idx + 1),
                          axis_vals[idx] - axis_vals[idx - 1], axis_vals[idx + 1] - axis_vals[idx]))
        else:
            out.append(np.full(dev.shape[:-2], np.nan))
    return (out[0] + out[1]) / 2


def smoothness_scores(ds: xr.Dataset, radius: float | None = None) -> xr.Dataset:
    """Scores per (model, step, readout, seed) as a Dataset; ``radius`` defaults to half the
    smaller grid extent."""
    if not isinstance(ds, xr.Dataset) or "surface" not in ds or not {"alpha", "beta"} <= set(ds["surface"].dims):
        have = sorted(map(str, ds.data_vars)) if isinstance(ds, xr.Dataset) else type(ds).__name__
        raise ValueError(f"smoothness_scores needs a surface Dataset (a 'surface' variable over alpha and beta); "
                         f"got {have}")
    if radius is not None and not (np.isfinite(radius) and radius > 0):
        raise ValueError(f"radius={radius!r} is not allowed; use a positive number or None")
    s = ds["surface"].transpose(..., "alpha", "beta")
    a, b = s["alpha"].values, s["beta"].values
    dev = deviation(s).transpose(..., "alpha", "beta")
    v = dev.values
    if radius is None:
        radius = 0.5 * min(abs(a).max(), abs(b).max())
    theta = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    circle = dev.interp(alpha=xr.DataArray(radius * np.cos(theta), dims="theta"),
                        beta=xr.DataArray(radius * np.sin(theta), dims="theta")).mean("theta")
    ga, gb = np.gradient(v, a, axis=-2), np.gradient(v, b, axis=-1)
    lap = _second_derivative(v, a, -2) + _second_derivative(v, b, -1)
    lead = dev.dims[:-2]
    coords = {k: dev.coords[k] for k in dev.coords if set(dev.coords[k].dims) <= set(lead)}
    mk = lambda arr, long_name: xr.DataArray(arr, dims=lead, coords=coords, attrs={"long_name": long_name})
    metric = ds["surface"].attrs.get("metric", ds.attrs.get("metric", "cosine"))
    out = xr.Dataset({
        "mean_deviation": mk(v.mean(axis=(-2, -1)), f"mean deviation of {METRICS[metric][0]} from the origin"),
        "at_radius": circle.drop_vars([c for c in circle.coords if c not in coords]).assign_attrs(
            long_name=f"mean deviation at radius {radius:g}"),
        "total_variation": mk(np.sqrt(ga ** 2 + gb ** 2).mean(axis=(-2, -1)), "mean gradient magnitude of the deviation"),
        "laplacian_energy": mk((lap ** 2).mean(axis=(-2, -1)), "mean squared Laplacian of the deviation"),
        "curvature": mk(_origin_curvature(v, a, b), "mean curvature of the deviation at the origin"),
    })
    out.attrs.update({"radius": radius, "metric": metric})
    return out
