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
one full step). Values are kept per key in ``state.history`` and vanish with ``state.reset()``.
"""
from __future__ import annotations


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
