"""Latte (class-to-video) and Latte-skip, as a DiT whose units are (spatial, temporal) block pairs.

Follows Vchitect/Latte ``models/latte.py`` and Skip-DiT's ``class-to-video/models/latte.py``
(arXiv 2411.17616): ``blocks[2p]`` attends over the tokens of one frame, ``blocks[2p + 1]`` over the
frames of one token position, and ``temp_embed`` is added after the first spatial block. With
``skips=True``, pairs 0..P/2-1 push their output and pair p >= P/2 fuses the output of pair P-1-p
before its spatial block (7 fusions for the official 28 blocks). Keys and shapes match the official
ucf101 (101 classes plus the null row), taichi, skytimelapse and ffs (unconditional) checkpoints.

Videos are channels-first here, x: (N, C, F, H, W), so that the diffusion code splits eps and the
learned variance on dim 1 as for images; the official code takes (N, F, C, H, W) (one permute).
Between units the hidden state is kept in the spatial layout (N*F, T, H), batch-major.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .dit import DiT, DiTConfig, Trunk, _sincos_1d


@dataclass(frozen=True)
class LatteConfig(DiTConfig):
    num_frames: int = 16        # length of temp_embed: the most frames the model can take
    num_classes: int = 0        # 0 = unconditional (taichi, sky, ffs); 101 for ucf101

    def __post_init__(self):
        super().__post_init__()
        if self.depth % 2:
            raise ValueError(f"Latte needs an even depth (spatial, temporal pairs), got depth={self.depth}")
        if self.skips and self.depth % 4:
            raise ValueError(f"Latte-skip pairs the first half of the (spatial, temporal) pairs with the second, "
                             f"so depth must be a multiple of 4, got depth={self.depth}")
        if self.num_frames < 1:
            raise ValueError(f"num_frames={self.num_frames} is not allowed; use a positive integer")


class Latte(DiT):
    """Latte; Latte-skip's long skips between (spatial, temporal) pairs when ``config.skips``."""

    family = "latte"

    def _extra_parameters(self):
        cfg = self.config
        self.temp_embed = nn.Parameter(torch.zeros(1, cfg.num_frames, cfg.hidden_size), requires_grad=False)

    def _init_extra(self):
        cfg = self.config
        table = _sincos_1d(cfg.hidden_size, torch.arange(cfg.num_frames, dtype=torch.float64).numpy())
        self.temp_embed.data.copy_(torch.from_numpy(table).float().unsqueeze(0))   # (1, F, H)

    # ----------------------------------------------------------------- layout
    @property
    def num_units(self) -> int:
        return self.config.depth // 2

    def unit_blocks(self, u: int) -> list[int]:
        return [2 * u, 2 * u + 1]

    def block_kind(self, i: int) -> str:
        """``"spatial"`` (attention within a frame) or ``"temporal"`` (attention across frames)."""
        return "spatial" if i % 2 == 0 else "temporal"

    def sample_shape(self) -> tuple[int, ...]:
        """One video without the batch dim: (C, F, H, W) at the full ``num_frames``."""
        c = self.config
        return (c.in_channels, c.num_frames, c.input_size, c.input_size)

    # --------------------------------------------------------------- forward
    def check_input(self, x):
        if x.dim() != 5:
            raise ValueError(f"Latte takes videos (N, C, F, H, W); got a tensor of shape {tuple(x.shape)}")
        n, c, f, hh, ww = x.shape
        cfg = self.config
        if not 1 <= f <= cfg.num_frames:
            raise ValueError(f"x has {f} frames; this model's temp_embed serves 1..{cfg.num_frames} frames")
        if c != cfg.in_channels or hh != cfg.input_size or ww != cfg.input_size:
            raise ValueError(f"x has shape {tuple(x.shape)}; this model takes (N, {cfg.in_channels}, F, "
                             f"{cfg.input_size}, {cfg.input_size}) with F <= {cfg.num_frames}")

    def embed(self, x, t, y=None) -> Trunk:
        """x: (N, C, F, H, W) x_t; t: (N,); y: (N,) labels for ucf101-style models, else None."""
        self.check_input(x)
        x = self.hook_input(x)
        n, c, f, hh, ww = x.shape
        frames = x.transpose(1, 2).reshape(n * f, c, hh, ww)             # (N*F, C, H, W)
        h = self.hook_embed(self.x_embedder(frames) + self.pos_embed.to(x.dtype))   # (N*F, T, H)
        return Trunk(h, self.condition(t, y).to(h.dtype))                # c: (N, H)

    def run_blocks(self, u: int, h, trunk: Trunk):
        """One (spatial, temporal) pair on the spatial-layout state h (N*F, T, H)."""
        n = trunk.c.shape[0]
        nf, tokens, d = h.shape
        f = nf // n
        spatial, temporal = (self.blocks[i] for i in self.unit_blocks(u))
        h = spatial(h, trunk.c.repeat_interleave(f, dim=0))              # (N*F, T, H)
        h = h.reshape(n, f, tokens, d).transpose(1, 2).reshape(n * tokens, f, d)   # (N*T, F, H)
        if u == 0:
            h = h + self.temp_embed[:, :f].to(h.dtype)
        h = temporal(h, trunk.c.repeat_interleave(tokens, dim=0))       # (N*T, F, H)
        return h.reshape(n, tokens, f, d).transpose(1, 2).reshape(nf, tokens, d)  # (N*F, T, H)

    def head(self, trunk: Trunk):
        n = trunk.c.shape[0]
        f = trunk.h.shape[0] // n
        out = self.final_layer(trunk.h, trunk.c.repeat_interleave(f, dim=0))   # (N*F, T, p*p*C_out)
        frames = self.unpatchify(out)                                    # (N*F, C_out, H, W)
        video = frames.reshape(n, f, *frames.shape[1:]).transpose(1, 2)   # (N, C_out, F, H, W)
        return self.hook_output(video)
