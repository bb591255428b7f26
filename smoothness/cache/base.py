"""What every caching method shares: the registry of methods, their configuration (``CacheConfig``),
their per-run state (``CacheState``, with ``reset()``) and the ``Method`` base class.

A method is one class registered with ``@register``: it knows its name, which settings it uses,
``check(model, config)``, the MACs of each kind of call it makes (``call_macs``), whether it needs a
calibration file, and how it computes a call (``forward``). ``METHODS``, ``CacheConfig``'s
validation and name, the MAC accounting, the sweep's choices and the conformance suite
(``smoothness.cache.conformance``) all read the registry, so a new method is one class:

    @register
    class MyCache(Method):
        name = "my-cache"
        uses = ("interval", "window", "k")
        def forward(self, model, state, x, t, y, full): ...
        def call_macs(self, shape, config, kind): ...

Static methods (the schedule decides every call, shared by the whole batch) get ``full`` from the
schedule. Dynamic methods (``dynamic = True``) decide per row of the batch inside ``forward`` and
report ``state.note(kind, rows)``; every row keeps its own state, so the CFG halves and the samples
of a batch never share a decision.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from pathlib import Path

from .. import hooks
from .calibrate import load_calibration
from .schedule import CacheRule, RuleState, Schedule, preset

REGISTRY: dict[str, type["Method"]] = {}       # name -> Method subclass, in registration order
FORECASTS = ("reuse", "taylor1", "taylor2", "foca")   # how a reused value is filled (see forecast.py)
SETTINGS = ("interval", "window", "k", "threshold", "warmup", "max_cached", "fn", "bn", "boundary",
            "retention", "forecast", "calibration")


def register(cls):
    """Class decorator: add a ``Method`` subclass to the registry under ``cls.name``."""
    if not (isinstance(cls.name, str) and cls.name) or cls.name in REGISTRY:
        raise ValueError(f"method name {cls.name!r} is empty or already registered")
    bad = [s for s in cls.uses if s not in SETTINGS]
    if bad:
        raise ValueError(f"{cls.__name__}.uses names unknown settings {bad}; allowed: {', '.join(SETTINGS)}")
    REGISTRY[cls.name] = cls
    return cls


def method_names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def method_class(name: str) -> type["Method"]:
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; allowed: {', '.join(REGISTRY)}")
    return REGISTRY[name]


@dataclass(frozen=True)
class CacheConfig:
    """One caching method and its settings. A static method's schedule is the rule below unless
    ``mask`` is given; a dynamic method's threshold settings are ``None`` for its own defaults."""

    method: str = "skip-cache"      # a registered method (see METHODS)
    interval: int = 2               # N: a full step every N model calls (1 = never cache)
    k: int = 4                      # units recomputed on each side (skip-cache, deep-reuse, delta); DiT c2i: 4
    t_start: int = 1000             # calls with t >= t_start are full (1000 = never, as the DiT code)
    t_stop: int = 20                # after a call with t <= t_stop every later call is full (DiT: 20)
    stop_inclusive: bool = True     # stop test "t <= t_stop" (True) or "t < t_stop" (Latte c2v)
    mask: Schedule | None = None    # a custom full/cached pattern; overrides the rule when given
    threshold: float | None = None  # tau of a dynamic rule; None: the method's default; 0 = never cache
    warmup: int | None = None       # W: sampler steps always full at the start; None: the method's default
    max_cached: int | None = None   # most consecutive cached steps per row; None: the method's default
    fn: int | None = None           # dbcache / fbcache: front units always run (None: default)
    bn: int | None = None           # dbcache / fbcache: back units always run (None: default)
    boundary: int | None = None     # delta-dit: first sampler step of the front-cache stage (None: half the chain)
    retention: float | None = None  # magcache: fraction of the chain always full at the start (None: default)
    forecast: str = "reuse"         # fill of a reused feature: reuse, taylor1, taylor2 or foca
    calibration: object = None      # a Calibration (calibrate.py) or a path to its JSON; teacache, magcache

    def __post_init__(self):
        cls = method_class(self.method)
        if not (isinstance(self.k, int) and self.k >= 1):
            raise ValueError(f"k={self.k!r} is not allowed; use an integer >= 1 (units recomputed on each side)")
        if isinstance(self.mask, (str, list, tuple)):
            object.__setattr__(self, "mask", Schedule.from_mask(self.mask))
        if isinstance(self.calibration, (str, Path)):
            object.__setattr__(self, "calibration", load_calibration(self.calibration))   # read once
        self.rule  # validates interval and window
        if self.threshold is not None and not (isinstance(self.threshold, (int, float)) and self.threshold >= 0
                                               and math.isfinite(self.threshold)):
            raise ValueError(f"threshold={self.threshold!r} is not allowed; use a finite number >= 0 "
                             "(0 computes every step)")
        for name in ("warmup", "max_cached", "fn", "bn", "boundary"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, int) and v >= (0 if name in ("warmup", "bn", "boundary") else 1)):
                raise ValueError(f"{name}={v!r} is not allowed; use an integer >= "
                                 f"{0 if name in ('warmup', 'bn', 'boundary') else 1}")
        if self.retention is not None and not (isinstance(self.retention, (int, float)) and 0 <= self.retention <= 1):
            raise ValueError(f"retention={self.retention!r} is not allowed; use a fraction in 0..1")
        if self.forecast not in FORECASTS:
            raise ValueError(f"forecast={self.forecast!r} is not allowed; use one of {', '.join(FORECASTS)} "
                             "(taylor1/taylor2: TaylorSeer of order 1 or 2)")
        if self.forecast != "reuse" and "forecast" not in cls.uses:
            raise ValueError(f"{self.method} does not reuse features to forecast; forecast={self.forecast!r} is "
                             f"allowed with {', '.join(n for n, c in REGISTRY.items() if 'forecast' in c.uses)}")
        if self.mask is not None and cls.dynamic:
            raise ValueError(f"{self.method} decides at run time and cannot follow a fixed mask; use a static "
                             f"method ({', '.join(n for n, c in REGISTRY.items() if not c.dynamic)})")
        cls.validate(self)

    @classmethod
    def preset(cls, name: str, interval: int = 2, method: str = "skip-cache") -> "CacheConfig":
        """``dit-c2i``, ``latte-c2v``, ``latte-t2v`` or a ``N2-700-50`` spelling (see schedule.py)."""
        k, rule = preset(name, interval)
        return cls(method=method, interval=rule.interval, k=k, t_start=rule.t_start, t_stop=rule.t_stop,
                   stop_inclusive=rule.stop_inclusive)

    @property
    def rule(self) -> CacheRule:
        return CacheRule(self.interval, self.t_start, self.t_stop, self.stop_inclusive)

    @property
    def kind(self) -> type["Method"]:
        return method_class(self.method)

    def get(self, name: str):
        """A setting, or the method's default for it when the config leaves it ``None``."""
        v = getattr(self, name)
        return self.kind.defaults.get(name) if v is None else v

    def schedule(self, timesteps) -> Schedule:
        """The full/cached pattern this config produces over a chain (static methods only)."""
        if self.kind.dynamic:
            raise ValueError(f"{self.method} decides at run time: its pattern is state.schedule after a run")
        if "interval" not in self.kind.uses:
            return Schedule((True,) * len(timesteps), tuple(timesteps))
        if self.mask is not None:
            return self.mask.bind(timesteps)
        return Schedule.from_rule(self.rule, timesteps)

    @property
    def name(self) -> str:
        """A run name that encodes the settings, e.g. ``skip-cache_N3_20<t<1000_k4``."""
        return self.kind.config_name(self)

    def check(self, model):
        """Raise a clear error when this config cannot run on ``model``."""
        self.kind.check(model, self)


