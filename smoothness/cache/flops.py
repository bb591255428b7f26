"""Analytic multiply-accumulate (MAC) counts of a DiT, Latte or text-to-video Latte forward, per
component, and what a cache schedule costs.

Counts are per sample (multiply by the batch, CFG doubles it) and include every matrix product:
patch embedding (a strided conv), the timestep MLP, per block the adaLN modulation, the attention
projections (qkv, out), the two attention matmuls (QK^T and AV) and the MLP, each skip fusion
(Linear 2H -> H; LayerNorm and elementwise ops are not MACs) and the final layer. The label embedding
is a lookup (0 MACs). ``torch.utils.flop_counter.FlopCounterMode`` reports FLOPs = 2 x MACs for the
same products (it may not see CPU scaled-dot-product attention; see tests/test_flops.py). A Latte
video costs F frames of every per-token product; its temporal blocks attend over F frames at each of
the T positions, and each block computes its adaLN once per row it sees (F or T per sample).

Text-to-video Latte (PixArt-style blocks) has no per-block adaLN Linear: ``adaln_single`` projects
the timestep embedding to 6H once per sample and each block adds its ``scale_shift_table``. Its
spatial blocks add cross-attention over the L caption tokens, whose keys and values are projected
for every frame (the caption is repeated per frame, as in diffusers' Latte), and the captions go
through ``caption_projection`` once per sample. L is the caption length the model is called with
(the Latte pipeline pads T5 outputs to 120); the token count is the config's input size.

Families whose table row says ``macs="measured"`` (the diffusers adapters, HunYuan-DiT) are counted
by running each stage once on one zero sample under ``FlopCounterMode`` (every matmul, conv and
attention the class really runs, CPU attention included), per unit and per FORA branch, so a cache
schedule's cost follows from which units a call runs.

For DiT-XL/2 at 256 px this gives 118.6 GMACs for the vanilla forward, the "118.6 Gflops" of the DiT
paper (which counts MACs), and 2 * 256 * 1152^2 = 0.68 GMACs per Skip-DiT fusion.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import xarray as xr
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from .. import hooks
from ..models.protocol import family_of

FREQ_SIZE = 256       # sinusoidal timestep features fed to the timestep MLP (DiT)
CAPTION_TOKENS = 120  # text-to-video caption length L unless told: the Latte pipeline pads T5 outputs to 120
BRANCH_PARTS = ("attn.", "cross.", "mlp")   # the block components FORA reuses


@dataclass(frozen=True)
class Shape:
    """The sizes that decide a DiT or Latte forward's cost."""

    tokens: int          # T = (input_size / patch) ** 2, per frame
    hidden: int          # H
    mlp: int             # inner MLP width
    depth: int           # blocks L
    patch: int           # p
    in_channels: int     # C
    out_channels: int    # C_out (2C with learned sigma)
    fusions: int         # Skip-DiT fusions (units / 2, or 0)
    frames: int = 0      # F for Latte (units are (spatial, temporal) pairs); 0 for DiT (units are blocks)
    caption_tokens: int = 0     # L for text-to-video models; 0: class- or unconditional
    caption_channels: int = 0   # width of the caption embeddings (text-to-video)

    @classmethod
    def of(cls, model_or_config, caption_tokens: int | None = None) -> "Shape":
        """``caption_tokens``: L of the captions a text-to-video model is called with (default 120)."""
        c = getattr(model_or_config, "config", model_or_config)
        if getattr(c, "class_name", "") or family_of(model_or_config).macs == "measured":
            raise ValueError(f"{getattr(c, 'class_name', type(model_or_config).__name__)} has no analytic MAC formula; "
                             "its MACs are counted with flops.measure(model)")
        frames = int(getattr(c, "num_frames", 0) or 0)
        units = c.depth // 2 if frames else c.depth
        text = int(getattr(c, "caption_channels", 0) or 0)
        if caption_tokens is not None and not (text and isinstance(caption_tokens, int) and caption_tokens >= 1):
            raise ValueError(f"caption_tokens={caption_tokens!r} is not allowed; use a positive integer, "
                             "and only for text-to-video models")
        return cls(c.num_tokens, c.hidden_size, int(c.hidden_size * c.mlp_ratio), c.depth, c.patch_size,
                   c.in_channels, c.out_channels, units // 2 if c.skips else 0, frames,
                   (caption_tokens or CAPTION_TOKENS) if text else 0, text)

    @property
    def units(self) -> int:
        return self.depth // 2 if self.frames else self.depth


def _block(rows: int, seqs: int, length: int, H: int, M: int, prefix: str) -> dict[str, int]:
    """One transformer block on ``seqs`` sequences of ``length`` tokens, its adaLN on ``rows`` rows."""
    n = seqs * length
    return {
        f"{prefix}.adaLN": rows * H * 6 * H,                     # Linear(H, 6H) on c, once per row
        f"{prefix}.attn.qkv": n * H * 3 * H,
        f"{prefix}.attn.scores": seqs * length * length * H,     # QK^T over all heads
        f"{prefix}.attn.values": seqs * length * length * H,     # softmax(QK^T) V
        f"{prefix}.attn.proj": n * H * H,
        f"{prefix}.mlp": 2 * n * H * M,                          # fc1 and fc2
    }


