"""Plan a cache schedule from a model's smoothness profile, and judge it against references.

Analysis layer (it reads the engines ``surface`` and ``cache``): the per-step, per-unit profile
(``profile``), the planner (``planner``: a calibrated map from smoothness to predicted caching error,
dynamic programming over steps under a MAC budget), the references on the same budget
(``references``: best uniform schedule, the measured-error oracle, and the calibrated dynamic caches
with their threshold tuned to the budget by ``tuning``; a table new methods join) and the evaluation
(``evaluate``). ``cli`` and ``__main__`` are ``python -m smoothness.plan``.

    from smoothness.plan import ProfileConfig, profile, Calibration, plan
    prof = profile(load_entries(["digits-skip-dit"])[0], ProfileConfig())
    p = plan(model, prof, budget=2.0, calibration=Calibration.fit(prof))
    p.schedule.mask, p.schedule.to_cache_dit(), p.schedule.to_json()
"""
from .planner import Calibration, Plan, PlanConfig, best_mask, plan
from .profile import ProfileConfig, check_profile, cost_line, profile

__all__ = ["Calibration", "Plan", "PlanConfig", "ProfileConfig", "best_mask", "check_profile", "cost_line", "plan",
           "profile"]
