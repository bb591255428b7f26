"""Skip-Cache and baseline caches, schedules and cost accounting.

Engine layer: the method base and state (``base``), Skip-Cache and the driver (``skip_cache``), the
baselines (``baselines``), schedules and presets (``schedule``), MAC counts (``flops``) and the sweep
as library code (``sweep``, with ``SweepConfig``). May import the core (models, diffusion, hooks,
chain, data, metrics) and nothing above it; ``cli`` and ``__main__`` are ``python -m smoothness.cache``.

    from smoothness.cache import CacheConfig, apply_skip_cache
    with apply_skip_cache(model, CacheConfig.preset("dit-c2i", interval=3)) as state:
        x = diffusion.sample(model, shape, y, sampler_config)
    print(state.schedule, state.summary())
"""
from .base import METHODS, CacheConfig, CacheState, Method
from .schedule import PRESETS, CacheRule, RuleState, Schedule, parse_t2v, preset
from .skip_cache import apply_cache, apply_skip_cache, get_method, sample

__all__ = ["METHODS", "PRESETS", "CacheConfig", "CacheRule", "CacheState", "Method", "RuleState", "Schedule",
           "apply_cache", "apply_skip_cache", "get_method", "parse_t2v", "preset", "sample"]
