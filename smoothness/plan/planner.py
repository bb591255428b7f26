"""The planner: a cache schedule for a MAC budget from a smoothness profile.

The rule (the package's own, from the two halves it measures):

1. **Proxy.** Caching at step s with the cache filled at the last full step f < s feeds the model a
   stale feature. Its staleness is the feature's drift since f, estimated from the feature dynamics
   as the sum of the per-step changes, ``drift_u(f, s) = sum_{j=f+1..s} change_u(j)``; its effect on
   the output is the unit's first-order sensitivity measured by the local surface, ``gain_u(s)``. The
   proxy is ``x(f, s) = sum_{u in sites} gain_u(s) * drift_u(f, s)``: sites = {unit L-k-1} (its output
   is the input of unit L-k, the feature Skip-Cache and deep-reuse reuse) or every unit (FORA).
2. **Calibration.** Predicted caching error ``e(f, s) = a * x(f, s) ** b`` with b >= 0 (monotone),
   fitted by least squares in log-log on the profile's measured calibration errors (a few fills,
   cached calls 1..3 steps later). A calibration fitted on one model can be applied to another.
3. **Budget.** With per-call MACs M_full and M_cached(k) (``cache.flops``), S steps of which C are
   cached give the theoretical speedup S M_full / ((S - C) M_full + C M_cached). The planner takes the
   least C whose speedup reaches the budget: the budget is met exactly in MACs (one cached step
   fewer would miss it).
4. **Dynamic programming over steps.** Step 1 is full; among masks with exactly C cached steps and
   at most ``max_run`` cached steps in a row it finds the one minimising the summed predicted error
   ``sum over cached s of e(last full before s, s)`` (``best_mask``, exact, O(S^2 C)). For Skip-Cache
   and deep-reuse every k that can reach the budget is planned and the least predicted error wins.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import xarray as xr

from ..cache import CacheConfig, Schedule
from ..cache.flops import Shape, call_macs, schedule_cost
from ..diffusion import Diffusion
from .profile import method_for

METHODS = ("auto", "skip-cache", "deep-reuse", "fora")


@dataclass(frozen=True)
class PlanConfig:
    """What the planner may choose."""

    method: str = "auto"                 # auto: skip-cache on a model with skips, fora on one without
    ks: tuple[int, ...] | None = None    # k candidates (skip-cache, deep-reuse); None: 1 .. units/2
    max_run: int = 10                    # at most this many cached steps in a row

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; allowed: {', '.join(METHODS)}")
        if not (isinstance(self.max_run, int) and self.max_run >= 1):
            raise ValueError(f"max_run={self.max_run!r} is not allowed; use an integer >= 1")
        if self.ks is not None and (not self.ks or any(not (isinstance(k, int) and k >= 1) for k in self.ks)):
            raise ValueError(f"ks={self.ks!r} is not allowed; use integers >= 1 or None")

    def method_for(self, model) -> str:
        return method_for(self.method, model)

    def ks_for(self, model) -> list[int]:
        if self.method_for(model) == "fora":
            return [1]
        half = model.num_units // 2
        top = half - 1 if self.method_for(model) == "skip-cache" else half   # skip-cache k = L/2 saves nothing
        return [k for k in (self.ks or range(1, top + 1)) if k <= top] or [1]


# ------------------------------------------------------------------ proxy and calibration
def sites(method: str, k: int, units: int) -> list[int]:
    return list(range(units)) if method == "fora" else [units - k - 1]


def proxy(prof: xr.Dataset, method: str, k: int) -> np.ndarray:
    """x[f, s] (0-based steps, f < s) from the profile, seed-averaged; NaN where f >= s."""
    change = np.nan_to_num(prof.change.mean("seed").values)                # (S, U); step 1 has no change
    gain = prof.gain.mean("seed").values                                   # (S, U)
    S, U = change.shape
    cum = np.cumsum(change, axis=0)                                        # cum[s] = sum_{j<=s} change[j]
    x = np.zeros((S, S))
    for u in sites(method, k, U):
        drift = cum[None, :, u] - cum[:, None, u]                          # [f, s] = sum_{j=f+1..s}
        x += gain[None, :, u] * drift
    x[np.tril_indices(S)] = np.nan
    return x


@dataclass(frozen=True)
class Calibration:
    """Predicted error = a * proxy ** b (b >= 0), fitted on ``fitted_on``'s measured errors."""

    a: float
    b: float
    fitted_on: str = ""      # the model whose profile gave the fit
    points: int = 0          # (proxy, measured error) pairs used
    spearman: float = float("nan")   # rank agreement of proxy and measured error on those pairs

    @classmethod
    def fit(cls, prof: xr.Dataset) -> "Calibration":
        xs, ys = calibration_pairs(prof)
        ok = (xs > 0) & (ys > 0) & np.isfinite(xs) & np.isfinite(ys)
        if ok.sum() < 2:
            raise ValueError(f"the profile of {prof.attrs.get('model')} has {int(ok.sum())} usable calibration "
                             "points; allowed: 2 or more (profile with more probes or calib gaps)")
        lx, ly = np.log(xs[ok]), np.log(ys[ok])
        b = max(0.0, float(np.polyfit(lx, ly, 1)[0])) if np.ptp(lx) > 0 else 0.0
        a = float(np.exp(np.mean(ly - b * lx)))
        from_stats = _spearman(xs[ok], ys[ok])
        return cls(a, b, str(prof.attrs.get("model", "")), int(ok.sum()), from_stats)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.a * np.power(np.clip(x, 0, None), self.b)

    def __str__(self) -> str:
        return f"error = {self.a:.3g} * proxy^{self.b:.3g} (fitted on {self.fitted_on}, {self.points} points)"


