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
* ``none``: the uncached reference (every call full): the ``Method`` base class in base.py.
"""
from __future__ import annotations

from .base import CacheState, Method


class DeepReuse(Method):
    name = "deep-reuse"

    def forward(self, model, state: CacheState, x, t, y, full):
        L, k = model.num_units, state.config.k
        trunk = model.embed(x, t, y)                             # h (N, T, H), c (N, H)
        if full:
            for u in range(L):
                if u == L - k:
                    # the input of unit L-k and, on a Skip-DiT, the skips it and later units will fuse
                    state.payload = {"h": trunk.h, "skips": {s: v for s, v in trunk.skips.items() if s < k}}
                model.run_unit(u, trunk)
        else:
            trunk.h = state.payload["h"]                         # (N, T, H) from the last full step
            trunk.skips = dict(state.payload["skips"])           # stale skips (Skip-DiT only)
            for u in range(L - k, L):
                model.run_unit(u, trunk)
        return model.head(trunk)


class Delta(Method):
    name = "delta"

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
                model.run_unit(u, trunk)
        else:
            for u in range(k):
                model.run_unit(u, trunk)
            trunk.h = trunk.h + state.payload["delta"]
            for u in range(L - k, L):
                model.run_unit(u, trunk)
        return model.head(trunk)


class Fora(Method):
    name = "fora"

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
                return out
            return state.payload[key]
        return forward

    def forward(self, model, state: CacheState, x, t, y, full):
        if full:
            state.payload = {"computing": True}
        state.payload["computing"] = full
        trunk = model.embed(x, t, y)
        for u in range(model.num_units):
            model.run_unit(u, trunk)
        return model.head(trunk)


BASELINES = {"deep-reuse": DeepReuse, "delta": Delta, "fora": Fora}
