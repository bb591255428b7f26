"""Baseline caches on any DiT, driven by the same ``CacheConfig`` schedule as Skip-Cache.

* ``deep-reuse`` (DeepCache-style, the paper's point of comparison): a full step stores the input of
  unit L-k; a cached step runs only units L-k..L-1 on that stored state. A vanilla DiT has no path for
  fresh shallow features, so only the embeddings (conditioning) and the last k blocks see the new
  step. On a Skip-DiT the last k units fuse with the *stored* skips of the last full step.
* ``delta`` (Delta-DiT style): a full step stores the change the middle units make,
  ``delta = h_in(L-k) - h_out(k-1)``; a cached step runs units 0..k-1 fresh, adds delta, and runs
  units L-k..L-1 (fusing fresh skips on a Skip-DiT).
* ``fora`` (FORA): every block still runs its adaLN modulation, norms and gates, but reuses the
  outputs of its ``branches`` from the last full step (before gating): attention and MLP on DiT and
  Latte, self-attention, cross-attention and feed-forward on text-to-video blocks. ``k`` is not used.
* ``delta-dit`` (Delta-DiT proper, arXiv 2406.01125): stage-adaptive. Before the boundary step b a
  full step stores the deviation of the *rear* m = k units, ``h_out(L-1) - h_in(L-m)``, and a cached
  step runs units 0..L-m-1 fresh and adds it (the outline stage keeps the front fresh); from b on a
  full step stores the deviation of the *front* m units, ``h_out(m-1) - h_in(0)``, and a cached step
  adds it to the embedded tokens and runs units m..L-1 (the detail stage keeps the rear fresh). Full
  steps follow the interval N and window as every static method. b is ``CacheConfig.boundary``, a
  timestep on the 1000 scale (default 500, the middle of any chain): the rear stage is t > b. On a Skip-DiT the skipped front units' skips come from the last full step.
* ``none``: the uncached reference (every call full): the ``Method`` base class in base.py.

``forecast`` (forecast.py) replaces the reused deep input, deviation or branch output by a
TaylorSeer / FoCa forecast from the last full steps.
"""
from __future__ import annotations

from . import flops
from .base import CacheState, Method, register
from .forecast import recall, remember

FIXED = ("interval", "window", "k", "forecast")     # the settings of the k-unit static methods


@register
class DeepReuse(Method):
    name = "deep-reuse"
    disabled = {"interval": 1, "k": 1}
    example = {"interval": 2, "k": 1, "t_stop": -1}
    uses = FIXED

    def forward(self, model, state: CacheState, x, t, y, full):
        L, k = model.num_units, state.config.k
        trunk = model.embed(x, t, y)                             # h (N, T, H), c (N, H)
        if full:
            for u in range(L):
                if u == L - k:
                    # the input of unit L-k and, on a Skip-DiT, the skips it and later units will fuse
                    state.payload = {"h": trunk.h, "skips": {s: v for s, v in trunk.skips.items() if s < k}}
                    remember(state, "h", trunk.h)
                model.run_unit(u, trunk)
        else:
            trunk.h = recall(state, "h", state.payload["h"])     # (N, T, H) from the last full step
            trunk.skips = dict(state.payload["skips"])           # stale skips (Skip-DiT only)
            for u in range(L - k, L):
                model.run_unit(u, trunk)
        return model.head(trunk)

    def call_macs(self, shape, config, kind):
        U = shape.units
        return shape.full_call() if kind == "full" else flops.always_macs(shape) + flops.units_macs(
            shape, range(U - config.k, U))


@register
class Delta(Method):
    """Middle-block deviation (the old ``delta`` baseline, kept under its name; not Delta-DiT: see delta-dit)."""

    name = "delta"
    disabled = {"interval": 1, "k": 1}
    example = {"interval": 2, "k": 1, "t_stop": -1}
    uses = FIXED

    def forward(self, model, state: CacheState, x, t, y, full):
        L, k = model.num_units, state.config.k
        trunk = model.embed(x, t, y)
        if full:
            shallow = None
            for u in range(L):
                if u == k:
                    shallow = trunk.h                            # output of unit k-1 (N, T, H)
                if u == L - k:
                    state.payload = {"delta": trunk.h - shallow}  # what units k..L-k-1 add (N, T, H)
                    remember(state, "delta", state.payload["delta"])
                model.run_unit(u, trunk)
        else:
            for u in range(k):
                model.run_unit(u, trunk)
            trunk.h = trunk.h + recall(state, "delta", state.payload["delta"])
            for u in range(L - k, L):
                model.run_unit(u, trunk)
        return model.head(trunk)

    def call_macs(self, shape, config, kind):
        U, k = shape.units, config.k
        return shape.full_call() if kind == "full" else flops.always_macs(shape) + flops.units_macs(
            shape, list(range(k)) + list(range(U - k, U)))


