"""Skip-Cache and baseline caches, schedules and cost accounting.

    from smoothness.cache import CacheConfig, apply_skip_cache
    with apply_skip_cache(model, CacheConfig.preset("dit-c2i", interval=3)) as state:
        x = diffusion.sample(model, shape, y, sampler_config)
    print(state.schedule, state.summary())
"""
from .schedule import PRESETS, CacheRule, RuleState, Schedule, parse_t2v, preset
from .skip_cache import METHODS, CacheConfig, CacheState, apply_cache, apply_skip_cache, sample

__all__ = ["METHODS", "PRESETS", "CacheConfig", "CacheRule", "CacheState", "RuleState", "Schedule",
           "apply_cache", "apply_skip_cache", "parse_t2v", "preset", "sample"]