def _cross(frames: int, T: int, L: int, H: int) -> dict[str, int]:
    """Cross-attention of a spatial text-to-video block: F frames of T queries over L caption tokens."""
    return {
        "spatial.cross.q": frames * T * H * H,
        "spatial.cross.kv": frames * L * H * 2 * H,                # to_k, to_v on the caption, per frame
        "spatial.cross.scores": frames * T * L * H,
        "spatial.cross.values": frames * T * L * H,
        "spatial.cross.proj": frames * T * H * H,
    }


def components(shape: Shape) -> dict[str, int]:
    """MACs per sample of each component, once. DiT's blocks are ``block.*``; Latte's pairs are a
    ``spatial.*`` block (F frames of T tokens, c repeated per frame) and a ``temporal.*`` block (T
    positions of F frames, c repeated per position)."""
    T, H, M, p = shape.tokens, shape.hidden, shape.mlp, shape.patch
    F, L = shape.frames or 1, shape.caption_tokens
    blocks = (_block(F, F, T, H, M, "spatial") | _block(T, T, F, H, M, "temporal") if shape.frames
              else _block(1, 1, T, H, M, "block"))
    if L:                                                        # text-to-video: adaLN-single, cross-attention
        blocks = {k: v for k, v in blocks.items() if not k.endswith(".adaLN")}
        blocks.update(_cross(F, T, L, H))
        conditioning = {"adaln_single": H * 6 * H,                # Linear(H, 6H), once per sample
                        "caption_projection": L * shape.caption_channels * H + L * H * H}
        final = {}                                                # scale_shift_table + timestep embedding
    else:
        conditioning = {"y_embedder": 0}                          # table lookup
        final = {"final.adaLN": F * H * 2 * H}
    return {
        "x_embedder": F * T * H * shape.in_channels * p * p,    # conv p x p, stride p, per frame
        "t_embedder": FREQ_SIZE * H + H * H,                     # Linear(256, H), Linear(H, H)
        **conditioning,
        **blocks,
        "fusion": F * T * 2 * H * H,                             # Linear(2H, H) on cat[deep, skip]
        **final,
        "final.linear": F * T * H * p * p * shape.out_channels,
    }


def block_macs(shape: Shape, branches: bool = True) -> int:
    """MACs per sample of one unit (a DiT block, or a Latte (spatial, temporal) pair); without
    ``branches`` the attention, cross-attention and MLP outputs are reused (FORA)."""
    out = 0
    for name, macs in components(shape).items():
        kind, _, part = name.partition(".")
        if kind in ("block", "spatial", "temporal") and (branches or not part.startswith(BRANCH_PARTS)):
            out += macs
    return out


def call_macs(shape: Shape, method: str = "none", k: int = 0, full: bool = True) -> int:
    """MACs per sample of one model call under ``method`` (full or cached); ``k`` counts units."""
    c = components(shape)
    always = sum(v for name, v in c.items() if name.partition(".")[0] not in ("block", "spatial", "temporal", "fusion"))
    U, B = shape.units, block_macs(shape)
    fuse = lambda n: n * c["fusion"] if shape.fusions else 0
    if full or method == "none":
        return always + U * B + fuse(shape.fusions)
    if method == "skip-cache":
        return always + 2 * k * B + fuse(k)                      # units 0..k-1 and U-k..U-1
    if method == "deep-reuse":
        return always + k * B + fuse(k)                          # units U-k..U-1 only
    if method == "delta":
        return always + 2 * k * B + fuse(k)
    if method == "fora":
        return always + U * block_macs(shape, branches=False) + fuse(shape.fusions)
    raise ValueError(f"unknown method {method!r}; allowed: skip-cache, deep-reuse, delta, fora, none")


# ------------------------------------------------------------------ measured
def _cpu_sdpa(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)          # FLOPs of QK^T and AV, as torch counts the GPU kernels


def _counter() -> FlopCounterMode:
    """FlopCounterMode that also counts CPU scaled-dot-product attention (torch leaves it out)."""
    return FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa})


@dataclass(frozen=True)
class Measured:
    """MACs per sample of one call's stages: embeddings and head (``always``), each unit, and each
    unit's branch modules (what FORA reuses)."""

    always: int
    units: tuple[int, ...]
    branches: tuple[int, ...]

    def call(self, method: str = "none", k: int = 0, full: bool = True) -> int:
        U, run = len(self.units), lambda us: sum(self.units[u] for u in us)
        if full or method == "none":
            return self.always + run(range(U))
        if method in ("skip-cache", "delta"):
            return self.always + run(list(range(k)) + list(range(U - k, U)))
        if method == "deep-reuse":
            return self.always + run(range(U - k, U))
        if method == "fora":
            return self.always + run(range(U)) - sum(self.branches)
        raise ValueError(f"unknown method {method!r}; allowed: skip-cache, deep-reuse, delta, fora, none")


