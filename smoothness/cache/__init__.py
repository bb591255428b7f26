"""Skip-Cache and the other caching methods as plug-ins, schedules, calibration and cost accounting.

Engine layer: the registry, config, state and method base (``base``), Skip-Cache and the driver
(``skip_cache``), the fixed-schedule baselines and Delta-DiT (``baselines``), the dynamic rules
FBCache / DBCache / MagCache / TeaCache (``dynamic``), TaylorSeer / FoCa forecasting (``forecast``),
calibration files (``calibrate``), the conformance suite every method passes (``conformance``),
schedules and presets (``schedule``), MAC counts (``flops``) and the sweep (``sweep``). May import
the core (models, diffusion, hooks, chain, data, metrics) and nothing above it; ``cli`` and
``__main__`` are ``python -m smoothness.cache``.

    from smoothness.cache import CacheConfig, apply_skip_cache
    with apply_skip_cache(model, CacheConfig.preset("dit-c2i", interval=3)) as state:
        x = diffusion.sample(model, shape, y, sampler_config)
    print(state.schedule, state.summary())
"""
from . import skip_cache, baselines, dynamic  # noqa: F401  (registers the methods, in this order)
from .base import REGISTRY, CacheConfig, CacheState, Method, method_names, register
from .schedule import PRESETS, CacheRule, RuleState, Schedule, parse_t2v, preset
from .skip_cache import apply_cache, apply_skip_cache, get_method, sample

METHODS = tuple(n for n in method_names() if n != "none") + ("none",)   # built-in, "none" last; method_names() is live

__all__ = ["METHODS", "PRESETS", "REGISTRY", "CacheConfig", "CacheRule", "CacheState", "Method", "RuleState",
           "Schedule", "apply_cache", "apply_skip_cache", "get_method", "method_names", "parse_t2v", "preset",
           "register", "sample"]
