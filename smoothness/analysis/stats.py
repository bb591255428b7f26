"""Rank and linear correlation, and a paired percentile bootstrap. Pure numpy, no scipy.

All functions work along the last axis and broadcast over the leading ones, so a whole bootstrap
distribution is one call: ``spearman(x, y)`` with x, y of shape (B, n) gives (B,) coefficients.
A row that holds a non-finite value, has fewer than 3 entries, or is constant gives NaN (scipy
gives NaN with a warning for the constant case); drop the points you cannot use before calling.
"""
from __future__ import annotations

import numpy as np


def rankdata(x) -> np.ndarray:
    """Average ranks (1-based, ties share the mean of their positions) along the last axis, as
    ``scipy.stats.rankdata(method="average")``. O(n^2) per row: meant for tens to hundreds of points."""
    x = np.asarray(x, dtype=np.float64)
    less = (x[..., None, :] < x[..., :, None]).sum(-1)                  # (..., n): how many are smaller
    equal = (x[..., None, :] == x[..., :, None]).sum(-1)                # (..., n): how many tie (self included)
    return less + (equal + 1) / 2.0


def pearson(x, y) -> np.ndarray | float:
    """Pearson's r along the last axis."""
    x, y = _pair(x, y)
    xm = x - x.mean(-1, keepdims=True)
    ym = y - y.mean(-1, keepdims=True)
    denom = np.sqrt((xm * xm).sum(-1) * (ym * ym).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(denom > 0, (xm * ym).sum(-1) / np.where(denom > 0, denom, 1.0), np.nan)
    r = np.clip(r, -1.0, 1.0)
    return _finish(r, x, y)


def spearman(x, y) -> np.ndarray | float:
    """Spearman's rho (Pearson's r of the average ranks) along the last axis."""
    x, y = _pair(x, y)
    bad = ~(np.isfinite(x).all(-1) & np.isfinite(y).all(-1))
    r = np.asarray(pearson(rankdata(np.where(np.isfinite(x), x, 0.0)), rankdata(np.where(np.isfinite(y), y, 0.0))))
    r = np.where(bad, np.nan, r)
    return float(r) if r.ndim == 0 else r


def _pair(x, y):
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape[-1:] != y.shape[-1:] or x.ndim == 0:
        raise ValueError(f"x and y need the same number of points on the last axis; got {x.shape} and {y.shape}")
    return np.broadcast_arrays(x, y)


def _finish(r, x, y):
    r = np.where(np.isfinite(x).all(-1) & np.isfinite(y).all(-1) & (x.shape[-1] >= 3), r, np.nan)
    return float(r) if np.ndim(r) == 0 else r


def bootstrap_ci(statistic, *samples, n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0,
                 return_distribution: bool = False):
    """Percentile bootstrap interval of ``statistic(*samples)``, resampling the LAST axis of every
    sample with replacement, with the same indices for all (paired).

    ``statistic`` gets the resampled arrays with one extra leading axis, (B, ..., n), and returns
    (B,) values. Draws: ``np.random.default_rng(seed).integers(0, n, (n_resamples, n))``. The
    interval is the (1 - confidence)/2 and (1 + confidence)/2 quantiles of the finite resampled
    values (linear interpolation, as ``scipy.stats.bootstrap(method="percentile")``); (nan, nan) if
    none is finite. Returns (low, high), plus the (B,) distribution when ``return_distribution``.
    """
    if not samples:
        raise ValueError("bootstrap_ci needs at least one sample")
    if not (isinstance(n_resamples, (int, np.integer)) and n_resamples >= 1):
        raise ValueError(f"n_resamples={n_resamples!r} is not allowed; use a positive integer")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence!r} is not allowed; use a number in (0, 1)")
    arrays = [np.asarray(s, dtype=np.float64) for s in samples]
    n = arrays[0].shape[-1]
    if any(a.shape[-1] != n for a in arrays):
        raise ValueError(f"samples differ in length along the resampled axis: {[a.shape for a in arrays]}")
    idx = np.random.default_rng(seed).integers(0, n, (n_resamples, n))     # (B, n)
    resampled = [np.moveaxis(a[..., idx], -2, 0) for a in arrays]          # (B, ..., n)
    dist = np.asarray(statistic(*resampled), dtype=np.float64).reshape(n_resamples)
    finite = dist[np.isfinite(dist)]
    if finite.size == 0:
        low = high = float("nan")
    else:
        tail = (1 - confidence) / 2
        low, high = (float(v) for v in np.quantile(finite, [tail, 1 - tail]))
    return (low, high, dist) if return_distribution else (low, high)
