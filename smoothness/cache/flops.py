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
attention the class really runs, CPU attention included), per unit and per FORA branch; ``Shape.of``
then gives a ``MeasuredShape`` with the same interface, so every method's own accounting applies.

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
from .base import CacheConfig

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
        """``caption_tokens``: L of the captions a text-to-video model is called with (default 120).
        A model of a measured family gives its ``MeasuredShape``."""
        c = getattr(model_or_config, "config", model_or_config)
        if hasattr(model_or_config, "family") and family_of(model_or_config).macs == "measured":
            return MeasuredShape.of(model_or_config, caption_tokens)
        if getattr(c, "class_name", ""):
            raise ValueError(f"MACs of {c.class_name} are measured on the model; pass the model, not its config")
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

    def full_call(self) -> int:
        """MACs per sample of one uncached call."""
        return always_macs(self) + self.units * block_macs(self) + fusion_macs(self, self.fusions)


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


def always_macs(shape: Shape) -> int:
    """MACs per sample of what every call runs whatever is cached: embeddings, conditioning, final layer."""
    if isinstance(shape, MeasuredShape):
        return shape.measured.always
    return sum(v for name, v in components(shape).items()
               if name.partition(".")[0] not in ("block", "spatial", "temporal", "fusion"))


def fusion_macs(shape: Shape, n: int) -> int:
    """MACs per sample of ``n`` Skip-DiT fusions (0 on a model without skips)."""
    return n * components(shape)["fusion"] if shape.fusions else 0


def units_macs(shape: Shape, units, branches: bool = True) -> int:
    """MACs per sample of running the given units (indices), with the fusions those units make."""
    units = list(units)
    if isinstance(shape, MeasuredShape):
        m = shape.measured
        return sum(m.units[u] - (0 if branches else m.branches[u]) for u in units)
    half = shape.units // 2
    fused = sum(1 for u in units if shape.fusions and u >= half)
    return len(units) * block_macs(shape, branches) + fusion_macs(shape, fused)


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
        """MACs per sample of one call under ``method`` (full or cached), by the method's own accounting."""
        return call_macs(MeasuredShape(self, 0), method, k, full)



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


@dataclass(frozen=True)
class MeasuredShape:
    """A measured model seen through ``Shape``'s interface (units, hidden, frames, full_call), so that
    ``always_macs`` and ``units_macs`` (and every method's accounting) use the counted stages."""

    measured: Measured
    hidden: int
    frames: int = 0

    @classmethod
    def of(cls, model, caption_tokens: int | None = None) -> "MeasuredShape":
        c = model.config
        return cls(measure(model, caption_tokens), int(getattr(c, "hidden_size", 0) or 0),
                   int(getattr(c, "num_frames", 0) or 0))

    @property
    def units(self) -> int:
        return len(self.measured.units)

    def full_call(self) -> int:
        return self.measured.always + sum(self.measured.units)


def call_macs(shape: Shape, method: str = "none", k: int = 0, full: bool = True) -> int:
    """MACs per sample of one model call under ``method`` (full or cached); ``k`` counts units.
    The formulas live with each method (its ``call_macs``); this is the short spelling."""
    config = CacheConfig(method=method, k=max(int(k), 1))
    return config.kind().call_macs(shape, config, "full" if full else "cached")


def schedule_cost(model_or_config, config, timesteps, batch: int = 1, caption_tokens: int | None = None) -> xr.Dataset:
    """Per-step MACs of ``config`` (a static ``CacheConfig``) over a chain, and its theoretical
    speedup against the same model uncached. ``batch`` counts rows per call (CFG doubles it);
    ``caption_tokens`` is L for text-to-video models (default 120)."""
    shape = Shape.of(model_or_config, caption_tokens)
    sched = config.schedule(timesteps)
    method = config.kind()
    kinds = [method.call_kind(config, t, f) for t, f in zip(sched.timesteps, sched.full)]
    return _cost(shape, config, [{kind: batch} for kind in kinds], list(sched.timesteps), sched.mask, batch)


def run_cost(model_or_config, state, caption_tokens: int | None = None) -> xr.Dataset:
    """Per-step MACs of the calls a ``CacheState`` recorded (rows of each kind), for static and
    dynamic methods alike, and the theoretical speedup against the same calls uncached."""
    shape = Shape.of(model_or_config, caption_tokens)
    rows = [dict(c.rows) for c in state.calls]
    batch = sum(rows[0].values()) if rows else 0
    return _cost(shape, state.config, rows, [c.timestep for c in state.calls], state.mask, batch)


def _cost(shape: Shape, config, rows: list[dict], timesteps: list[int], mask: str, batch: int) -> xr.Dataset:
    method = config.kind()
    per_step = [sum(n * method.call_macs(shape, config, kind) for kind, n in r.items()) for r in rows]
    full = [r.get("full", 0) / max(sum(r.values()), 1) for r in rows]
    base = sum(sum(r.values()) for r in rows) * shape.full_call()
    total = sum(per_step)
    ds = xr.Dataset(
        {"macs": ("step", per_step, {"long_name": "multiply-accumulates of the model call", "units": "MAC"}),
         "full": ("step", [f == 1 for f in full], {"long_name": "full (True) or cached (False) call"}),
         "full_fraction": ("step", full, {"long_name": "fraction of the rows computed in full", "units": "1"})},
        coords={"step": list(range(1, len(rows) + 1)), "timestep": ("step", timesteps)})
    ds.attrs.update(method=config.method, config=config.name, mask=mask, batch=batch,
                    full_steps=sum(full), cached_steps=len(full) - sum(full), total_macs=total,
                    uncached_macs=base, theoretical_speedup=base / total)
    return ds


def theoretical_speedup(model_or_config, config, timesteps, caption_tokens: int | None = None) -> float:
    return float(schedule_cost(model_or_config, config, timesteps, caption_tokens=caption_tokens
                               ).attrs["theoretical_speedup"])


def table(model_or_config, caption_tokens: int | None = None) -> xr.DataArray:
    """MACs per sample of each component, labelled; dims ("component",)."""
    comps = components(Shape.of(model_or_config, caption_tokens))
    return xr.DataArray(list(comps.values()), dims=("component",), coords={"component": list(comps)},
                        name="macs", attrs={"long_name": "multiply-accumulates per sample, once", "units": "MAC"})
