"""The dynamic references of the planner (smoothness.plan.references / tuning): the threshold search
on hand-made functions, the tuned threshold meeting the budget on the tuning chain (MACs counted by a
naive loop over the calls), its cost equal to counted forward passes, and a method that cannot run
giving no candidate and a reason."""
import pytest
import torch

from smoothness import chain
from smoothness.cache import CacheConfig, apply_cache
from smoothness.cache.flops import Shape, always_macs
from smoothness.diffusion import Diffusion, SamplerConfig
from smoothness.plan import PlanConfig
from smoothness.plan.references import REFERENCES, Context
from smoothness.plan.tuning import ITERS, bisect_threshold

pytestmark = pytest.mark.usefixtures("single_thread")
CHAIN = SamplerConfig(num_steps=16, cfg_scale=2.0, clip_denoised=True)     # > dbcache's warm-up of 8
BUDGET = 1.25                   # dbcache (warm-up 8, half the units cached) reaches 1.33x at 16 steps
DYNAMIC = ("magcache", "teacache", "dbcache", "fbcache")


def counted(calls: list):
    """speedup(tau) recording every call."""
    def speedup(tau):
        calls.append(tau)
        return 1 + tau / 0.7                                   # reaches 2 from tau = 0.7 on
    return speedup


# ------------------------------------------------------------------ the search
@pytest.mark.parametrize("start, bracket_lo", [(0.1, 0.4), (3.0, 0.375)])   # doubling up / halving down
def test_bisection_finds_the_least_threshold_of_a_monotone_function(start, bracket_lo):
    calls = []
    t = bisect_threshold(counted(calls), 2.0, start)
    assert 0.7 <= t.threshold <= 0.7 + bracket_lo / 2 ** ITERS                 # within the bisection's resolution
    assert t.speedup == pytest.approx(1 + t.threshold / 0.7) and t.speedup >= 2.0
    assert len(calls) == len(set(calls)) == len(t.runs)                        # one run per distinct threshold
    assert all((s >= 2.0) == (tau >= 0.7) for tau, s in t.runs)


def test_bisection_on_a_step_function_returns_a_reaching_threshold():
    speedup = lambda tau: 1 + min(int(tau * 10), 20) / 10      # 1.5 reached from tau = 0.5 on, in steps of 0.1
    t = bisect_threshold(speedup, 1.5, 0.08)
    assert 0.5 <= t.threshold <= 0.5 + 0.32 / 2 ** ITERS and t.speedup == 1.5
    below = max(tau for tau, s in t.runs if tau < t.threshold)
    assert speedup(below) < 1.5                                 # the next threshold down misses it


def test_bisection_says_when_no_threshold_reaches_the_budget():
    calls = []
    t = bisect_threshold(lambda tau: calls.append(tau) or min(1 + tau, 1.5), 2.0, 0.1, max_steps=5)
    assert t.threshold is None and t.speedup == 1.5 and len(calls) == 6 and max(calls) == pytest.approx(3.2)
    assert bisect_threshold(lambda tau: 1.0, 1.0, 0.1).threshold == 0.0     # no caching needed: threshold 0
    with pytest.raises(ValueError, match="start"):
        bisect_threshold(lambda tau: 1.0, 2.0, 0.0)


# ------------------------------------------------------------------ on a model
def run_on_tuning_chain(model, config, class_label=1, seed=0):
    """The cached chain on the calibration seed; (speedup from a naive MAC count, cached rows)."""
    diffusion, shape = Diffusion.for_config(CHAIN), Shape.of(model)
    y = chain.labels(model, class_label, 1)
    with torch.inference_mode(), apply_cache(model, config) as state:
        for _ in diffusion.sample_steps(model, (1, *model.sample_shape()), y, CHAIN, seed=seed):
            pass
    units = model.num_units
    fn, bn = (config.get("fn"), config.get("bn")) if config.method.endswith("bcache") else (0, 0)
    per_unit = (shape.full_call() - always_macs(shape)) / units                # tiny plain DiT: no fusions
    cached_call = always_macs(shape) + (fn + bn) * per_unit
    signal = 6 * shape.hidden ** 2 if config.method == "teacache" else 0      # block 0's adaLN Linear(H, 6H)
    total = base = 0.0
    for c in state.calls:
        total += c.rows.get("full", 0) * (shape.full_call() + signal) + c.rows.get("cached", 0) * (cached_call + signal)
        base += sum(c.rows.values()) * shape.full_call()
    return base / total, sum(c.rows.get("cached", 0) for c in state.calls)


@pytest.mark.parametrize("method", DYNAMIC)
def test_tuned_threshold_meets_the_budget_on_the_tuning_chain(tiny, method):
    ctx = Context(tiny, CHAIN, PlanConfig(), seed=0, class_label=1)
    cands = REFERENCES[method].build(ctx, BUDGET)
    (config,) = cands.configs
    speed, cached = run_on_tuning_chain(tiny, config)
    assert speed >= BUDGET
    assert dict(cands.tuning)[config.threshold] == pytest.approx(speed)       # the search counted the same MACs
    below = max(tau for tau, _ in cands.tuning if tau < config.threshold)    # the nearest threshold that missed
    speed_below, cached_below = run_on_tuning_chain(tiny, CacheConfig(method=method, threshold=below,
                                                                      calibration=config.calibration))
    assert speed_below < BUDGET and cached_below < cached
    assert config.threshold - below <= config.threshold / 2 ** (ITERS - 1)


@pytest.mark.parametrize("method", ["magcache", "dbcache"])
def test_calibration_cost_equals_counted_forward_passes(tiny_skip, method):
    rows = []
    ctx = Context(tiny_skip, CHAIN, PlanConfig(), seed=0, class_label=1)
    handle = tiny_skip.final_layer.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    try:
        cands = REFERENCES[method].build(ctx, BUDGET)
    finally:
        handle.remove()
    assert cands.configs and sum(rows) // 2 == cands.calibration_passes       # CFG: 2 rows per pass
    calibration = 16 if method == "magcache" else 0
    assert cands.calibration_passes == calibration + 16 * len(cands.tuning)
    again = REFERENCES[method].build(ctx, BUDGET)             # looked up, not rerun, but its cost is still counted
    assert again.configs == cands.configs and again.calibration_passes == cands.calibration_passes


def test_a_method_that_cannot_run_gives_no_candidate_and_says_why(make_model):
    one_unit = make_model("DiT-Mini/2", depth=1)
    ctx = Context(one_unit, CHAIN, PlanConfig(), seed=0, class_label=1)
    cands = REFERENCES["dbcache"].build(ctx, BUDGET)
    assert cands.configs == () and cands.calibration_passes == 0 and "fn=1 + bn=1" in cands.note
