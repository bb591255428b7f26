"""Which sampler steps run the full model and which reuse the cache.

A ``Schedule`` is a full/cached pattern over a sampler's timestep chain (sampling order). It prints
as a mask string (``F`` full, ``c`` cached) and converts to and from

* cache-dit's ``steps_computation_mask``: one ``1`` (compute) or ``0`` (cache) per step, e.g.
  ``"1111110100100001000010000100"``;
* SmoothCache-style JSON: ``{"<component>": [1, 0, ...]}`` with one entry per step, 1 = compute.

``CacheRule`` is Skip-Cache's static rule, a state machine run once per model call, exactly as in the
official code (paper-spec section 2.2)::

    full = (cache_cont % N == 0) or (cache_val is None) or (t >= t_start)
    ... run the model (full or cached) ...
    cache_cont += 1
    if t <= t_stop (or t < t_stop):  cache_cont = 0; cache_val = None     # AFTER the call

So the first call at or below ``t_stop`` can itself be cached; every later call is full. Presets:

=============  ===  =========  ========  ======  =====================================================
preset          k    t_start    t_stop    stop    official code
=============  ===  =========  ========  ======  =====================================================
``dit-c2i``     4    1000       20        ``<=``  class-to-image/models.py ``DiT_cache`` (1000 = never)
``latte-c2v``   1    900        50        ``<``   class-to-video ``Latte_skip_cache`` (1 = one pair)
``N2-700-50``   1    700        50        ``<=``  text-to-video ``--cache N{N}-{start}-{stop}``
``hunyuan``     1    700        50        ``<=``  text-to-image hydit/modules/models_cache.py
                                                  ``HunYuanDiT_cache`` (cache_step = N, cache_at_branch = k)
=============  ===  =========  ========  ======  =====================================================

``hunyuan``: a full call when ``cache_cont % cache_step == 0`` or ``t >= 700``; a cached call runs
blocks 0..k-1 and D-k..D-1, block D-k taking the input cached at the last full call (before its
fusion) and fusing the fresh skip; ``cache_cont`` resets and the cache empties after a call with
``t <= 50``. HunYuan-DiT's native skips pair block i with D-1-i, so Skip-Cache needs no Skip-DiT
fusions there.

The ``<`` / ``<=`` difference at the stop is the official code's own inconsistency, kept per preset.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from ..diffusion import TRAIN_STEPS



@dataclass(frozen=True)
class CacheRule:
    """Skip-Cache's static rule: a full step every ``interval`` calls inside a timestep window."""

    interval: int = 2               # N: a full step every N model calls (1 = never cache)
    t_start: int = 1000             # calls with t >= t_start are always full (1000 = never, as DiT)
    t_stop: int = 20                # after a call with t <= t_stop the state resets: later calls are full
    stop_inclusive: bool = True     # "t <= t_stop" (DiT, T2V, Hunyuan) or "t < t_stop" (Latte c2v)

    def __post_init__(self):
        if not (isinstance(self.interval, int) and self.interval >= 1):
            raise ValueError(f"interval={self.interval!r} is not allowed; use an integer >= 1 "
                             "(1 computes every step)")
        for name in ("t_start", "t_stop"):
            v = getattr(self, name)
            if not (isinstance(v, int) and -1 <= v <= TRAIN_STEPS):
                raise ValueError(f"{name}={v!r} is not allowed; use an integer timestep in -1..{TRAIN_STEPS}")
        if self.t_stop >= self.t_start:
            raise ValueError(f"the window is inverted: t_stop={self.t_stop} must be below t_start={self.t_start} "
                             "(caching happens for t_stop < t < t_start)")

    @property
    def window(self) -> str:
        return f"{self.t_stop}{'<' if self.stop_inclusive else '<='}t<{self.t_start}"

    def stops_at(self, t: int) -> bool:
        return t <= self.t_stop if self.stop_inclusive else t < self.t_stop


class RuleState:
    """The official state machine: ``decide(t)`` before a call, ``after(t)`` once the call is done."""

    def __init__(self, rule: CacheRule):
        self.rule = rule
        self.reset()

    def reset(self):
        self.cont = 0              # official ``cache_cont``
        self.has_cache = False     # official ``cache_val is not None``

    def decide(self, t: int) -> bool:
        r = self.rule
        return self.cont % r.interval == 0 or not self.has_cache or t >= r.t_start

    def after(self, t: int, full: bool):
        if full:
            self.has_cache = True
        self.cont += 1
        if self.rule.stops_at(t):
            self.reset()


