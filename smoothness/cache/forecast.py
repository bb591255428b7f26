"""Forecasting a reused feature instead of reusing it: TaylorSeer (order 1, 2) and FoCa.

A reusing method stores a feature F at its full steps (Skip-Cache: the input of unit L-k; FORA: each
branch output; delta / delta-dit: the deviation; dbcache: the middle residual) and reads it back at
cached steps. With ``CacheConfig.forecast`` other than "reuse" the read-back is a forecast from the
last full steps s_f'' < s_f' < s_f (sampler steps), at the current step s, e = s - s_f:

* ``taylor1`` (TaylorSeer order 1): F^(s) = F(s_f) + e * D1, D1 = (F(s_f) - F(s_f')) / (s_f - s_f').
* ``taylor2`` (TaylorSeer order 2): F^(s) = F(s_f) + e * D1 + e^2 / 2 * D2 with TaylorSeer's
  recursive difference D2 = (D1 - D1') / (s_f - s_f'), D1' the slope one full interval earlier.
* ``foca``: a trapezoidal (Heun-style) step on the last two slopes, F^(s) = F(s_f) + e / 2 * (D1 + D1'):
  the corrector damps the order-1 extrapolation when the slope is changing. Our reading of FoCa
  (arXiv 2508.16211) as a hyper-parameter-free predictor-corrector; cache-dit's FoCa calibrator is
  still a stub, so no reference code exists to match.

With fewer full steps than the order needs, the highest available order is used (plain reuse with
one full step). Values are kept per key in ``state.history`` and vanish with ``state.reset()``;
dynamic methods (dbcache's middle residual) keep one history per row (``remember_rows``).
"""
from __future__ import annotations

import torch


def remember(state, key, value):
    """Store ``value`` of ``key`` at the current full step (a no-op for plain reuse)."""
    if state.config.forecast == "reuse":
        return
    points = state.history.setdefault(key, [])
    points.append((state.position, value))
    del points[:-3]


def recall(state, key, stored):
    """The value of ``key`` at the current cached step: ``stored`` itself for plain reuse."""
    how = state.config.forecast
    points = state.history.get(key, [])
    if how == "reuse" or len(points) < 2:
        return stored
    (s2, f2), (s1, f1) = points[-2], points[-1]
    e = state.position - s1
    d1 = (f1 - f2) / (s1 - s2)
    if how == "taylor1" or len(points) < 3:
        return f1 + e * d1
    s3, f3 = points[-3]
    d1_prev = (f2 - f3) / (s2 - s3)
    if how == "taylor2":
        return f1 + e * d1 + (e * e / 2) * (d1 - d1_prev) / (s1 - s2)
    return f1 + (e / 2) * (d1 + d1_prev)                       # foca


# ------------------------------------------------------------------ per row
# Dynamic methods decide per row, so each row has its own full steps: the history is a tensor of
# steps (N, 3) (oldest first, NaN where a row has fewer) and three values shaped like the feature.

def remember_rows(rows: dict, key: str, value, mask, position: int):
    """Push ``value`` (every row's, shaped (N*R, ...)) as the newest point of the rows in ``mask`` (N,)."""
    n = mask.shape[0]
    steps = rows.get(f"{key}_steps", torch.full((n, 3), float("nan"), dtype=torch.float64))
    values = rows.get(f"{key}_values", [torch.zeros_like(value)] * 3)
    pushed = torch.cat([steps[:, 1:], torch.full((n, 1), float(position), dtype=torch.float64)], 1)
    rows[f"{key}_steps"] = torch.where(mask[:, None], pushed, steps)
    m = _rows_mask(mask, value)
    rows[f"{key}_values"] = [torch.where(m, new, old) for old, new in zip(values, values[1:] + [value])]


def recall_rows(how: str, rows: dict, key: str, stored, position: int):
    """Each row's forecast at ``position`` from its own last full steps (``stored`` for plain reuse);
    the same formulas as ``recall``, with a lower order where a row has fewer full steps."""
    if how == "reuse" or f"{key}_steps" not in rows:
        return stored
    steps, (f3, f2, f1) = rows[f"{key}_steps"], rows[f"{key}_values"]
    s3, s2, s1 = steps.unbind(1)
    e = position - s1
    d1 = torch.nan_to_num((f1 - f2) / _per_row(s1 - s2, f1), nan=0.0, posinf=0.0, neginf=0.0)
    d1_prev = torch.where(_per_row(s3.isnan(), f1).bool(), d1,
                          torch.nan_to_num((f2 - f3) / _per_row(s2 - s3, f1), nan=0.0))
    e = _per_row(e, f1)
    if how == "taylor1":
        return f1 + e * d1
    if how == "taylor2":
        d2 = torch.nan_to_num((d1 - d1_prev) / _per_row(s1 - s2, f1), nan=0.0)
        return f1 + e * d1 + (e * e / 2) * d2
    return f1 + (e / 2) * (d1 + d1_prev)                       # foca


def _per_row(v, like):
    """A per-sample (N,) tensor broadcast over ``like``'s (N*R, ...) rows."""
    v = v.to(like.dtype)
    return v.repeat_interleave(like.shape[0] // v.shape[0]).reshape(-1, *([1] * (like.dim() - 1)))


def _rows_mask(mask, like):
    return mask.repeat_interleave(like.shape[0] // mask.shape[0]).reshape(-1, *([1] * (like.dim() - 1)))
