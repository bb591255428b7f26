"""The schedules the planner is judged against, on the same budget, each computed by the package.

* ``oracle``: the planner's dynamic programming with the *measured* caching error in place of the
  predicted one (LeMiCa-style global schedule from one uncached run's errors): for every fill step f
  and every k, the cache is filled by a full call on the chain's x_f and the chain's x_{f+1} ..
  x_{f+max_run} go through as cached calls; their relative L2 error against the uncached outputs is
  the edge cost. It costs about S * (1 + max_run) passes per k: the ceiling, not a practical method.
* ``uniform``: today's sweep over N, k and window (Skip-Cache's static rule), restricted to the
  settings whose theoretical speedup reaches the budget; the ``preselect`` with the least measured
  error (the oracle's edges) are the candidates, and the evaluation keeps the best of them by PSNR on
  its seeds (generous to the reference: it is chosen on the test chains).
* ``magcache``, ``teacache``, ``dbcache``, ``fbcache``: the calibrated dynamic caches with their own
  default settings and the threshold tuned (``tuning.bisect_threshold``) to the least one whose run
  on the calibration chain reaches the budget, counted in MACs of the calls that run made. Their cost:
  MagCache's and TeaCache's calibration run (one uncached chain, shared by the two but counted for
  each) plus every tuning chain of that budget's search (a chain another budget's search already ran
  is looked up, not rerun, but counted again: the cost is what tuning for that budget alone takes).
  A method that cannot run on the model
  (``CacheConfig.check``) or cannot reach the budget gives no candidate and says why.

``REFERENCES`` is the table the evaluation runs: name -> ``Reference``. A new method is one more
entry whose ``build`` returns its candidate ``CacheConfig`` s and calibration cost; ``planned``
marks the references that cache with the planner's own method (the planner's budget check applies).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from ..cache import CacheConfig
from ..cache.base import method_class
from ..cache.calibrate import Calibration
from ..cache.flops import schedule_cost
from ..diffusion import Diffusion, SamplerConfig
from .planner import PlanConfig, mask_cost, plan_with_costs
from .profile import ChainRecord, measure_fill
from .tuning import bisect_threshold, calibration_run, tuning_chain_speedup

INTERVALS = (2, 3, 4, 5, 6, 7, 8)                           # N of the uniform sweep
WINDOWS = ((-1, 1000), (20, 1000), (50, 900), (100, 800))   # (t_stop, t_start): cache while t_stop < t < t_start


@dataclass
class Context:
    """What every reference may use: the model, its chain and the measured edges (filled lazily)."""

    model: object
    sampler: SamplerConfig
    plan: PlanConfig
    seed: int = 0                    # the calibration chain (not an evaluation seed)
    class_label: int = 0
    measured: dict | None = None     # k -> cost[f, s] from measure_edges
    measured_passes: int = 0
    calibrated: Calibration | None = None                 # MagCache / TeaCache calibration (filled lazily)
    tuning: dict = field(default_factory=dict)            # (method, threshold) -> speedup on the tuning chain

    @property
    def method(self) -> str:
        return self.plan.method_for(self.model)

    @property
    def timesteps(self) -> list[int]:
        return Diffusion.for_config(self.sampler).chain

    def edges(self, log=None) -> dict:
        if self.measured is None:
            self.measured, self.measured_passes = measure_edges(self.model, self.method, self.plan.ks_for(self.model),
                                                                self.sampler, self.seed, self.class_label,
                                                                self.plan.max_run, log)
        return self.measured

    def calibration(self) -> Calibration:
        """One uncached run of the calibration chain (S passes), fitted once per Context."""
        if self.calibrated is None:
            self.calibrated = calibration_run(self.model, self.sampler, self.seed, self.class_label)
        return self.calibrated

    def tuning_speedup(self, config: CacheConfig) -> float:
        """``config``'s speedup (MACs) on the calibration chain; a repeated setting is looked up, not rerun."""
        key = (config.method, config.threshold)
        if key not in self.tuning:
            self.tuning[key] = tuning_chain_speedup(self.model, self.sampler, self.seed, self.class_label, config)
        return self.tuning[key]


def measure_edges(model, method: str, ks, sampler: SamplerConfig, seed: int, class_label: int, max_run: int,
                  log=None) -> tuple[dict, int]:
    """({k: measured cost[f, s]}, forward passes): one uncached chain, then every fill and gap."""
    diffusion = Diffusion.for_config(sampler)
    rec = ChainRecord(model, diffusion, sampler, seed, class_label)
    S, passes, out = sampler.num_steps, sampler.num_steps, {}
    for k in ks:
        cost = np.full((S, S), np.nan)
        for f in range(1, S):
            gaps = min(max_run, S - f)
            cost[f - 1, f:f + gaps] = measure_fill(model, method, k, diffusion, sampler, rec, f, gaps)
            passes += 1 + gaps
        out[k] = cost
        if log:
            log(f"  oracle edges for {method}{'' if method == 'fora' else f' k={k}'} measured")
    return out, passes