def _spearman(x, y) -> float:
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1]) if len(x) > 2 else float("nan")


def calibration_pairs(prof: xr.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """(proxy, measured error) of every calibration measurement in the profile."""
    method, xs, ys = prof.attrs["calib_method"], [], []
    err = prof.calib_error.mean("seed")
    for k in prof.calib_k.values:
        x = proxy(prof, method, int(k))
        for f in prof.probe_step.values:
            for g in prof.gap.values:
                xs.append(x[f - 1, f - 1 + g])
                ys.append(float(err.sel(calib_k=k, probe_step=f, gap=g)))
    return np.asarray(xs), np.asarray(ys)


# ------------------------------------------------------------------ budget
def cached_needed(steps: int, full_macs: int, cached_macs: int, budget: float) -> int | None:
    """The least number of cached steps whose theoretical speedup reaches ``budget`` (None: none)."""
    for c in range(steps):
        if steps * full_macs >= budget * ((steps - c) * full_macs + c * cached_macs) * (1 - 1e-12):
            return c
    return None


def max_cached(steps: int, max_run: int) -> int:
    """Step 1 is full and at most ``max_run`` cached steps follow each full one."""
    return steps - -(-steps // (max_run + 1))


def reach(model, method: str, ks, steps: int, max_run: int) -> tuple[float, int]:
    """(the largest theoretical speedup any candidate k reaches, that k)."""
    shape, c = Shape.of(model), max_cached(steps, max_run)
    best = (1.0, ks[0])
    for k in ks:
        full, cached = call_macs(shape), call_macs(shape, method, k, False)
        best = max(best, (steps * full / ((steps - c) * full + c * cached), k))
    return best


def check_budget(model, budget: float, method: str, ks, steps: int, max_run: int):
    top, k = reach(model, method, ks, steps, max_run)
    if not (np.isfinite(budget) and budget >= 1.0):
        raise ValueError(f"budget={budget!r} is not allowed; use a speedup >= 1 (at most {top:.3f} here)")
    if budget > top * (1 + 1e-12):
        raise ValueError(f"budget {budget:g}x is above what caching reaches on this model: at most {top:.3f}x "
                         f"({method}{'' if method == 'fora' else f' k={k}'}, {max_cached(steps, max_run)} of "
                         f"{steps} steps cached, at most {max_run} in a row)")


# ------------------------------------------------------------------ dynamic programming
def best_mask(cost: np.ndarray, cached: int, max_run: int) -> tuple[tuple[bool, ...], float]:
    """The mask (step 1 full) with exactly ``cached`` cached steps, at most ``max_run`` in a row,
    minimising sum over cached s of cost[f, s], f the last full step before s (0-based [f, s]).
    Exact: best[g, n] = least cost of steps before full step g with n of them cached."""
    S = cost.shape[0]
    if not 0 <= cached <= max_cached(S, max_run):
        raise ValueError(f"{cached} cached steps of {S} do not fit at most {max_run} in a row")
    c = np.where(np.isfinite(cost), cost, np.inf)
    seg = np.full((S, S + 1), np.inf)                      # seg[f, g]: full at f, cached f+1..g-1, g full (or end)
    for f in range(S):
        run = 0.0
        seg[f, f + 1] = 0.0
        for g in range(f + 2, min(S, f + max_run + 1) + 1):
            run += c[f, g - 1]
            seg[f, g] = run
    best = np.full((S + 1, cached + 1), np.inf)            # over full steps g (g = S: the end)
    back = np.full((S + 1, cached + 1), -1)
    best[0, 0] = 0.0
    for g in range(1, S + 1):
        for f in range(max(0, g - max_run - 1), g):
            n = g - f - 1                                  # cached between f and g
            if n > cached or not np.isfinite(seg[f, g]):
                continue
            cand = best[f, : cached + 1 - n] + seg[f, g]
            better = cand < best[g, n:]
            best[g, n:] = np.where(better, cand, best[g, n:])
            back[g, n:] = np.where(better, f, back[g, n:])
    if not np.isfinite(best[S, cached]):
        raise ValueError(f"no mask with {cached} cached steps has a finite cost")
    full, g, n = [False] * S, S, cached
    while g > 0:
        f = int(back[g, n])
        full[f] = True
        n, g = n - (g - f - 1), f
    return tuple(full), float(best[S, cached])


def mask_cost(cost: np.ndarray, full) -> float:
    """The DP objective of one mask (a naive loop, for checks)."""
    total, last = 0.0, 0
    for s, f in enumerate(full):
        if f:
            last = s
        else:
            total += cost[last, s]
    return total


# ------------------------------------------------------------------ planning
@dataclass(frozen=True)
class Plan:
    config: CacheConfig              # method, k and mask, ready for apply_cache
    budget: float
    theoretical_speedup: float       # from cache.flops.schedule_cost
    predicted_error: float           # the DP objective (sum of per-step errors)
    calibration: str                 # what the errors came from

    @property
    def schedule(self) -> Schedule:
        return self.config.mask

    def summary(self) -> str:
        m = self.config
        return (f"{m.method}{'' if m.method == 'fora' else f' k={m.k}'}: {self.schedule}\n"
                f"  theoretical speedup {self.theoretical_speedup:.3f}x (budget {self.budget:g}x), predicted error "
                f"{self.predicted_error:.4g} ({self.calibration})")


def plan_with_costs(model, costs: dict[int, np.ndarray], budget: float, method: str, max_run: int, timesteps,
                    label: str) -> Plan:
    """The best plan over the k in ``costs`` ({k: cost[f, s]}) meeting ``budget`` exactly in MACs."""
    steps = len(timesteps)
    check_budget(model, budget, method, list(costs), steps, max_run)
    shape, best = Shape.of(model), None
    for k, cost in costs.items():
        c = cached_needed(steps, call_macs(shape), call_macs(shape, method, k, False), budget)
        if c is None or c > max_cached(steps, max_run):
            continue
        full, err = best_mask(cost, c, max_run)
        if best is None or err < best[2]:
            best = (k, full, err)
    k, full, err = best
    cfg = CacheConfig(method=method, k=k, mask=Schedule.from_mask(full))
    speed = float(schedule_cost(model, cfg, timesteps).attrs["theoretical_speedup"])
    return Plan(cfg, budget, speed, err, label)


def chain_of(prof: xr.Dataset) -> list[int]:
    """The timesteps of the chain a profile was taken on (its coordinate, else its spacing attributes)."""
    if "timestep" in prof.coords:
        return [int(t) for t in prof["timestep"].values]
    spacing, offset = prof.attrs.get("spacing", "even"), int(prof.attrs.get("steps_offset", 0))
    return Diffusion.respaced(prof.sizes["step"], spacing, offset).chain


def plan(model, prof: xr.Dataset, budget: float, calibration: Calibration, cfg: PlanConfig = PlanConfig()) -> Plan:
    """Plan a schedule for ``model`` from its profile (check it with ``check_profile`` first)."""
    method = cfg.method_for(model)
    if method == "skip-cache" and not model.skip_into:
        raise ValueError("Skip-Cache needs a model with skip branches; use method deep-reuse or fora")
    timesteps = chain_of(prof)
    costs = {k: calibration(proxy(prof, method, k)) for k in cfg.ks_for(model)}
    return plan_with_costs(model, costs, budget, method, cfg.max_run, timesteps, str(calibration))