@register
class Fora(Method):
    name = "fora"
    disabled = {"interval": 1, "k": 1}
    example = {"interval": 2, "k": 1, "t_stop": -1}
    uses = ("interval", "window", "forecast")

    def overrides(self, model, state: CacheState) -> dict:
        swaps = {}
        for i, block in enumerate(model.blocks):
            # DiT: attn, mlp; T2V: attn1, attn2, ff; diffusers adapters name theirs in block_branches(i)
            parts = model.block_branches(i) if hasattr(model, "block_branches") else block.branches
            for part in parts:
                module = getattr(block, part)
                if module is not None:
                    swaps[module] = self._reuse(state, module, (i, part))
        return swaps

    @staticmethod
    def _reuse(state: CacheState, module, key):
        compute = type(module).forward

        def forward(*args, **kwargs):
            if state.payload.get("computing"):
                out = compute(module, *args, **kwargs)           # (N, T, H) before the gate
                state.payload[key] = out
                remember(state, key, out)
                return out
            return recall(state, key, state.payload[key])
        return forward

    def forward(self, model, state: CacheState, x, t, y, full):
        if full:
            state.payload = {"computing": True}
        state.payload["computing"] = full
        trunk = model.embed(x, t, y)
        for u in range(model.num_units):
            model.run_unit(u, trunk)
        return model.head(trunk)

    def call_macs(self, shape, config, kind):
        U = shape.units
        return shape.full_call() if kind == "full" else flops.always_macs(shape) + flops.units_macs(
            shape, range(U), branches=False)


@register
class DeltaDiT(Method):
    name = "delta-dit"
    disabled = {"interval": 1, "k": 1}
    example = {"interval": 2, "k": 1, "t_stop": -1}
    uses = ("interval", "window", "k", "boundary", "forecast")

    defaults = {"boundary": 500}

    @classmethod
    def validate(cls, config):
        if config.boundary is not None and config.boundary > 1000:
            raise ValueError(f"boundary={config.boundary} is not allowed; use a timestep in 0..1000")

    @staticmethod
    def stage(t: int, config) -> str:
        """"rear" while t > b (the early, outline stage), "front" from b down."""
        return "rear" if t > config.get("boundary") else "front"

    def forward(self, model, state: CacheState, x, t, y, full):
        L, m = model.num_units, state.config.k
        trunk = model.embed(x, t, y)
        if full:
            state.payload = {"skips": {}}
            h0 = trunk.h
            for u in range(L):
                if u == m:
                    state.payload["front"] = trunk.h - h0                       # (N, T, H)
                    state.payload["skips"] = {s: v for s, v in trunk.skips.items() if s < m}
                if u == L - m:
                    rear_in = trunk.h
                model.run_unit(u, trunk)
            state.payload["rear"] = trunk.h - rear_in
            for key in ("front", "rear"):
                remember(state, key, state.payload[key])
            return model.head(trunk)
        if self.stage(int(t.reshape(-1)[0]), state.config) == "rear":
            for u in range(L - m):
                model.run_unit(u, trunk)
            trunk.h = trunk.h + recall(state, "rear", state.payload["rear"])
        else:
            trunk.h = trunk.h + recall(state, "front", state.payload["front"])
            trunk.skips = dict(state.payload["skips"])                          # stale front skips (Skip-DiT)
            for u in range(m, L):
                model.run_unit(u, trunk)
        return model.head(trunk)

    def call_kind(self, config, timestep, full):
        return "full" if full else self.stage(timestep, config)

    def call_macs(self, shape, config, kind):
        U, m = shape.units, config.k
        if kind == "full":
            return shape.full_call()
        units = range(U - m) if kind == "rear" else range(m, U)
        return flops.always_macs(shape) + flops.units_macs(shape, units)
