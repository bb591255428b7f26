"""Analytic multiply-accumulate (MAC) counts of a DiT forward, per component, and what a cache
schedule costs.

Counts are per sample (multiply by the batch, CFG doubles it) and include every matrix product:
patch embedding (a strided conv), the timestep MLP, per block the adaLN modulation, the attention
projections (qkv, out), the two attention matmuls (QK^T and AV) and the MLP, each skip fusion
(Linear 2H -> H; LayerNorm and elementwise ops are not MACs) and the final layer. The label embedding
is a lookup (0 MACs). ``torch.utils.flop_counter.FlopCounterMode`` reports FLOPs = 2 x MACs for the
same products (it may not see CPU scaled-dot-product attention; see tests/test_flops.py).

For DiT-XL/2 at 256 px this gives 118.6 GMACs for the vanilla forward, the "118.6 Gflops" of the DiT
paper (which counts MACs), and 2 * 256 * 1152^2 = 0.68 GMACs per Skip-DiT fusion.
"""
from __future__ import annotations

from dataclasses import dataclass

import xarray as xr

FREQ_SIZE = 256   # sinusoidal timestep features fed to the timestep MLP (DiT)


@dataclass(frozen=True)
class Shape:
    """The sizes that decide a DiT forward's cost."""

    tokens: int          # T = (input_size / patch) ** 2
    hidden: int          # H
    mlp: int             # inner MLP width
    depth: int           # blocks L
    patch: int           # p
    in_channels: int     # C
    out_channels: int    # C_out (2C with learned sigma)
    fusions: int         # Skip-DiT fusions (depth / 2, or 0)

    @classmethod
    def of(cls, model_or_config) -> "Shape":
        c = getattr(model_or_config, "config", model_or_config)
        return cls(c.num_tokens, c.hidden_size, int(c.hidden_size * c.mlp_ratio), c.depth, c.patch_size,
                   c.in_channels, c.out_channels, c.depth // 2 if c.skips else 0)


def components(shape: Shape) -> dict[str, int]:
    """MACs per sample of each component, once."""
    T, H, M, p = shape.tokens, shape.hidden, shape.mlp, shape.patch
    return {
        "x_embedder": T * H * shape.in_channels * p * p,        # conv p x p, stride p
        "t_embedder": FREQ_SIZE * H + H * H,                     # Linear(256, H), Linear(H, H)
        "y_embedder": 0,                                         # table lookup
        "block.adaLN": H * 6 * H,                                # Linear(H, 6H) on c
        "block.attn.qkv": T * H * 3 * H,
        "block.attn.scores": T * T * H,                          # QK^T over all heads
        "block.attn.values": T * T * H,                          # softmax(QK^T) V
        "block.attn.proj": T * H * H,
        "block.mlp": 2 * T * H * M,                              # fc1 and fc2
        "fusion": T * 2 * H * H,                                 # Linear(2H, H) on cat[deep, skip]
        "final.adaLN": H * 2 * H,
        "final.linear": T * H * p * p * shape.out_channels,
    }


def block_macs(shape: Shape, attn: bool = True, mlp: bool = True) -> int:
    c = components(shape)
    out = c["block.adaLN"]
    if attn:
        out += c["block.attn.qkv"] + c["block.attn.scores"] + c["block.attn.values"] + c["block.attn.proj"]
    if mlp:
        out += c["block.mlp"]
    return out


def call_macs(shape: Shape, method: str = "none", k: int = 0, full: bool = True) -> int:
    """MACs per sample of one model call under ``method`` (full or cached)."""
    c = components(shape)
    always = c["x_embedder"] + c["t_embedder"] + c["final.adaLN"] + c["final.linear"]
    L, B = shape.depth, block_macs(shape)
    fuse = lambda n: n * c["fusion"] if shape.fusions else 0
    if full or method == "none":
        return always + L * B + fuse(shape.fusions)
    if method == "skip-cache":
        return always + 2 * k * B + fuse(k)                      # units 0..k-1 and L-k..L-1
    if method == "deep-reuse":
        return always + k * B + fuse(k)                          # units L-k..L-1 only
    if method == "delta":
        return always + 2 * k * B + fuse(k)
    if method == "fora":
        return always + L * block_macs(shape, attn=False, mlp=False) + fuse(shape.fusions)
    raise ValueError(f"unknown method {method!r}; allowed: skip-cache, deep-reuse, delta, fora, none")


def schedule_cost(model_or_config, config, timesteps, batch: int = 1) -> xr.Dataset:
    """Per-step MACs of ``config`` (a ``CacheConfig``) over a chain, and its theoretical speedup
    against the same model uncached. ``batch`` counts rows per call (CFG doubles it)."""
    shape = Shape.of(model_or_config)
    sched = config.schedule(timesteps)
    per_step = [batch * call_macs(shape, config.method, config.k, f) for f in sched.full]
    base = batch * call_macs(shape)
    total = sum(per_step)
    ds = xr.Dataset(
        {"macs": ("step", per_step, {"long_name": "multiply-accumulates of the model call", "units": "MAC"}),
         "full": ("step", list(sched.full), {"long_name": "full (True) or cached (False) call"})},
        coords={"step": list(range(1, len(sched) + 1)), "timestep": ("step", list(sched.timesteps))})
    ds.attrs.update(method=config.method, config=config.name, mask=sched.mask, batch=batch,
                    full_steps=sched.num_full, cached_steps=sched.num_cached, total_macs=total,
                    uncached_macs=base * len(sched), theoretical_speedup=base * len(sched) / total)
    return ds


def theoretical_speedup(model_or_config, config, timesteps) -> float:
    return float(schedule_cost(model_or_config, config, timesteps).attrs["theoretical_speedup"])


def table(model_or_config) -> xr.DataArray:
    """MACs per sample of each component, labelled; dims ("component",)."""
    comps = components(Shape.of(model_or_config))
    return xr.DataArray(list(comps.values()), dims=("component",), coords={"component": list(comps)},
                        name="macs", attrs={"long_name": "multiply-accumulates per sample, once", "units": "MAC"})
