"""What every caching method shares: its configuration (``CacheConfig``), its per-run state
(``CacheState``, with ``reset()``) and the ``Method`` base class whose ``forward`` computes a full or
a cached call. The methods themselves live in ``skip_cache.py`` and ``baselines.py``; the driver
that applies one to an unmodified model is ``skip_cache.apply_cache``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .. import hooks
from .schedule import CacheRule, RuleState, Schedule, preset

METHODS = ("skip-cache", "deep-reuse", "delta", "fora", "none")


@dataclass(frozen=True)
class CacheConfig:
    """One caching method and its schedule. The schedule is the rule below unless ``mask`` is given."""

    method: str = "skip-cache"      # one of METHODS
    interval: int = 2               # N: a full step every N model calls (1 = never cache)
    k: int = 4                      # units recomputed on each side (skip-cache, deep-reuse, delta); DiT c2i: 4
    t_start: int = 1000             # calls with t >= t_start are full (1000 = never, as the DiT code)
    t_stop: int = 20                # after a call with t <= t_stop every later call is full (DiT: 20)
    stop_inclusive: bool = True     # stop test "t <= t_stop" (True) or "t < t_stop" (Latte c2v)
    mask: Schedule | None = None    # a custom full/cached pattern; overrides the rule when given

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; allowed: {', '.join(METHODS)}")
        if not (isinstance(self.k, int) and self.k >= 1):
            raise ValueError(f"k={self.k!r} is not allowed; use an integer >= 1 (units recomputed on each side)")
        if isinstance(self.mask, (str, list, tuple)):
            object.__setattr__(self, "mask", Schedule.from_mask(self.mask))
        self.rule  # validates interval and window

    @classmethod
    def preset(cls, name: str, interval: int = 2, method: str = "skip-cache") -> "CacheConfig":
        """``dit-c2i``, ``latte-c2v``, ``latte-t2v`` or a ``N2-700-50`` spelling (see schedule.py)."""
        k, rule = preset(name, interval)
        return cls(method=method, interval=rule.interval, k=k, t_start=rule.t_start, t_stop=rule.t_stop,
                   stop_inclusive=rule.stop_inclusive)

    @property
    def rule(self) -> CacheRule:
        return CacheRule(self.interval, self.t_start, self.t_stop, self.stop_inclusive)

    def schedule(self, timesteps) -> Schedule:
        """The full/cached pattern this config produces over a chain (sampling order, 1000 scale)."""
        if self.method == "none":
            return Schedule((True,) * len(timesteps), tuple(timesteps))
        if self.mask is not None:
            return self.mask.bind(timesteps)
        return Schedule.from_rule(self.rule, timesteps)

    @property
    def name(self) -> str:
        """A run name that encodes the settings, e.g. ``skip-cache_N3_k4_20<t<1000``."""
        if self.method == "none":
            return "none"
        sched = f"mask{self.mask.to_cache_dit()}" if self.mask is not None else f"N{self.interval}_{self.rule.window}"
        return f"{self.method}_{sched}" + (f"_k{self.k}" if self.method not in ("fora",) else "")

    def check(self, model):
        """Raise a clear error when this config cannot run on ``model``."""
        units = model.num_units
        if self.method in ("skip-cache", "deep-reuse", "delta") and self.k > units // 2:
            raise ValueError(f"k={self.k} is not allowed for a model with {units} units; use 1..{units // 2} "
                             "(k units are recomputed on each side)")
        if self.method == "skip-cache" and not model.skip_into:
            raise ValueError("Skip-Cache needs a model with skip branches (a Skip-DiT); this model has none. "
                             "Use method='deep-reuse' for the same schedule on a vanilla DiT")


@dataclass
class CallRecord:
    step: int | None      # sampler step (1-based) or None outside a sampler
    timestep: int         # t on the 1000 scale
    full: bool            # True: full model; False: cached
    seconds: float        # wall time of the call


@dataclass
class CacheState:
    """Per-run state of one applied cache. ``reset()`` empties it; counters describe the run."""

    config: CacheConfig
    rule_state: RuleState = field(init=False)
    payload: dict | None = field(init=False, default=None)     # what the method cached at the last full step
    calls: list[CallRecord] = field(init=False, default_factory=list)
    resets: int = field(init=False, default=0)                 # how many times the state was emptied

    def __post_init__(self):
        self.rule_state = RuleState(self.config.rule)

    def reset(self):
        self.rule_state.reset()
        self.payload = None
        self.calls = []
        self.resets += 1

    # ------------------------------------------------------------ decisions
    def begin(self, t: int, batch: tuple[int, ...]) -> bool:
        """Decide full (True) or cached (False) for the call about to run."""
        step, _ = hooks.current_step()          # the sampler's step scope (None outside a sampler)
        if step == 1 and self.calls:          # a new chain: never carry cache state across generations
            self.reset()
        cfg = self.config
        if cfg.method == "none":
            return True
        if cfg.mask is not None:
            i = (step - 1) if step is not None else len(self.calls)
            if i >= len(cfg.mask):
                raise ValueError(f"the mask has {len(cfg.mask)} steps but the sampler asked for step {i + 1}; "
                                 "allowed: a mask with exactly one entry per sampler step")
            full = cfg.mask.full[i]
        else:
            full = self.rule_state.decide(t)
        if self.payload is None:
            return True                         # the official ``cache_val is None`` guard
        if not full and self.payload.get("batch") != batch:
            raise ValueError(f"the batch changed from {self.payload.get('batch')} to {batch} between calls; "
                             "call state.reset() between generations of different sizes")
        return full

    def end(self, t: int, full: bool, seconds: float):
        step, _ = hooks.current_step()
        self.calls.append(CallRecord(step, t, full, seconds))
        self.rule_state.after(t, full)
        if self.config.mask is None and not self.rule_state.has_cache:
            self.payload = None               # the official reset after the stop call

    # ------------------------------------------------------------- summary
    @property
    def num_full(self) -> int:
        return sum(c.full for c in self.calls)

    @property
    def num_cached(self) -> int:
        return len(self.calls) - self.num_full

    @property
    def schedule(self) -> Schedule:
        """The pattern actually run (from the recorded calls)."""
        return Schedule(tuple(c.full for c in self.calls), tuple(c.timestep for c in self.calls))

    def summary(self) -> dict:
        full = [c.seconds for c in self.calls if c.full]
        cached = [c.seconds for c in self.calls if not c.full]
        mean = lambda v: sum(v) / len(v) if v else float("nan")
        return {"method": self.config.method, "config": self.config.name, "calls": len(self.calls),
                "full_steps": len(full), "cached_steps": len(cached), "mask": self.schedule.mask if self.calls else "",
                "seconds": sum(full) + sum(cached), "seconds_per_full_call": mean(full),
                "seconds_per_cached_call": mean(cached)}


# ------------------------------------------------------------------- method
class Method:
    """One way of computing a full and a cached call. Subclasses live in skip_cache.py and baselines.py."""

    name = "none"

    def overrides(self, model, state: CacheState) -> dict:
        """Extra module forwards to swap while the cache is applied (module -> new forward)."""
        return {}

    def forward(self, model, state: CacheState, x, t, y, full: bool):
        trunk = model.embed(x, t, y)
        for u in range(model.num_units):
            model.run_unit(u, trunk)
        if full:
            state.payload = {}
        return model.head(trunk)