@dataclass(frozen=True)
class Schedule:
    """Full/cached pattern over a sampler's chain; ``full[i]`` belongs to ``timesteps[i]`` (step i+1)."""

    full: tuple[bool, ...]               # True: run the whole model; False: reuse the cache
    timesteps: tuple[int, ...] | None = None   # the chain in sampling order, 1000 scale; None: unknown

    def __post_init__(self):
        object.__setattr__(self, "full", tuple(bool(f) for f in self.full))
        if not self.full:
            raise ValueError("a schedule needs at least one step")
        if self.timesteps is not None:
            object.__setattr__(self, "timesteps", tuple(int(t) for t in self.timesteps))
            if len(self.timesteps) != len(self.full):
                raise ValueError(f"mask has {len(self.full)} steps but the chain has {len(self.timesteps)}; "
                                 "allowed: exactly one entry per sampler step")
        if not self.full[0]:
            raise ValueError("the first step of a schedule must be full (there is nothing cached yet); "
                             f"got mask {self.mask!r}")

    # ------------------------------------------------------------ builders
    @classmethod
    def from_rule(cls, rule: CacheRule, timesteps) -> "Schedule":
        state, full = RuleState(rule), []
        for t in timesteps:
            f = state.decide(int(t))
            state.after(int(t), f)
            full.append(f)
        return cls(tuple(full), tuple(timesteps))

    @classmethod
    def from_mask(cls, mask, timesteps=None) -> "Schedule":
        """From ``"FccF..."`` (F/c), ``"1001..."`` (cache-dit) or a list of 0/1 or bools."""
        if isinstance(mask, str):
            text = mask.strip()
            if re.fullmatch(r"[01]+", text):
                vals = [ch == "1" for ch in text]
            elif re.fullmatch(r"[FfCc]+", text) and not re.fullmatch(r"[01]*", text):
                vals = [ch in "Ff" for ch in text]
            else:
                raise ValueError(f"mask {mask!r} is not allowed; use a string of 1/0 (compute/cache) "
                                 "or F/c (full/cached)")
        else:
            vals = list(mask)
            if any(v not in (0, 1, True, False) for v in vals):
                raise ValueError(f"mask {mask!r} is not allowed; use a list of 0/1 (1 = compute)")
        if timesteps is not None and len(vals) != len(timesteps):
            raise ValueError(f"mask has {len(vals)} steps but the sampler has {len(timesteps)}; "
                             "allowed: exactly one entry per sampler step")
        return cls(tuple(bool(v) for v in vals), None if timesteps is None else tuple(timesteps))

    @classmethod
    def from_cache_dit(cls, mask, timesteps=None) -> "Schedule":
        """cache-dit ``steps_computation_mask`` (string or list of 1/0, 1 = compute)."""
        return cls.from_mask("".join(str(int(v)) for v in mask) if not isinstance(mask, str) else mask, timesteps)

    @classmethod
    def from_json(cls, text: str, component: str | None = None, timesteps=None) -> "Schedule":
        """SmoothCache-style ``{"component": [1, 0, ...]}``; without ``component`` all must agree."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"schedule JSON does not parse: {e}") from None
        if not isinstance(data, dict) or not data:
            raise ValueError("schedule JSON must be an object {component: [1, 0, ...]}")
        if component is not None:
            if component not in data:
                raise ValueError(f"component {component!r} is not in the schedule; allowed: {', '.join(data)}")
            return cls.from_mask(data[component], timesteps)
        masks = {k: tuple(int(v) for v in vals) for k, vals in data.items()}
        if len(set(masks.values())) != 1:
            raise ValueError(f"components {', '.join(data)} have different masks; pick one with component=")
        return cls.from_mask(next(iter(masks.values())), timesteps)

    def bind(self, timesteps) -> "Schedule":
        """The same mask attached to a sampler chain (checks the length)."""
        return Schedule.from_mask(self.full, timesteps)

    # ------------------------------------------------------------- exports
    @property
    def mask(self) -> str:
        """``F`` full, ``c`` cached, one character per step."""
        return "".join("F" if f else "c" for f in self.full)

    def to_cache_dit(self) -> str:
        """cache-dit ``steps_computation_mask`` as a string (``list(map(int, s))`` for its list form)."""
        return "".join("1" if f else "0" for f in self.full)

    def to_json(self, components=("model",)) -> str:
        """SmoothCache-style JSON, one identical list per component (1 = compute)."""
        return json.dumps({c: [int(f) for f in self.full] for c in components})

    # -------------------------------------------------------------- counts
    def __len__(self) -> int:
        return len(self.full)

    @property
    def num_full(self) -> int:
        return sum(self.full)

    @property
    def num_cached(self) -> int:
        return len(self.full) - self.num_full

    def __str__(self) -> str:
        return f"{self.mask}  ({self.num_full} full, {self.num_cached} cached of {len(self)})"


# ------------------------------------------------------------------- presets
PRESETS = {
    # name: (k units recomputed on each side, CacheRule without interval)
    "dit-c2i": (4, dict(t_start=1000, t_stop=20, stop_inclusive=True)),
    "latte-c2v": (1, dict(t_start=900, t_stop=50, stop_inclusive=False)),
    "latte-t2v": (1, dict(t_start=700, t_stop=50, stop_inclusive=True)),
    "hunyuan": (1, dict(t_start=700, t_stop=50, stop_inclusive=True)),
}


def parse_t2v(spec: str) -> tuple[int, CacheRule]:
    """The text-to-video spelling ``N{interval}-{start}-{stop}``, e.g. ``N2-700-50``: k = 1, cache
    while stop < t < start, the stop compared with ``<=`` as in ``LatteT2V_skip_cache``."""
    m = re.fullmatch(r"N(\d+)-(\d+)-(\d+)", spec.strip())
    if not m:
        raise ValueError(f"cache spelling {spec!r} is not allowed; use N<interval>-<start>-<stop>, e.g. N2-700-50")
    n, start, stop = (int(g) for g in m.groups())
    return 1, CacheRule(interval=n, t_start=start, t_stop=stop, stop_inclusive=True)


def preset(name: str, interval: int = 2) -> tuple[int, CacheRule]:
    """(k, rule) of a named preset, or of a ``N2-700-50`` spelling (which carries its own interval)."""
    if re.match(r"N\d", name):
        return parse_t2v(name)
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; allowed: {', '.join(PRESETS)} or N<interval>-<start>-<stop>")
    k, kw = PRESETS[name]
    return k, CacheRule(interval=interval, **kw)