@dataclass
class CallRecord:
    step: int | None      # sampler step (1-based) or None outside a sampler
    timestep: int         # t on the 1000 scale
    full: bool            # True: every row ran the full model
    seconds: float        # wall time of the call
    rows: dict = field(default_factory=dict)   # kind of call ("full", "cached", ...) -> rows that made it


@dataclass
class CacheState:
    """Per-run state of one applied cache. ``reset()`` empties it; counters describe the run."""

    config: CacheConfig
    rule_state: RuleState = field(init=False)
    payload: dict | None = field(init=False, default=None)     # what the method cached at the last full step
    history: dict = field(init=False, default_factory=dict)    # forecasting: full-step values per key
    rows: dict | None = field(init=False, default=None)        # dynamic methods: per-row state (tensors (N, ...))
    calls: list[CallRecord] = field(init=False, default_factory=list)
    resets: int = field(init=False, default=0)                 # how many times the state was emptied
    _kinds: dict = field(init=False, default_factory=dict)     # rows per kind of the call in progress

    def __post_init__(self):
        self.rule_state = RuleState(self.config.rule)

    def reset(self):
        self.rule_state.reset()
        self.payload = None
        self.rows = None
        self.history = {}
        self.calls = []
        self.resets += 1

    def note(self, kind: str, rows: int):
        """Dynamic methods: ``rows`` rows of the current call were computed as ``kind``."""
        if rows:
            self._kinds[kind] = self._kinds.get(kind, 0) + rows

    # ------------------------------------------------------------ decisions
    def begin(self, t: int, batch: tuple[int, ...]) -> bool:
        """Decide full (True) or cached (False) for the call about to run (static methods)."""
        step, _ = hooks.current_step()          # the sampler's step scope (None outside a sampler)
        if step == 1 and self.calls:          # a new chain: never carry cache state across generations
            self.reset()
        self._kinds = {}
        cfg = self.config
        if cfg.kind.dynamic or "interval" not in cfg.kind.uses:
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

    def end(self, t: int, full: bool, seconds: float, batch: int, kind: str | None = None):
        """Record the call: ``kind`` of a static call (default "full"/"cached"); dynamic ones noted rows."""
        step, _ = hooks.current_step()
        kinds = self._kinds or {(kind or ("full" if full else "cached")): batch}
        self.calls.append(CallRecord(step, t, kinds.get("full", 0) == batch, seconds, kinds))
        self._kinds = {}
        self.rule_state.after(t, full)
        if self.config.mask is None and not self.rule_state.has_cache:
            self.payload = None               # the official reset after the stop call

    @property
    def position(self) -> int:
        """The sampler step (1-based) of the call in progress, or the call count outside a sampler."""
        step, _ = hooks.current_step()
        return step if step is not None else len(self.calls) + 1

    # ------------------------------------------------------------- summary
    @property
    def num_full(self) -> float:
        """Calls computed in full; a call whose rows decided differently counts its full fraction."""
        return sum(c.rows.get("full", 0) / sum(c.rows.values()) for c in self.calls) if self.calls else 0

    @property
    def num_cached(self) -> float:
        return len(self.calls) - self.num_full

    @property
    def schedule(self) -> Schedule:
        """The pattern actually run (from the recorded calls; a call is full when every row was)."""
        return Schedule(tuple(c.full for c in self.calls), tuple(c.timestep for c in self.calls))

    @property
    def mask(self) -> str:
        """``F`` every row full, ``c`` every row cached, ``m`` rows decided differently."""
        return "".join("F" if c.full else "c" if not c.rows.get("full") else "m" for c in self.calls)

    def macs(self, shape) -> int:
        """MACs of every call made, from the rows of each kind and the method's ``call_macs``."""
        method = self.config.kind()
        return sum(rows * method.call_macs(shape, self.config, kind) for c in self.calls
                   for kind, rows in c.rows.items())

    def summary(self) -> dict:
        full = [c.seconds for c in self.calls if c.full]
        cached = [c.seconds for c in self.calls if not c.full]
        mean = lambda v: sum(v) / len(v) if v else float("nan")
        return {"method": self.config.method, "config": self.config.name, "calls": len(self.calls),
                "full_steps": self.num_full, "cached_steps": self.num_cached, "mask": self.mask,
                "seconds": sum(full) + sum(cached), "seconds_per_full_call": mean(full),
                "seconds_per_cached_call": mean(cached)}