_MEASURED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # model -> {caption_tokens: Measured}


def measure(model, caption_tokens: int | None = None) -> Measured:
    """Count one call of ``model`` at batch 1 (zeros; captions of ``caption_tokens`` tokens, default
    the model's fixed length or 120) stage by stage. FLOPs / 2 = MACs. Counted once per model."""
    done = _MEASURED.setdefault(model, {})
    if caption_tokens not in done:
        done[caption_tokens] = _measure(model, caption_tokens)
    return done[caption_tokens]


def _measure(model, caption_tokens: int | None) -> Measured:
    c = model.config
    p = next(model.parameters())
    x = torch.zeros(1, *model.sample_shape(), device=p.device, dtype=p.dtype)
    t = torch.full((1,), 500, device=x.device)
    if c.caption_channels:
        y = torch.zeros(1, c.caption_tokens or caption_tokens or CAPTION_TOKENS, c.caption_channels, device=x.device,
                        dtype=p.dtype)
    else:
        y = torch.zeros(1, dtype=torch.long, device=x.device) if c.num_classes else None
    branch_flops = [0] * model.num_units
    unit_of = {i: u for u in range(model.num_units) for i in model.unit_blocks(u)}

    def timed(module, u):
        def forward(*args, **kwargs):
            start = fc.get_total_flops()
            out = type(module).forward(module, *args, **kwargs)
            branch_flops[u] += fc.get_total_flops() - start
            return out
        return forward
    parts = {getattr(model.blocks[i], b): unit_of[i] for i in unit_of for b in model.block_branches(i)}
    units = []
    with torch.no_grad(), _counter() as fc, hooks.override({m: timed(m, u) for m, u in parts.items()}):
        trunk = model.embed(x, t, y)
        for u in range(model.num_units):
            before = fc.get_total_flops()
            model.run_unit(u, trunk)
            units.append((fc.get_total_flops() - before) // 2)
        before = fc.get_total_flops()
        model.head(trunk)
        total = fc.get_total_flops()
    always = (total - sum(units) * 2) // 2
    return Measured(always, tuple(units), tuple(b // 2 for b in branch_flops))


def _per_call(model_or_config, caption_tokens):
    """(method, k, full) -> MACs per sample, analytic or measured by the model's family."""
    if getattr(model_or_config, "family", None) and family_of(model_or_config).macs == "measured":
        m = measure(model_or_config, caption_tokens)
        return m.call
    if not hasattr(model_or_config, "family") and getattr(model_or_config, "class_name", ""):
        raise ValueError(f"MACs of {model_or_config.class_name} are measured on the model; pass the model, "
                         "not its config")
    shape = Shape.of(model_or_config, caption_tokens)
    return lambda method="none", k=0, full=True: call_macs(shape, method, k, full)


def schedule_cost(model_or_config, config, timesteps, batch: int = 1, caption_tokens: int | None = None) -> xr.Dataset:
    """Per-step MACs of ``config`` (a ``CacheConfig``) over a chain, and its theoretical speedup
    against the same model uncached. ``batch`` counts rows per call (CFG doubles it);
    ``caption_tokens`` is L for text-to-video models (default 120)."""
    cost = _per_call(model_or_config, caption_tokens)
    sched = config.schedule(timesteps)
    per_step = [batch * cost(config.method, config.k, f) for f in sched.full]
    base = batch * cost()
    total = sum(per_step)
    ds = xr.Dataset(
        {"macs": ("step", per_step, {"long_name": "multiply-accumulates of the model call", "units": "MAC"}),
         "full": ("step", list(sched.full), {"long_name": "full (True) or cached (False) call"})},
        coords={"step": list(range(1, len(sched) + 1)), "timestep": ("step", list(sched.timesteps))})
    ds.attrs.update(method=config.method, config=config.name, mask=sched.mask, batch=batch,
                    full_steps=sched.num_full, cached_steps=sched.num_cached, total_macs=total,
                    uncached_macs=base * len(sched), theoretical_speedup=base * len(sched) / total)
    return ds


def theoretical_speedup(model_or_config, config, timesteps, caption_tokens: int | None = None) -> float:
    return float(schedule_cost(model_or_config, config, timesteps, caption_tokens=caption_tokens
                               ).attrs["theoretical_speedup"])


def table(model_or_config, caption_tokens: int | None = None) -> xr.DataArray:
    """MACs per sample of each component, labelled; dims ("component",)."""
    comps = components(Shape.of(model_or_config, caption_tokens))
    return xr.DataArray(list(comps.values()), dims=("component",), coords={"component": list(comps)},
                        name="macs", attrs={"long_name": "multiply-accumulates per sample, once", "units": "MAC"})
