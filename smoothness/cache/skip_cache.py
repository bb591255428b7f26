"""Skip-Cache (arXiv 2411.17616 section 3.4) on the unmodified model, plus the shared cache driver.

    cfg = CacheConfig(method="skip-cache", interval=3, k=4)          # or CacheConfig.preset("dit-c2i", 3)
    with apply_skip_cache(model, cfg) as state:
        x = diffusion.sample(model, shape, y, sampler_config, seed=0)
    state.summary()          # steps computed and reused, time per call

A full step runs everything and stores the input of unit L-k *before* its fusion. A cached step
runs units 0..k-1 (pushing fresh skips), takes the stored input at unit L-k, fuses it with the fresh
skip of unit k-1, then runs units L-k+1..L-1 with their fresh skips. Embeddings and the final layer
always run. The decision is made once per model call, so the batched CFG forward [cond; uncond]
shares it and the cache holds both halves.

The model class is never copied and nothing is stored on the model: ``model.forward`` is swapped
inside the ``with`` block (``hooks.override``) and all state lives in the ``CacheState`` it yields.
The state resets on entry, on ``reset()``, and whenever a sampler starts a new chain (step 1), so a
model reused for many generations gives exactly what a fresh model gives.
"""
from __future__ import annotations

import contextlib
import time

import torch

from .. import devices, hooks
from . import flops
from .base import CacheConfig, CacheState, Method, method_class, register
from .forecast import recall, remember

__all__ = ["CacheConfig", "CacheState", "Method", "SkipCache", "apply_cache", "apply_skip_cache",
           "get_method", "sample"]


@register
class SkipCache(Method):
    """Skip-Cache: a cached call runs units 0..k-1 and L-k..L-1 and fuses the stored input of unit L-k."""

    name = "skip-cache"
    disabled = {"interval": 1, "k": 1}
    example = {"interval": 2, "k": 1, "t_stop": -1}
    uses = ("interval", "window", "k", "forecast")

    @classmethod
    def check(cls, model, config):
        super().check(model, config)
        if not model.skip_into:
            raise ValueError("Skip-Cache needs a model with skip branches (a Skip-DiT); this model has none. "
                             "Use method='deep-reuse' for the same schedule on a vanilla DiT")

    def forward(self, model, state, x, t, y, full):
        L, k = model.num_units, state.config.k
        trunk = model.embed(x, t, y)                             # h (N, T, H), c (N, H)
        if full:
            for u in range(L):
                if u == L - k:
                    state.payload = {"h": trunk.h}               # input of unit L-k before fusion (N, T, H)
                    remember(state, "h", trunk.h)
                model.run_unit(u, trunk)
        else:
            for u in range(k):                                   # shallow units push fresh skips
                model.run_unit(u, trunk)
            deep = recall(state, "h", state.payload["h"])        # the stored (or forecast) deep input
            model.run_unit(L - k, trunk, deep=deep)              # fused with the fresh skip of unit k-1
            for u in range(L - k + 1, L):
                model.run_unit(u, trunk)
        return model.head(trunk)                                 # (N, C_out, H, W)

    def call_macs(self, shape, config, kind):
        if kind == "full":
            return shape.full_call()
        U, k = shape.units, config.k
        return flops.always_macs(shape) + flops.units_macs(shape, list(range(k)) + list(range(U - k, U)))


def get_method(name: str) -> Method:
    return method_class(name)()


@contextlib.contextmanager
def apply_cache(model, config: CacheConfig):
    """Run ``model`` with ``config``'s cache inside the block; yields the ``CacheState``."""
    if not isinstance(config, CacheConfig):
        raise ValueError(f"config must be a CacheConfig, got {type(config).__name__}")
    config.check(model)
    method = get_method(config.method)
    state = CacheState(config)

    def forward(x, t, y=None):
        t_now = int(t.reshape(-1)[0])
        if t.numel() > 1 and not bool((t == t_now).all()):
            raise ValueError("a cached call needs one timestep for the whole batch; got several")
        start = time.perf_counter()
        full = state.begin(t_now, tuple(x.shape))
        out = method.forward(model, state, x, t, y, full)
        if full and state.payload is not None:
            state.payload["batch"] = tuple(x.shape)
        devices.sync(x.device)                                   # a GPU call's time includes its kernels
        state.end(t_now, full, time.perf_counter() - start, x.shape[0], method.call_kind(config, t_now, full))
        return out

    try:
        with hooks.override({model: forward, **method.overrides(model, state)}):
            yield state
    except BaseException:
        state.reset()                       # an interrupted chain leaves no cached tensors behind
        raise


def apply_skip_cache(model, config: CacheConfig | None = None):
    """Skip-Cache (or any method named in ``config``) as a context manager; yields the state."""
    return apply_cache(model, config or CacheConfig())


def sample(model, diffusion, shape, y, sampler_config, config: CacheConfig, **kw) -> tuple[torch.Tensor, CacheState]:
    """Sample one chain with the cache applied; returns (x_0 (N, C, H, W), state)."""
    with apply_cache(model, config) as state:
        x = diffusion.sample(model, shape, y, sampler_config, **kw)
    return x, state
