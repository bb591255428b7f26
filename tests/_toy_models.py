"""A tiny unconditional "video" model with the unit API, for tests of code that must not assume
images or labels: x is (N, C, F, H, W), ``config.num_classes == 0`` and ``embed`` takes y=None.

Each token is one (frame, pixel) position; a block is h + tanh(W h + c); with ``skips`` the second
half of the blocks fuse the first half's outputs as Skip-DiT does (Linear(LayerNorm(cat[deep, skip]))).
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from smoothness.models.dit import DiT, Trunk


class ToyBlock(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.lin = nn.Linear(hidden, hidden)

    def forward(self, h, c):
        return h + torch.tanh(self.lin(h) + c.unsqueeze(1))             # (N, T, H)


class ToyVideo(nn.Module):
    family = "toy"

    def __init__(self, channels=1, frames=3, size=4, hidden=8, depth=4, skips=True, seed=0):
        super().__init__()
        self.config = SimpleNamespace(in_channels=channels, num_frames=frames, input_size=size, num_classes=0,
                                      learn_sigma=False, depth=depth, skips=skips)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.inp = nn.Linear(channels, hidden)
            self.t_lin = nn.Linear(1, hidden)
            self.blocks = nn.ModuleList(ToyBlock(hidden) for _ in range(depth))
            self.out = nn.Linear(hidden, channels)
            half = depth // 2
            if skips:
                self.skip_norms = nn.ModuleList(nn.LayerNorm(2 * hidden) for _ in range(half))
                self.skip_linears = nn.ModuleList(nn.Linear(2 * hidden, hidden) for _ in range(half))
                self.skip_into = {half + k: (half - 1 - k, k) for k in range(half)}
            else:
                self.skip_into = {}
        self.skip_sources = frozenset(src for src, _ in self.skip_into.values())

    @property
    def num_units(self):
        return len(self.blocks)

    def unit_blocks(self, u):
        return [u]

    def block_kind(self, i):
        return "block"

    def sample_shape(self):
        c = self.config
        return (c.in_channels, c.num_frames, c.input_size, c.input_size)

    def embed(self, x, t, y=None):
        if y is not None:
            raise ValueError("the toy model is unconditional; pass y=None")
        n, c = x.shape[:2]
        tokens = x.reshape(n, c, -1).transpose(1, 2)                     # (N, F*H*W, C)
        return Trunk(self.inp(tokens), self.t_lin(t.to(self.t_lin.weight.dtype)[:, None] / 1000))

    # The unit protocol itself is DiT's: fuse, run the unit's blocks, push.
    fuse, run_blocks, run_unit = DiT.fuse, DiT.run_blocks, DiT.run_unit

    def head(self, trunk):
        n = trunk.h.shape[0]
        c, f, s = self.config.in_channels, self.config.num_frames, self.config.input_size
        return self.out(trunk.h).transpose(1, 2).reshape(n, c, f, s, s)   # (N, C, F, H, W)

    def forward(self, x, t, y=None):
        trunk = self.embed(x, t, y)
        for u in range(self.num_units):
            self.run_unit(u, trunk)
        return self.head(trunk)

    def sites(self):
        return {f"blocks.{i}": f"blocks.{i}" for i in range(len(self.blocks))}
