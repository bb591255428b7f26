"""Dynamic caches tuned to a budget: the least threshold whose run reaches a theoretical speedup.

A dynamic method (dbcache, fbcache, magcache, teacache) decides per row at run time, so its speedup
is only known after a run. It is counted like every other speedup in the package, from MACs
(``cache.flops.run_cost``: the rows of each kind of call the run actually made, against the same
calls uncached), on one **tuning chain**: the calibration chain of the references (the ``Context``'s
seed and class, batch 1, the sampler the schedule is for), never an evaluation seed.

``bisect_threshold`` finds the threshold, only the threshold; every other setting stays the method's
own default:

1. **bracket**: from the method's default threshold, double it while its run misses the budget, or
   halve it while its run reaches it (at most ``max_steps`` times either way; below that, threshold 0,
   which never caches), until one threshold misses and the next reaches the budget;
2. **bisection** between the two, ``iters`` times (the midpoint replaces the end with its outcome),
   so the bracket shrinks to 1 / 2 ** iters of its lower end;
3. **rule**: the smallest threshold visited whose run reaches the budget: the least caching, hence the
   least error, that meets the budget on the tuning chain.

The speedup is a step function of the threshold and, since each decision changes the chain that
follows, not strictly monotone: bisection then finds *a* threshold where the budget is crossed, not
necessarily the least one. A threshold tuned on one chain gives a slightly different speedup on
another (the evaluation seeds), which ``plan.evaluate`` reports per run. No threshold up to
``start * 2 ** max_steps`` reaching the budget means the method cannot reach it (its warm-up and
``max_cached`` limit how many steps it may cache): no threshold is returned.

Cost, in forward passes (a pass is one model call on the chain's rows, cached or not, as the profile
counts them): one uncached calibration chain (S passes) for a method that needs a ``Calibration``,
plus S passes per tuning chain.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .. import chain
from ..cache.calibrate import Calibration, calibrate
from ..cache.flops import run_cost
from ..cache.sweep import run_chain
from ..diffusion import Diffusion, SamplerConfig

ITERS = 6        # bisection steps after the bracket: the threshold within 1/64 of the bracket's lower end
MAX_STEPS = 8    # doublings (or halvings) of the default threshold before giving up (or trying 0)


@dataclass(frozen=True)
class Tuned:
    threshold: float | None                   # the rule's threshold; None: no threshold tried reached the budget
    speedup: float                            # its speedup on the tuning chain (the largest reached when None)
    runs: tuple[tuple[float, float], ...]     # (threshold, speedup) of every tuning chain, in the order run


def bisect_threshold(speedup: Callable[[float], float], budget: float, start: float, iters: int = ITERS,
                     max_steps: int = MAX_STEPS) -> Tuned:
    """The least threshold found whose ``speedup(threshold)`` reaches ``budget`` (see the module doc);
    ``speedup`` is called once per distinct threshold, each call a tuning chain."""
    if not (start > 0 and iters >= 0 and max_steps >= 0):
        raise ValueError(f"start={start!r}, iters={iters!r}, max_steps={max_steps!r} are not allowed; use a "
                         "start > 0 and counts >= 0")
    seen: dict[float, float] = {}

    def reaches(tau: float) -> bool:
        if tau not in seen:
            seen[tau] = float(speedup(tau))
        return seen[tau] >= budget

    lo, hi = _bracket(reaches, float(start), max_steps)
    if hi is None:
        return Tuned(None, max(seen.values()), tuple(seen.items()))
    if lo is not None:
        for _ in range(iters):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if reaches(mid) else (mid, hi)
    best = min(t for t, s in seen.items() if s >= budget)
    return Tuned(best, seen[best], tuple(seen.items()))


def _bracket(reaches: Callable[[float], bool], tau: float, max_steps: int) -> tuple[float | None, float | None]:
    """(a threshold that misses, the next one that reaches): (lo, None) when none reaches, (None, 0.0)
    when threshold 0 (never caching) already reaches the budget."""
    if reaches(tau):
        for _ in range(max_steps):
            if not reaches(tau / 2):
                return tau / 2, tau
            tau /= 2
        return (0.0, tau) if not reaches(0.0) else (None, 0.0)
    for _ in range(max_steps):
        if reaches(tau * 2):
            return tau, tau * 2
        tau *= 2
    return tau, None


def tuning_chain_speedup(model, sampler: SamplerConfig, seed: int, class_label: int, config) -> float:
    """Theoretical speedup (MACs of the calls the run made) of ``config`` on the tuning chain."""
    y = chain.labels(model, class_label, 1)
    _, _, _, state = run_chain(model, Diffusion.for_config(sampler), (1, *model.sample_shape()), y, sampler, seed,
                               config)
    return float(run_cost(model, state).attrs["theoretical_speedup"])


def calibration_run(model, sampler: SamplerConfig, seed: int, class_label: int, label: str = "") -> Calibration:
    """MagCache's and TeaCache's calibration from one uncached tuning chain (S passes)."""
    y = chain.labels(model, class_label, 1)
    return calibrate(model, Diffusion.for_config(sampler), (1, *model.sample_shape()), y, sampler, seed=seed,
                     label=label)
