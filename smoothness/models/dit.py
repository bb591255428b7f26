"""DiT and Skip-DiT in one class.

Follows facebookresearch/DiT ``models.py`` (adaLN-Zero blocks, sin-cos position embedding, learned
sigma) and Skip-DiT's long skip branches (arXiv 2411.17616): with ``skips=True`` block i's output is
fused into block L-1-i's input by an fp32 LayerNorm(2H) and a Linear(2H -> H) over cat[deep, skip].
Module names and shapes match the official ``DiT-XL-2-256x256.pt`` and ``DiT-XL-2-skip.pt`` files.

The forward pass is written as three public stages so that caching and perturbation engines drive
the unmodified blocks instead of copying the model:

    trunk = model.embed(x, t, y)            # tokens and conditioning
    for u in range(model.num_units):
        model.run_unit(u, trunk)            # fuse the incoming skip (if any), run, push (if any)
    out = model.head(trunk)                 # final layer + unpatchify

A "unit" is what Skip-Cache recomputes or skips as a whole: one block for DiT, a (spatial, temporal)
pair for Latte. ``skip_into[u] = (source unit, fusion index)`` publishes the skip pairing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class DiTConfig:
    input_size: int = 32        # latent (or pixel) side length
    patch_size: int = 2         # side of a square patch; tokens = (input_size / patch_size) ** 2
    in_channels: int = 4        # 4 for SD-VAE latents, 1 for the bundled grey digits
    hidden_size: int = 1152     # H
    depth: int = 28             # number of transformer blocks L
    num_heads: int = 16         # not visible in a state dict; taken from the size registry
    mlp_ratio: float = 4.0      # MLP hidden width / H
    num_classes: int = 1000     # class-conditional; the table has one extra row, the CFG null class
    class_dropout_prob: float = 0.1  # label dropout used in training (and the reason for the null row)
    learn_sigma: bool = True    # output 2C channels: [eps, v] for the learned-range variance
    skips: bool = False         # Skip-DiT long skip branches

    def __post_init__(self):
        for name in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"{name}={getattr(self, name)!r} is not allowed; use a positive integer")
        if self.input_size % self.patch_size:
            raise ValueError(f"input_size={self.input_size} is not divisible by patch_size={self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.skips and self.depth % 2:
            raise ValueError(f"Skip-DiT needs an even depth, got depth={self.depth}")

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def num_tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2


# --------------------------------------------------------------------------- building blocks

def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)          # (N, T, H)


class HookPoint(nn.Identity):
    """A parameter-free identity placed where a named site has no module of its own."""


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, in_channels: int, hidden: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden, kernel_size=patch, stride=patch, bias=True)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)                   # (N, C, H, W) -> (N, T, D)


class TimestepEmbedder(nn.Module):
    """Sinusoidal frequencies (cos first, as in GLIDE/DiT) followed by a 2-layer MLP."""

    def __init__(self, hidden: int, freq_size: int = 256):
        super().__init__()
        self.freq_size = freq_size
        self.mlp = nn.Sequential(nn.Linear(freq_size, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    @staticmethod
    def frequencies(t, dim: int, max_period: float = 10000.0):
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]                          # (N, half)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb                                                       # (N, dim)

    def forward(self, t):
        freq = self.frequencies(t, self.freq_size).to(self.mlp[0].weight.dtype)
        return self.mlp(freq)                                            # (N, H)


class LabelEmbedder(nn.Module):
    """Class embedding with one extra row (index num_classes) for the unconditional CFG branch."""

    def __init__(self, num_classes: int, hidden: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden)

    def forward(self, y, generator: torch.Generator | None = None):
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(y.shape[0], device=y.device, generator=generator) < self.dropout_prob
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return self.embedding_table(y)                                   # (N, H)


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, hidden * 3, bias=True)
        self.proj = nn.Linear(hidden, hidden, bias=True)

    def forward(self, x):
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                          # each (N, heads, T, D/heads)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(n, t, d))            # (N, T, D)


class Mlp(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden, inner)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(inner, hidden)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """adaLN-Zero block. ``hook_attn`` / ``hook_mlp`` see the gated residual branches."""

    branches = ("attn", "mlp")      # the sub-modules whose outputs FORA reuses (before the gates)

    def __init__(self, hidden: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, heads)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden, bias=True))
        self.hook_attn = HookPoint()
        self.hook_mlp = HookPoint()

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + self.hook_attn(gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa)))
        x = x + self.hook_mlp(gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))
        return x                                                         # (N, T, H)


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input dtype (as Skip-DiT's ``FP32_Layernorm``)."""

    def forward(self, x):
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class SkipLinear(nn.Module):
    """Skip-DiT's ``ResidualLinear``: a Linear(2H -> H) with no residual add, despite the name."""

    def __init__(self, hidden: int):
        super().__init__()
        self.linear = nn.Linear(2 * hidden, hidden, bias=True)

    def forward(self, x):
        return self.linear(x)


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, patch: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch * patch * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))   # (N, T, p*p*C_out)