# ------------------------------------------------------------------- method
class Method:
    """One way of computing a full and a cached call; subclasses register with ``@register``.

    Class facts: ``name``; ``uses`` (the CacheConfig settings that matter, and enter the run name);
    ``defaults`` (values of settings left ``None``); ``dynamic`` (decides per row at run time);
    ``calibration`` (the part of a calibration file it needs, or None); ``batch_rule`` (how rows of a
    batch relate: "shared" = one decision per call from the schedule, "per-row" = every row alone);
    ``disabled`` / ``example``: settings the conformance suite runs (conformance.py).
    """

    name = "none"
    uses: tuple[str, ...] = ()
    defaults: dict = {}
    dynamic = False
    calibration: str | None = None
    disabled: dict = {}             # CacheConfig keywords that turn caching off (conformance: bit-identical)
    sweep: tuple[dict, ...] = ()    # dynamic methods: the settings a sweep runs by default (CacheConfig keywords)
    example: dict = {}              # CacheConfig keywords that cache on a short chain (conformance)

    @property
    def batch_rule(self) -> str:
        return "per-row" if self.dynamic else "shared"

    # --------------------------------------------------------------- config
    @classmethod
    def validate(cls, config: CacheConfig):
        """Raise ValueError for settings this method cannot take (model-independent)."""

    @classmethod
    def check(cls, model, config: CacheConfig):
        """Raise ValueError when ``config`` cannot run on ``model``."""
        if "k" in cls.uses and config.k > model.num_units // 2:
            raise ValueError(f"k={config.k} is not allowed for a model with {model.num_units} units; use "
                             f"1..{model.num_units // 2} (k units are recomputed on each side)")
        if cls.calibration and config.calibration is None:
            raise ValueError(f"{cls.name} needs a calibration file (python -m smoothness.cache calibrate); "
                             "give CacheConfig(calibration=PATH)")

    @classmethod
    def config_name(cls, c: CacheConfig) -> str:
        if not cls.uses:
            return cls.name
        parts = [cls.name]
        if "interval" in cls.uses:
            parts.append(f"mask{c.mask.to_cache_dit()}" if c.mask is not None else f"N{c.interval}_{c.rule.window}")
        short = {"threshold": "tau", "warmup": "W", "max_cached": "M", "fn": "F", "bn": "B", "boundary": "b",
                 "retention": "ret"}
        for s in ("threshold", "fn", "bn", "warmup", "max_cached", "retention", "boundary"):
            if s in cls.uses and c.get(s) is not None:
                parts.append(f"{short[s]}{c.get(s):g}")
        if "k" in cls.uses:
            parts.append(f"k{c.k}")
        if c.forecast != "reuse":
            parts.append(c.forecast)
        return "_".join(parts)

    @classmethod
    def sweep_settings(cls, ks, thresholds=None) -> list[dict]:
        """Dynamic methods: the settings (CacheConfig keywords) a sweep runs, ``thresholds`` replacing
        the default thresholds when given. Static methods are swept over intervals, k and windows."""
        if thresholds:
            return [{"threshold": float(t)} for t in thresholds]
        return [dict(d) for d in cls.sweep]

    # ------------------------------------------------------------------ run
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

    def call_kind(self, config: CacheConfig, timestep: int, full: bool) -> str:
        """The kind of call a static schedule makes at ``timestep`` (for ``flops.schedule_cost``)."""
        return "full" if full else "cached"

    def call_macs(self, shape, config: CacheConfig, kind: str) -> int:
        """MACs per sample of one call of ``kind`` ("full", "cached", or a method's own kinds)."""
        return shape.full_call()             # a flops.Shape: every unit and fusion runs


register(Method)      # "none": the uncached reference, every call full
