"""Latte text-to-video (Latte-0, diffusers ``LatteTransformer3DModel``) and Skip-DiT's LatteT2V-skip.

Follows the PixArt-alpha style Latte T2V of Vchitect/Latte and diffusers, and Skip-DiT's
``text-to-video/models/latte_t2v_skip.py`` (arXiv 2411.17616). Module names and shapes match the
diffusers layout of the ``Latte-0`` transformer and ``Latte-skip.pt`` (paper-spec 1.5), so the
official files load strictly: ``pos_embed.proj``, ``adaln_single``, ``caption_projection``,
``transformer_blocks.{i}`` (spatial, with cross-attention), ``temporal_transformer_blocks.{i}``,
``scale_shift_table``, ``proj_out`` and, with skips, ``skip_norms.{k}`` / ``skip_linears.{k}``.

In the family: a ``Latte`` whose unit u is the pair (``transformer_blocks[u]``,
``temporal_transformer_blocks[u]``), driven by the same ``embed`` / ``run_unit`` / ``head`` API.

* **Blocks** are numbered in execution order: ``blocks.{2u}`` is ``transformer_blocks.{u}``
  (spatial) and ``blocks.{2u+1}`` is ``temporal_transformer_blocks.{u}``, so ``blocks.{i}`` sites,
  ``block_kind(i)`` and ``unit_blocks(u)`` mean what they mean for class-to-video Latte.
  ``config.depth`` counts blocks: Latte-0's ``num_layers=28`` is ``depth=56`` (28 pairs).
* **Skips** (``skips=True``): pairs 0..P/2-1 push; pair i >= P/2 fuses the output of pair P-1-i
  through fusion i-P/2 before its spatial block (14 fusions for the official 28 pairs).
* **Conditioning** ``y`` is caption embeddings (N, L, caption_channels), e.g. T5-XXL outputs
  (4096 wide, 120 tokens in the Latte pipeline), float. No attention mask is applied (as the Latte
  pipeline). ``null_condition(y)`` (the CFG unconditional input) is zeros of y's shape, or the
  negative embedding given to ``set_negative_embeds`` (the T5 embedding of the negative prompt).
* **Positions** are fixed sin-cos tables, not in the state dict (diffusers keeps them as
  non-persistent buffers). The 2-D table is diffusers' ``PatchEmbed`` one (scaled to the
  ``input_size`` grid, so other sizes are served as diffusers does); the temporal table is added
  after the first spatial block when the video has more than one frame. Up to ``num_frames``
  (diffusers' ``video_length``) frames are served; the official code takes exactly that many.
* Blocks use ada_norm_single: shift/scale/gate = ``scale_shift_table`` + the block-shared
  ``adaln_single`` projection of the timestep embedding; the cross-attention sees the
  un-normalized hidden states; the feed-forward is GELU(tanh).

Videos are channels-first, x: (N, C, F, H, W), as ``Latte``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .dit import FP32LayerNorm, HookPoint, PatchEmbed, SkipLinear, TimestepEmbedder, Trunk, _sincos_1d
from .conditions import TextConditioned
from .latte import Latte, LatteConfig


@dataclass(frozen=True)
class LatteT2VConfig(LatteConfig):
    input_size: int = 64        # diffusers sample_size: the latent side the position grid is scaled to (512 px)
    depth: int = 56             # blocks in execution order: 28 (spatial, temporal) pairs = Latte-0's num_layers 28
    caption_channels: int = 4096   # width of the caption embeddings (T5-XXL)
    caption_tokens: int = 120   # rows of caption_projection.y_embedding, the learned null caption (0: none)
    norm_eps: float = 1e-6      # LayerNorm eps of the blocks (Latte-0: 1e-6, no affine)

    def __post_init__(self):
        super().__post_init__()
        if self.num_classes != 0:
            raise ValueError(f"num_classes={self.num_classes} is not allowed for a text-to-video model; use 0 "
                             "(conditioning is caption embeddings)")
        if self.caption_channels < 1 or self.caption_tokens < 0:
            raise ValueError(f"caption_channels={self.caption_channels}, caption_tokens={self.caption_tokens} are not "
                             "allowed; use a positive width and a token count >= 0")

    @property
    def interpolation_scale(self) -> int:
        """diffusers: ``max(sample_size // 64, 1)``; positions are divided by it."""
        return max(self.input_size // 64, 1)


# --------------------------------------------------------------------------- tables
@functools.lru_cache(maxsize=16)
def sincos_grid(dim: int, rows: int, cols: int, base: int, scale: int) -> torch.Tensor:
    """diffusers ``get_2d_sincos_pos_embed``: (rows*cols, dim), row-major tokens; the first half
    encodes the column coordinate, the second the row; coordinates stretched to a ``base`` grid."""
    r = np.arange(rows, dtype=np.float32) / (rows / base) / scale
    c = np.arange(cols, dtype=np.float32) / (cols / base) / scale
    col_grid, row_grid = np.meshgrid(c, r)                               # each (rows, cols)
    table = np.concatenate([_sincos_1d(dim // 2, col_grid.reshape(-1)), _sincos_1d(dim // 2, row_grid.reshape(-1))], 1)
    return torch.from_numpy(table).float()


@functools.lru_cache(maxsize=16)
def sincos_frames(dim: int, frames: int) -> torch.Tensor:
    """The temporal table (frames, dim): 1-D sin-cos of the frame index."""
    return torch.from_numpy(_sincos_1d(dim, np.arange(frames, dtype=np.float64))).float()


# --------------------------------------------------------------------------- modules
class TimestepEmbedding(nn.Module):
    """diffusers ``TimestepEmbedding``: linear_1, SiLU, linear_2 over the 256 sinusoidal channels."""

    def __init__(self, hidden: int, freq_size: int = 256):
        super().__init__()
        self.linear_1 = nn.Linear(freq_size, hidden)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(hidden, hidden)

    def forward(self, freq):
        return self.linear_2(self.act(self.linear_1(freq)))


class _Embeddings(nn.Module):
    """Holds ``timestep_embedder`` under the name diffusers gives it (``adaln_single.emb``)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(hidden)


class AdaLayerNormSingle(nn.Module):
    """PixArt's adaLN-single: one timestep embedding, projected once to 6H for every block."""

    def __init__(self, hidden: int):
        super().__init__()
        self.emb = _Embeddings(hidden)
        self.silu = nn.SiLU()
        self.linear = nn.Linear(hidden, 6 * hidden, bias=True)

    def forward(self, t):
        # diffusers Timesteps(256, flip_sin_to_cos=True, shift 0) is DiT's [cos, sin] table.
        freq = TimestepEmbedder.frequencies(t, 256).to(self.linear.weight.dtype)
        emb = self.emb.timestep_embedder(freq)                           # (N, H)
        return self.linear(self.silu(emb)), emb                          # (N, 6H), (N, H)


class CaptionProjection(nn.Module):
    """diffusers ``CaptionProjection`` (PixArt): Linear, GELU(tanh), Linear, and the buffer
    ``y_embedding`` (tokens, in_features), the learned caption of dropped prompts (not used in forward)."""

    def __init__(self, in_features: int, hidden: int, tokens: int = 0):
        super().__init__()
        if tokens:
            self.register_buffer("y_embedding", torch.empty(tokens, in_features))   # N(0, 1/in) in diffusers
        self.linear_1 = nn.Linear(in_features, hidden, bias=True)
        self.act_1 = nn.GELU(approximate="tanh")
        self.linear_2 = nn.Linear(hidden, hidden, bias=True)

    def forward(self, caption):
        return self.linear_2(self.act_1(self.linear_1(caption)))        # (N, L, H)


class Attention(nn.Module):
    """diffusers ``Attention`` with biased q/k/v (attention_bias) and ``to_out.0``; cross-attention
    when a context is given."""

    def __init__(self, hidden: int, heads: int, context_dim: int | None = None):
        super().__init__()
        self.heads = heads
        kv = context_dim or hidden
        self.to_q = nn.Linear(hidden, hidden, bias=True)
        self.to_k = nn.Linear(kv, hidden, bias=True)
        self.to_v = nn.Linear(kv, hidden, bias=True)
        self.to_out = nn.ModuleList([nn.Linear(hidden, hidden, bias=True), nn.Dropout(0.0)])

    def forward(self, x, context=None):
        context = x if context is None else context
        n, t, d = x.shape
        split = lambda v: v.reshape(n, v.shape[1], self.heads, d // self.heads).transpose(1, 2)
        q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))   # (N, heads, ., d/heads)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, d)
        return self.to_out[1](self.to_out[0](out))                      # (N, T, H)


class GELUProj(nn.Module):
    """diffusers ``GELU`` activation module: a projection then GELU(tanh)."""

    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(hidden, inner, bias=True)

    def forward(self, x):
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.net = nn.ModuleList([GELUProj(hidden, inner), nn.Dropout(0.0), nn.Linear(inner, hidden, bias=True)])

    def forward(self, x):
        for layer in self.net:
            x = layer(x)
        return x


class T2VBlock(nn.Module):
    """diffusers ``BasicTransformerBlock`` with norm_type ada_norm_single. ``hook_attn``,
    ``hook_cross`` and ``hook_mlp`` see the (gated) residual branches."""

    branches = ("attn1", "attn2", "ff")   # reused by FORA; attn2 (cross-attention) is None in temporal blocks

    def __init__(self, hidden: int, heads: int, mlp_ratio: float, eps: float, cross: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=eps)
        self.attn1 = Attention(hidden, heads)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=eps)
        self.attn2 = Attention(hidden, heads, context_dim=hidden) if cross else None
        self.ff = FeedForward(hidden, int(hidden * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.empty(6, hidden))   # N(0, 1/H) in LatteT2V.initialize_weights
        self.hook_attn = HookPoint()
        self.hook_cross = HookPoint() if cross else None
        self.hook_mlp = HookPoint()

    def forward(self, x, mod, context=None, table=None):
        """x (B, T, H); mod (B, 6H) from ``adaln_single``; context (B, L, H) for the spatial blocks;
        table: per-row (B, 6, H) values of ``scale_shift_table`` (default: the parameter)."""
        table = self.scale_shift_table[None] if table is None else table
        mod = table + mod.reshape(mod.shape[0], 6, -1)                   # (B, 6, H)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)   # each (B, 1, H)
        x = x + self.hook_attn(gate_msa * self.attn1(self.norm1(x) * (1 + scale_msa) + shift_msa))
        if self.attn2 is not None:
            x = x + self.hook_cross(self.attn2(x, context))             # PixArt: no norm before cross-attention
        x = x + self.hook_mlp(gate_mlp * self.ff(self.norm2(x) * (1 + scale_mlp) + shift_mlp))
        return x                                                         # (B, T, H)

    def forward_grouped(self, values: dict, groups: int, x, mod, context=None):
        """The perturbation engine's entry: ``values`` holds this block's own perturbed parameters
        (``scale_shift_table`` as (G, 6, H)) for ``groups`` group-major slices of the batch."""
        table = values.get("scale_shift_table")
        if table is not None:
            table = table.to(mod.dtype).repeat_interleave(mod.shape[0] // groups, dim=0)   # (B, 6, H)
        return T2VBlock.forward(self, x, mod, context, table)


@dataclass
class TextTrunk(Trunk):
    """The running state of a text-to-video forward. ``c`` is the adaln_single output (N, 6H)."""

    emb: torch.Tensor | None = None        # (N, H) timestep embedding, modulates the final layer
    context: torch.Tensor | None = None    # (N, L, H) projected caption embeddings
    grid: tuple[int, int] = (0, 0)         # patch rows and columns of a frame

    def repeat(self, groups: int) -> "TextTrunk":
        base = super().repeat(groups)
        rep = lambda v: v.repeat(groups, *([1] * (v.dim() - 1)))
        return TextTrunk(base.h, base.c, base.skips, rep(self.emb), rep(self.context), self.grid)


# --------------------------------------------------------------------------- the model
class LatteT2V(TextConditioned, Latte):
    """Latte-0 text-to-video; LatteT2V-skip's 14 long skips between pairs when ``config.skips``."""

    family = "latte-t2v"
    pad_hint = " (the Latte pipeline pads T5 outputs to 120)"

    def __init__(self, config: LatteT2VConfig):
        nn.Module.__init__(self)            # DiT.__init__ builds DiT-named modules; the layout here is diffusers'
        self.config = cfg = config
        H, pairs = cfg.hidden_size, cfg.depth // 2
        self.pos_embed = PatchEmbed(cfg.patch_size, cfg.in_channels, H)   # diffusers names its patch embedding pos_embed
        block = lambda cross: T2VBlock(H, cfg.num_heads, cfg.mlp_ratio, cfg.norm_eps, cross)
        self.transformer_blocks = nn.ModuleList(block(True) for _ in range(pairs))
        self.temporal_transformer_blocks = nn.ModuleList(block(False) for _ in range(pairs))
        self.norm_out = nn.LayerNorm(H, elementwise_affine=False, eps=1e-6)
        self.scale_shift_table = nn.Parameter(torch.empty(2, H))
        self.proj_out = nn.Linear(H, cfg.patch_size ** 2 * cfg.out_channels, bias=True)
        self.adaln_single = AdaLayerNormSingle(H)
        self.caption_projection = CaptionProjection(cfg.caption_channels, H, cfg.caption_tokens)
        self.hook_input = HookPoint()       # x_t as the model sees it
        self.hook_embed = HookPoint()       # patch tokens + 2-D position table, (N*F, T, H)
        self.hook_output = HookPoint()      # the model output (N, C_out, F, H, W)
        half = pairs // 2
        if cfg.skips:
            self.skip_norms = nn.ModuleList(FP32LayerNorm(2 * H, eps=1e-6) for _ in range(half))
            self.skip_linears = nn.ModuleList(SkipLinear(H) for _ in range(half))
            self.skip_into = {half + k: (half - 1 - k, k) for k in range(half)}   # pair half+k <- pair half-1-k
        else:
            self.skip_into = {}
        self.skip_sources = frozenset(src for src, _ in self.skip_into.values())
        self.negative_embeds: torch.Tensor | str | None = None   # (1, L, caption_channels), "learned"; None: zeros
        self.initialize_weights()

    def initialize_weights(self):
        """PyTorch default init (diffusers); scale-shift tables N(0, 1/H) (diffusers' randn / sqrt(H));
        skip branches zeroed, as ``ResidualLinear.initialize_weights``."""
        if self.proj_out.weight.is_meta:
            return
        for name, p in self.named_parameters():
            if name.endswith("scale_shift_table"):
                nn.init.normal_(p, std=self.config.hidden_size ** -0.5)
        if hasattr(self.caption_projection, "y_embedding"):
            nn.init.normal_(self.caption_projection.y_embedding, std=self.config.caption_channels ** -0.5)
        for lin in getattr(self, "skip_linears", []):
            nn.init.zeros_(lin.linear.weight)
            nn.init.zeros_(lin.linear.bias)

    # ----------------------------------------------------------------- layout
    @property
    def blocks(self) -> list[nn.Module]:
        """All blocks in execution order: spatial 0, temporal 0, spatial 1, ... (not a ModuleList)."""
        return [b for pair in zip(self.transformer_blocks, self.temporal_transformer_blocks) for b in pair]

    def block_path(self, i: int) -> str:
        """Module path of ``blocks.{i}``."""
        stack = "transformer_blocks" if i % 2 == 0 else "temporal_transformer_blocks"
        return f"{stack}.{i // 2}"

    def extra_block_sites(self, i: int, path: str) -> dict[str, str]:
        """Spatial blocks also publish their cross-attention branch, ``blocks.{i}.cross``."""
        return {f"blocks.{i}.cross": f"{path}.hook_cross"} if i % 2 == 0 else {}

    # ----------------------------------------------------------- conditioning
    def check_captions(self, y, batch: int | None = None):
        width = self.config.caption_channels
        if y is None:
            raise ValueError(f"{type(self).__name__} is text-conditioned: pass caption embeddings y of shape "
                             f"(N, L, {width})")
        if not torch.is_tensor(y) or not y.is_floating_point():
            raise ValueError(f"{type(self).__name__} takes caption embeddings (N, L, {width}) as a float tensor, "
                             f"not class labels; got {getattr(y, 'dtype', type(y).__name__)}")
        if y.dim() != 3 or y.shape[-1] != width:
            raise ValueError(f"caption embeddings have shape {tuple(y.shape)} (width {y.shape[-1]}); this model "
                             f"takes (N, L, {width}) (caption_channels={width})")
        if batch is not None and y.shape[0] != batch:
            raise ValueError(f"caption embeddings have {y.shape[0]} rows for a batch of {batch} videos")

    def set_negative_embeds(self, embeds: torch.Tensor | str | None):
        """Use ``embeds`` ((L, C) or (1, L, C)) as the CFG unconditional input; ``"learned"``: the
        checkpoint's ``caption_projection.y_embedding``; None: zeros."""
        if isinstance(embeds, str):
            if embeds != "learned" or not hasattr(self.caption_projection, "y_embedding"):
                raise ValueError(f"negative embeddings {embeds!r} are not allowed; 'learned' needs a checkpoint "
                                 "with caption_projection.y_embedding")
            self.negative_embeds = embeds
            return
        TextConditioned.set_negative_embeds(self, embeds)

    def negative(self) -> torch.Tensor | None:
        neg = self.negative_embeds
        return self.caption_projection.y_embedding[None] if isinstance(neg, str) else neg   # "learned"

    def condition(self, t, y=None):
        """(adaln_single output (N, 6H), timestep embedding (N, H), projected captions (N, L, H))."""
        self.check_captions(y, t.shape[0])
        mod, emb = self.adaln_single(t)
        context = self.caption_projection(y.to(self.caption_projection.linear_1.weight.dtype))
        return mod, emb, context

    # --------------------------------------------------------------- forward
    def check_input(self, x):
        cfg = self.config
        if x.dim() != 5:
            raise ValueError(f"LatteT2V takes videos (N, C, F, H, W); got a tensor of shape {tuple(x.shape)}")
        n, c, f, hh, ww = x.shape
        if not 1 <= f <= cfg.num_frames:
            raise ValueError(f"x has {f} frames; this model's temporal position table serves 1..{cfg.num_frames} "
                             f"frames (num_frames, diffusers' video_length)")
        if c != cfg.in_channels or hh % cfg.patch_size or ww % cfg.patch_size:
            raise ValueError(f"x has shape {tuple(x.shape)}; this model takes (N, {cfg.in_channels}, F, H, W) with "
                             f"H and W divisible by patch_size={cfg.patch_size}")

    def embed(self, x, t, y=None) -> TextTrunk:
        """x: (N, C, F, H, W) x_t; t: (N,) timesteps on the 1000 scale; y: (N, L, caption_channels)."""
        self.check_input(x)
        x = self.hook_input(x)
        n, c, f, hh, ww = x.shape
        cfg = self.config
        grid = (hh // cfg.patch_size, ww // cfg.patch_size)
        frames = x.transpose(1, 2).reshape(n * f, c, hh, ww)             # (N*F, C, H, W)
        table = sincos_grid(cfg.hidden_size, *grid, cfg.input_size // cfg.patch_size, cfg.interpolation_scale)
        h = self.hook_embed(self.pos_embed(frames) + table.to(x.device, x.dtype))   # (N*F, T, H)
        mod, emb, context = self.condition(t, y)
        return TextTrunk(h, mod.to(h.dtype), emb=emb.to(h.dtype), context=context.to(h.dtype), grid=grid)

    def run_blocks(self, u: int, h, trunk: TextTrunk):
        """Spatial block u (with cross-attention) then temporal block u on h (N*F, T, H)."""
        n = trunk.c.shape[0]
        nf, tokens, d = h.shape
        f = nf // n
        h = self.transformer_blocks[u](h, trunk.c.repeat_interleave(f, dim=0),
                                       trunk.context.repeat_interleave(f, dim=0))   # (N*F, T, H)
        h = h.reshape(n, f, tokens, d).transpose(1, 2).reshape(n * tokens, f, d)  # (N*T, F, H)
        if u == 0 and f > 1:
            h = h + sincos_frames(d, f).to(h.device, h.dtype)
        h = self.temporal_transformer_blocks[u](h, trunk.c.repeat_interleave(tokens, dim=0))   # (N*T, F, H)
        return h.reshape(n, tokens, f, d).transpose(1, 2).reshape(nf, tokens, d)   # (N*F, T, H)

    def head(self, trunk: TextTrunk):
        n = trunk.c.shape[0]
        f = trunk.h.shape[0] // n
        emb = trunk.emb.repeat_interleave(f, dim=0)                      # (N*F, H)
        shift, scale = (self.scale_shift_table[None] + emb[:, None]).chunk(2, dim=1)   # each (N*F, 1, H)
        out = self.proj_out(self.norm_out(trunk.h) * (1 + scale) + shift)   # (N*F, T, p*p*C_out)
        (gh, gw), p, c = trunk.grid, self.config.patch_size, self.config.out_channels
        out = out.reshape(n, f, gh, gw, p, p, c)
        video = torch.einsum("nfhwpqc->ncfhpwq", out).reshape(n, c, f, gh * p, gw * p)
        return self.hook_output(video)                                   # (N, C_out, F, H, W)