@dataclass
class Trunk:
    """The running state of one forward: hidden tokens, conditioning and pushed skip features."""

    h: torch.Tensor                                  # (N, T, H)
    c: torch.Tensor                                  # (N, H)
    skips: dict[int, torch.Tensor] = field(default_factory=dict)   # source unit -> its output

    def repeat(self, groups: int) -> "Trunk":
        """Tile the batch ``groups`` times (group-major), e.g. to evaluate many perturbations at once."""
        rep = lambda v: v.repeat(groups, *([1] * (v.dim() - 1)))
        return Trunk(rep(self.h), rep(self.c), {k: rep(v) for k, v in self.skips.items()})


# --------------------------------------------------------------------------- the model

class DiT(nn.Module):
    """Diffusion Transformer; long skip branches when ``config.skips`` (Skip-DiT)."""

    family = "dit"

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = cfg = config
        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, cfg.hidden_size)
        self.t_embedder = TimestepEmbedder(cfg.hidden_size)
        if cfg.num_classes > 0:   # unconditional models (Latte on Taichi, Sky, FFS) have no label table
            self.y_embedder = LabelEmbedder(cfg.num_classes, cfg.hidden_size, cfg.class_dropout_prob)
        # Fixed sin-cos table, stored in the state dict as in the official checkpoints.
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, cfg.hidden_size), requires_grad=False)
        self._extra_parameters()
        self.blocks = nn.ModuleList(DiTBlock(cfg.hidden_size, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(cfg.hidden_size, cfg.patch_size, cfg.out_channels)
        self.hook_input = HookPoint()     # x_t as the model sees it
        self.hook_embed = HookPoint()     # patch tokens + position embedding
        self.hook_output = HookPoint()    # the model output (N, C_out, H, W)
        self.initialize_weights()
        half = self.num_units // 2
        if cfg.skips:
            # Created after initialize_weights(), so PyTorch default init, as in DiT_skip.
            self.skip_norms = nn.ModuleList(FP32LayerNorm(2 * cfg.hidden_size, eps=1e-6) for _ in range(half))
            self.skip_linears = nn.ModuleList(SkipLinear(cfg.hidden_size) for _ in range(half))
            # Decoder unit half+k receives unit half-1-k through fusion k.
            self.skip_into = {half + k: (half - 1 - k, k) for k in range(half)}
        else:
            self.skip_into = {}
        self.skip_sources = frozenset(src for src, _ in self.skip_into.values())

    def _extra_parameters(self):
        """Parameters a subclass adds before initialisation (Latte's ``temp_embed``)."""

    # ----------------------------------------------------------------- layout
    @property
    def num_units(self) -> int:
        return self.config.depth

    def unit_blocks(self, u: int) -> list[int]:
        """Indices into ``self.blocks`` that make up unit ``u`` (one block for DiT)."""
        return [u]

    def block_kind(self, i: int) -> str:
        return "block"

    def sample_shape(self) -> tuple[int, ...]:
        """One sample without the batch dim: (C, H, W)."""
        c = self.config
        return (c.in_channels, c.input_size, c.input_size)

    # ------------------------------------------------------------------ init
    def initialize_weights(self):
        if self.pos_embed.is_meta:
            return

        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.apply(_basic_init)
        grid = int(self.config.num_tokens ** 0.5)
        self.pos_embed.data.copy_(torch.from_numpy(sincos_2d(self.config.hidden_size, grid)).float().unsqueeze(0))
        self._init_extra()
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if hasattr(self, "y_embedder"):
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:                                         # adaLN-Zero
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def _init_extra(self):
        """Initialise what ``_extra_parameters`` added."""

    # --------------------------------------------------------------- forward
    def embed(self, x, t, y=None) -> Trunk:
        """x: (N, C, H, W) x_t; t: (N,) timesteps on the 1000 scale; y: (N,) class labels."""
        x = self.hook_input(x)
        h = self.hook_embed(self.x_embedder(x) + self.pos_embed.to(x.dtype))   # (N, T, H)
        return Trunk(h, self.condition(t, y).to(h.dtype))

    def null_condition(self, y):
        """The unconditional input for classifier-free guidance: the null class for every row."""
        return torch.full_like(y, self.config.num_classes)

    def condition(self, t, y=None):
        """The adaLN conditioning c (N, H): timestep embedding, plus the class embedding if the model has classes."""
        c = self.t_embedder(t)
        if self.config.num_classes == 0:
            if y is not None:
                raise ValueError(f"{type(self).__name__} is unconditional (no class table): pass y=None, not class labels")
            return c
        if y is None:
            raise ValueError(f"{type(self).__name__} is class-conditional: pass labels y "
                             f"(0..{self.config.num_classes - 1}, or {self.config.num_classes} for the null class)")
        return c + self.y_embedder(y)                                    # (N, H)

    def fuse(self, k: int, deep, skip):
        """Skip fusion k: Linear(LayerNorm(cat[deep, skip])), deep first, no residual."""
        return self.skip_linears[k](self.skip_norms[k](torch.cat([deep, skip], dim=-1)))

    def run_blocks(self, u: int, h, trunk: Trunk):
        """Run the blocks of unit ``u`` on ``h`` (no fusion, no push)."""
        for i in self.unit_blocks(u):
            h = self.blocks[i](h, trunk.c)
        return h

    def run_unit(self, u: int, trunk: Trunk, deep=None) -> Trunk:
        """Fuse unit u's incoming skip into ``deep`` (default: the running state), run it, push it."""
        h = trunk.h if deep is None else deep
        if u in self.skip_into:
            src, k = self.skip_into[u]
            h = self.fuse(k, h, trunk.skips.pop(src))
        h = self.run_blocks(u, h, trunk)
        if u in self.skip_sources:
            trunk.skips[u] = h
        trunk.h = h
        return trunk

    def head(self, trunk: Trunk):
        out = self.final_layer(trunk.h, trunk.c)                         # (N, T, p*p*C_out)
        return self.hook_output(self.unpatchify(out))                    # (N, C_out, H, W)

    def unpatchify(self, x):
        c, p = self.config.out_channels, self.config.patch_size
        g = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, g * p, g * p)

    def forward(self, x, t, y=None):
        trunk = self.embed(x, t, y)
        for u in range(self.num_units):
            self.run_unit(u, trunk)
        return self.head(trunk)

    # ------------------------------------------------------------------ sites
    def block_path(self, i: int) -> str:
        """Module path of the site ``blocks.{i}`` (the i-th block in execution order)."""
        return f"blocks.{i}"

    def extra_block_sites(self, i: int, path: str) -> dict[str, str]:
        """Sites a block has besides its output, attention and MLP branches (none for DiT)."""
        return {}

    def sites(self) -> dict[str, str]:
        """Published hook sites: site name -> module path (see ``smoothness.hooks``)."""
        out = {"input": "hook_input", "embed": "hook_embed"}
        for i in range(len(self.blocks)):
            path = self.block_path(i)
            out[f"blocks.{i}"] = path
            out[f"blocks.{i}.attn"] = f"{path}.hook_attn"
            out.update(self.extra_block_sites(i, path))
            out[f"blocks.{i}.mlp"] = f"{path}.hook_mlp"
        for k in range(len(getattr(self, "skip_linears", []))):
            out[f"skips.{k}"] = f"skip_linears.{k}"
        out["output"] = "hook_output"
        return out


def sincos_2d(dim: int, grid: int) -> np.ndarray:
    """MAE's 2-D sin-cos position table, (grid*grid, dim), float64."""
    gh, gw = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))
    # MAE stacks (w, h) and feeds grid[0] (w varying along columns) to the first half.
    emb_h = _sincos_1d(dim // 2, gh.reshape(-1))
    emb_w = _sincos_1d(dim // 2, gw.reshape(-1))
    return np.concatenate([emb_h, emb_w], axis=1)


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", pos, omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