@dataclass(frozen=True)
class Candidates:
    configs: tuple[CacheConfig, ...]     # what the evaluation runs (it keeps the best by PSNR)
    calibration_passes: int              # forward passes spent choosing them
    note: str = ""                       # how they were chosen; without configs: why there are none
    tuning: tuple[tuple[float, float], ...] = ()   # dynamic methods: (threshold, speedup) of every tuning chain


@dataclass(frozen=True)
class Reference:
    build: Callable[[Context, float], Candidates]
    description: str
    planned: bool = True                 # caches with the planner's method (skip-cache / deep-reuse / fora)


def oracle(ctx: Context, budget: float) -> Candidates:
    p = plan_with_costs(ctx.model, ctx.edges(), budget, ctx.method, ctx.plan.max_run, ctx.timesteps, "measured")
    return Candidates((p.config,), ctx.measured_passes, f"measured error {p.predicted_error:.4g}")


def uniform_settings(ctx: Context, budget: float) -> list[tuple[float, CacheConfig]]:
    """(theoretical speedup, config) of every uniform setting that reaches ``budget``."""
    out, ks = [], ctx.plan.ks_for(ctx.model)
    for n, k, (stop, start) in itertools.product(INTERVALS, ks, WINDOWS):
        cfg = CacheConfig(method=ctx.method, interval=n, k=k, t_stop=stop, t_start=start)
        speed = float(schedule_cost(ctx.model, cfg, ctx.timesteps).attrs["theoretical_speedup"])
        if speed >= budget * (1 - 1e-12):
            out.append((speed, cfg))
    return out


def uniform(ctx: Context, budget: float, preselect: int = 3) -> Candidates:
    settings = uniform_settings(ctx, budget)
    if not settings:
        return Candidates((), 0, f"no uniform schedule (N <= {max(INTERVALS)}) reaches {budget:g}x")
    edges = ctx.edges()

    def measured(cfg):
        full = cfg.schedule(ctx.timesteps).full
        runs = max((len(r) for r in "".join("F" if f else "c" for f in full).split("F")), default=0)
        return mask_cost(edges[cfg.k], full) if runs <= ctx.plan.max_run else np.inf
    ranked = sorted(settings, key=lambda sc: measured(sc[1]))[:preselect]
    return Candidates(tuple(c for _, c in ranked), ctx.measured_passes, f"{len(settings)} settings reach the budget")


def tuned(ctx: Context, method: str, budget: float) -> Candidates:
    """``method`` with its threshold tuned to ``budget`` on the calibration chain (see the module doc)."""
    S = ctx.sampler.num_steps
    passes, cal = 0, None
    if method_class(method).calibration:
        cal, passes = ctx.calibration(), S
    base = CacheConfig(method=method, calibration=cal)
    try:
        base.check(ctx.model)
    except ValueError as err:
        return Candidates((), passes, f"{method} does not apply to this model: {err}")
    t = bisect_threshold(lambda tau: ctx.tuning_speedup(replace(base, threshold=tau)), budget, base.get("threshold"))
    passes += S * len(t.runs)
    if t.threshold is None:
        top = max(tau for tau, _ in t.runs)
        return Candidates((), passes, f"{method} reaches at most {t.speedup:.3f}x on the calibration chain "
                          f"(thresholds up to {top:g}); budget {budget:g}x", t.runs)
    return Candidates((replace(base, threshold=t.threshold),), passes,
                      f"threshold {t.threshold:.4g}: {t.speedup:.3f}x on the calibration chain "
                      f"({len(t.runs)} tuning chains)", t.runs)


def _dynamic(method: str, what: str) -> Reference:
    return Reference(lambda ctx, budget: tuned(ctx, method, budget), f"{what}, threshold tuned to the budget",
                     planned=False)


REFERENCES = {
    "oracle": Reference(oracle, "DP over steps with the measured caching error (the ceiling)"),
    "uniform": Reference(uniform, "best uniform-interval schedule (N, k, window) reaching the budget"),
    "magcache": _dynamic("magcache", "MagCache (calibrated residual-magnitude ratios)"),
    "teacache": _dynamic("teacache", "TeaCache (calibrated rescaled change of the modulated input)"),
    "dbcache": _dynamic("dbcache", "cache-dit DBCache (Fn = Bn = 1, warm-up 8)"),
    "fbcache": _dynamic("fbcache", "FirstBlockCache (first unit's residual change)"),
}
