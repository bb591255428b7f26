"""diffusers transformers behind the model protocol (``protocol.DiTModel``), without copying them.

An adapter holds an unmodified diffusers model and registers that model's own submodules and
parameters under the same names, so its ``state_dict`` *is* the diffusers one. It runs a forward in
the protocol's stages by calling those submodules in the order the class's own ``forward`` does:

    trunk = adapter.embed(x, t, y)       # the class's embedders (patches, timestep, condition)
    adapter.run_unit(u, trunk)           # its blocks, one unit at a time (skips where it has them)
    out = adapter.head(trunk)            # its output norm, projection and unpatchify

so every tool (hooks, surfaces, caches, analyses) drives it as it drives the native classes. Tests
check that the adapter's forward equals the class's ``forward`` on randomized weights.

Supported: ``DiTTransformer2DModel`` (class-conditional), ``PixArtTransformer2DModel`` (text, one
caption tensor (N, L, caption_channels)), ``LatteTransformer3DModel`` (text-to-video) here, and
``HunyuanDiT2DModel`` in ``hunyuan.py``. Sites: ``blocks.{i}`` (the block module), ``blocks.{i}.attn``
(its self-attention output, before any gate), ``blocks.{i}.cross`` (cross-attention, where the block
has it), ``blocks.{i}.mlp`` (feed-forward output, before any gate), ``input``, ``embed``, ``output``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .conditions import TextConditioned, check_image
from .dit import HookPoint, Trunk

__all__ = ["AdapterConfig", "AdapterTrunk", "DiTAdapter", "DiffusersAdapter", "LatteAdapter", "PixArtAdapter",
           "TextConditioned", "check_image", "import_diffusers"]

EXTRA = "pip install 'dit-smoothness[diffusers]'"


def import_diffusers():
    """The ``diffusers`` module, or one line naming the extra to install."""
    try:
        import diffusers
    except ImportError:
        raise ValueError(f"this model needs the optional 'diffusers' package: {EXTRA}") from None
    return diffusers


@dataclass(frozen=True)
class AdapterConfig:
    """The sizes the tools read from ``model.config``, taken from the diffusers config."""

    class_name: str             # the diffusers class, e.g. "DiTTransformer2DModel"
    input_size: int             # latent side (diffusers sample_size)
    patch_size: int             # p
    in_channels: int            # C
    hidden_size: int            # H = heads * head dim
    depth: int                  # blocks in execution order (Latte: two per pair)
    num_heads: int              # attention heads
    mlp_ratio: float            # feed-forward width / H
    learn_sigma: bool           # output 2C channels (the second C: learned-range variance)
    num_classes: int = 0        # class-conditional models: classes without the null row
    skips: bool = False         # long skip connections (HunYuan-DiT)
    num_frames: int = 0         # video models: frames the temporal table serves; 0 for images
    caption_channels: int = 0   # text models: width of the caption tensor y
    caption_tokens: int = 0     # text models with a fixed caption length (HunYuan: 77 + 256); 0: any

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def num_tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2


@dataclass
class AdapterTrunk(Trunk):
    """A forward's running state: ``h`` (N*, T, H), ``c`` the per-sample conditioning the head uses,
    ``batch`` per-sample tensors the blocks take (tiled by ``repeat``), ``fixed`` shared ones (RoPE)."""

    batch: dict = field(default_factory=dict)     # name -> (N, ...) tensor
    fixed: dict = field(default_factory=dict)     # name -> anything not per sample
    grid: tuple[int, int] = (0, 0)                # patch rows and columns

    def repeat(self, groups: int) -> "AdapterTrunk":
        base = super().repeat(groups)
        rep = lambda v: v.repeat(groups, *([1] * (v.dim() - 1))) if torch.is_tensor(v) else v
        return AdapterTrunk(base.h, base.c, base.skips, {k: rep(v) for k, v in self.batch.items()},
                            dict(self.fixed), self.grid)


class DiffusersAdapter(nn.Module):
    """Base class: registers the wrapped model's modules, parameters and buffers as its own."""

    family = "diffusers"
    block_lists = ("transformer_blocks",)       # the wrapped model's block lists, in execution order

    def __init__(self, inner: nn.Module, config: AdapterConfig):
        super().__init__()
        self.__dict__["inner"] = inner          # not a submodule: its children are registered below
        for name, child in inner.named_children():
            self.add_module(name, child)
        for name, p in inner.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, b in inner.named_buffers(recurse=False):
            self.register_buffer(name, b, persistent=name not in inner._non_persistent_buffers_set)
        self.config = config
        self.hook_input = HookPoint()           # x_t as the model sees it
        self.hook_embed = HookPoint()           # patch tokens (+ position table where the class adds one)
        self.hook_output = HookPoint()          # the model output
        self.skip_into: dict[int, tuple[int, int]] = {}
        self.skip_sources: frozenset[int] = frozenset()

    def _apply(self, fn, *args, **kwargs):
        """``to()`` / ``float()`` also rebind the wrapped model's own parameters (shared objects)."""
        out = super()._apply(fn, *args, **kwargs)
        for name in self.inner._parameters:
            self.inner._parameters[name] = self._parameters[name]
        for name in self.inner._buffers:
            self.inner._buffers[name] = self._buffers[name]
        return out

    # ----------------------------------------------------------------- layout
    # ``blocks`` (every block in execution order): a property of each adapter, or the wrapped
    # model's own ``blocks`` list (HunYuan-DiT).

    @property
    def num_units(self) -> int:
        return self.config.depth

    def unit_blocks(self, u: int) -> list[int]:
        return [u]

    def block_kind(self, i: int) -> str:
        return "block"

    def block_path(self, i: int) -> str:
        return f"{self.block_lists[0]}.{i}"

    def block_branches(self, i: int) -> tuple[str, ...]:
        """Names of block i's branch modules (self-attention, cross-attention, feed-forward) that it has."""
        block = self.blocks[i]
        return tuple(n for n in ("attn1", "attn2", "ff") if getattr(block, n, None) is not None)

    def sample_shape(self) -> tuple[int, ...]:
        c = self.config
        return (c.in_channels, c.input_size, c.input_size)

    def sites(self) -> dict[str, str]:
        """Published hook sites: site name -> module path (see ``smoothness.hooks``)."""
        out = {"input": "hook_input", "embed": "hook_embed"}
        names = {"attn1": "attn", "attn2": "cross", "ff": "mlp"}
        for i in range(len(self.blocks)):
            path = self.block_path(i)
            out[f"blocks.{i}"] = path
            out.update({f"blocks.{i}.{names[b]}": f"{path}.{b}" for b in self.block_branches(i)})
        out.update(self.skip_sites())
        out["output"] = "hook_output"
        return out

    def skip_sites(self) -> dict[str, str]:
        return {}

    # --------------------------------------------------------------- forward
    def run_blocks(self, u: int, h, trunk: AdapterTrunk, skip=None):
        raise NotImplementedError

    def grouped_forward(self, module: nn.Module):
        """For the surface engine: a per-group forward of a diffusers block that adds its own
        ``scale_shift_table`` (adaLN-single, PixArt / Latte). The table only enters as ``table +
        timestep``, so a per-group table is the block's own forward with ``timestep`` shifted by the
        group's table change. None for other modules."""
        if not isinstance(getattr(module, "scale_shift_table", None), nn.Parameter) or module is self:
            return None

        def forward(values: dict, groups: int, *args, **kwargs):
            table = values.get("scale_shift_table")
            if table is not None:
                mod = kwargs["timestep"]                                 # (B, 6H), B = groups x rows
                delta = (table - module.scale_shift_table[None]).reshape(groups, -1).to(mod.dtype)   # (G, 6H)
                kwargs["timestep"] = mod + delta.repeat_interleave(mod.shape[0] // groups, dim=0)
            return type(module).forward(module, *args, **kwargs)
        return forward

    def fuse(self, k: int, deep, skip):
        raise ValueError(f"{self.config.class_name} has no skip fusions")

    def run_unit(self, u: int, trunk: AdapterTrunk, deep=None) -> AdapterTrunk:
        """Run unit u on ``deep`` (default: the running state), fusing its incoming skip; push its output."""
        h = trunk.h if deep is None else deep
        skip = trunk.skips.pop(self.skip_into[u][0]) if u in self.skip_into else None
        h = self.run_blocks(u, h, trunk, skip)
        if u in self.skip_sources:
            trunk.skips[u] = h
        trunk.h = h
        return trunk

    def forward(self, x, t, y=None):
        trunk = self.embed(x, t, y)
        for u in range(self.num_units):
            self.run_unit(u, trunk)
        return self.head(trunk)

    def unpatchify(self, h, grid):
        """(N, T, p*p*C_out) -> (N, C_out, rows*p, cols*p), as the classes' own forwards."""
        (gh, gw), p, c = grid, self.config.patch_size, self.config.out_channels
        h = h.reshape(-1, gh, gw, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", h).reshape(-1, c, gh * p, gw * p)

# ------------------------------------------------------------------ DiT
class DiTAdapter(DiffusersAdapter):
    """``DiTTransformer2DModel``: adaLN-Zero blocks that embed (t, y) themselves, class-conditional."""

    family = "diffusers-dit"

    @property
    def blocks(self) -> list[nn.Module]:
        return list(self.transformer_blocks)

    @classmethod
    def config_of(cls, inner) -> AdapterConfig:
        c = inner.config
        inner_dim = c.num_attention_heads * c.attention_head_dim
        ff = inner.transformer_blocks[0].ff.net[-1].in_features if c.num_layers else 4 * inner_dim
        return AdapterConfig(type(inner).__name__, c.sample_size, c.patch_size, c.in_channels, inner_dim, c.num_layers,
                             c.num_attention_heads, ff / inner_dim, inner.out_channels == 2 * c.in_channels,
                             num_classes=c.num_embeds_ada_norm)

    def null_condition(self, y):
        return torch.full_like(y, self.config.num_classes)

    def embed(self, x, t, y=None) -> AdapterTrunk:
        check_image(x, self.config)
        if y is None:
            raise ValueError(f"{self.config.class_name} is class-conditional: pass labels y "
                             f"(0..{self.config.num_classes - 1}, or {self.config.num_classes} for the null class)")
        x = self.hook_input(x)
        p = self.config.patch_size
        h = self.hook_embed(self.pos_embed(x))                           # (N, T, H), position table added
        c = self.transformer_blocks[0].norm1.emb(t, y, hidden_dtype=h.dtype)   # (N, H), as forward's head
        return AdapterTrunk(h, c, batch={"t": t, "y": y}, grid=(x.shape[-2] // p, x.shape[-1] // p))

    def run_blocks(self, u, h, trunk, skip=None):
        return self.transformer_blocks[u](h, attention_mask=None, encoder_hidden_states=None,
                                          encoder_attention_mask=None, timestep=trunk.batch["t"],
                                          cross_attention_kwargs=None, class_labels=trunk.batch["y"])

    def head(self, trunk):
        shift, scale = self.proj_out_1(F.silu(trunk.c)).chunk(2, dim=1)
        h = self.norm_out(trunk.h) * (1 + scale[:, None]) + shift[:, None]
        return self.hook_output(self.unpatchify(self.proj_out_2(h), trunk.grid))   # (N, C_out, H, W)


# ------------------------------------------------------------------ PixArt
class PixArtAdapter(TextConditioned, DiffusersAdapter):
    """``PixArtTransformer2DModel``: adaLN-single, cross-attention to projected captions."""

    family = "pixart"

    @property
    def blocks(self) -> list[nn.Module]:
        return list(self.transformer_blocks)

    @classmethod
    def config_of(cls, inner) -> AdapterConfig:
        c = inner.config
        inner_dim = c.num_attention_heads * c.attention_head_dim
        ff = inner.transformer_blocks[0].ff.net[-1].in_features
        return AdapterConfig(type(inner).__name__, c.sample_size, c.patch_size, c.in_channels, inner_dim, c.num_layers,
                             c.num_attention_heads, ff / inner_dim, inner.out_channels == 2 * c.in_channels,
                             caption_channels=c.caption_channels)

    def embed(self, x, t, y=None) -> AdapterTrunk:
        check_image(x, self.config)
        self.check_captions(y, x.shape[0])
        x = self.hook_input(x)
        n, p = x.shape[0], self.config.patch_size
        grid = (x.shape[-2] // p, x.shape[-1] // p)
        h = self.hook_embed(self.pos_embed(x))                           # (N, T, H)
        added = {"resolution": None, "aspect_ratio": None}
        if self.inner.use_additional_conditions:                         # as PixArtAlphaPipeline: pixel size, h/w
            px = torch.tensor([[x.shape[-2] * 8.0, x.shape[-1] * 8.0]], device=x.device).repeat(n, 1)
            added = {"resolution": px.to(h.dtype), "aspect_ratio": (px[:, :1] / px[:, 1:]).to(h.dtype)}
        mod, emb = self.adaln_single(t, added, batch_size=n, hidden_dtype=h.dtype)   # (N, 6H), (N, H)
        context = self.caption_projection(y.to(h.dtype)).view(n, -1, h.shape[-1])   # (N, L, H)
        return AdapterTrunk(h, emb, batch={"mod": mod, "context": context}, grid=grid)

    def run_blocks(self, u, h, trunk, skip=None):
        return self.transformer_blocks[u](h, attention_mask=None, encoder_hidden_states=trunk.batch["context"],
                                          encoder_attention_mask=None, timestep=trunk.batch["mod"],
                                          cross_attention_kwargs=None, class_labels=None)

    def head(self, trunk):
        shift, scale = (self.scale_shift_table[None] + trunk.c[:, None]).chunk(2, dim=1)
        h = self.norm_out(trunk.h) * (1 + scale) + shift
        return self.hook_output(self.unpatchify(self.proj_out(h), trunk.grid))


# ------------------------------------------------------------------ Latte
class LatteAdapter(PixArtAdapter):
    """``LatteTransformer3DModel``: unit u is the pair (transformer_blocks[u], temporal_transformer_blocks[u]);
    the state between units is (N*F, T, H); videos are (N, C, F, H, W)."""

    family = "diffusers-latte"
    block_lists = ("transformer_blocks", "temporal_transformer_blocks")

    @classmethod
    def config_of(cls, inner) -> AdapterConfig:
        c = inner.config
        inner_dim = c.num_attention_heads * c.attention_head_dim
        ff = inner.transformer_blocks[0].ff.net[-1].in_features
        return AdapterConfig(type(inner).__name__, c.sample_size, c.patch_size, c.in_channels, inner_dim,
                             2 * c.num_layers, c.num_attention_heads, ff / inner_dim,
                             inner.out_channels == 2 * c.in_channels, num_frames=c.video_length,
                             caption_channels=c.caption_channels)

    @property
    def blocks(self):
        return [b for pair in zip(self.transformer_blocks, self.temporal_transformer_blocks) for b in pair]

    @property
    def num_units(self) -> int:
        return self.config.depth // 2

    def unit_blocks(self, u):
        return [2 * u, 2 * u + 1]

    def block_kind(self, i):
        return "spatial" if i % 2 == 0 else "temporal"

    def block_path(self, i):
        return f"{self.block_lists[i % 2]}.{i // 2}"

    def sample_shape(self):
        c = self.config
        return (c.in_channels, c.num_frames, c.input_size, c.input_size)

    def embed(self, x, t, y=None) -> AdapterTrunk:
        c = self.config
        if x.dim() != 5 or x.shape[1] != c.in_channels or not 1 <= x.shape[2] <= c.num_frames:
            raise ValueError(f"x has shape {tuple(x.shape)}; this model takes videos (N, {c.in_channels}, F, H, W) "
                             f"with 1 <= F <= {c.num_frames}")
        self.check_captions(y, x.shape[0])
        x = self.hook_input(x)
        n, ch, f, hh, ww = x.shape
        frames = x.permute(0, 2, 1, 3, 4).reshape(-1, ch, hh, ww)        # (N*F, C, H, W)
        h = self.hook_embed(self.pos_embed(frames))                      # (N*F, T, H)
        mod, emb = self.adaln_single(t, {"resolution": None, "aspect_ratio": None}, batch_size=n,
                                     hidden_dtype=h.dtype)               # (N, 6H), (N, H)
        context = self.caption_projection(y.to(h.dtype))                 # (N, L, H)
        grid = (hh // c.patch_size, ww // c.patch_size)
        return AdapterTrunk(h, emb, batch={"mod": mod, "context": context}, grid=grid)

    def run_blocks(self, u, h, trunk, skip=None):
        """Spatial block u on (N*F, T, H), then temporal block u on (N*T, F, H), as the class's loop."""
        n = trunk.c.shape[0]
        nf, tokens, d = h.shape
        f = nf // n
        mod, context = trunk.batch["mod"], trunk.batch["context"]
        h = self.transformer_blocks[u](h, attention_mask=None, encoder_hidden_states=context.repeat_interleave(f, dim=0),
                                       encoder_attention_mask=None, timestep=mod.repeat_interleave(f, dim=0),
                                       cross_attention_kwargs=None, class_labels=None)
        h = h.reshape(n, -1, tokens, d).permute(0, 2, 1, 3).reshape(-1, f, d)   # (N*T, F, H)
        if u == 0 and f > 1:
            h = h + self.temp_pos_embed.to(h.dtype)
        h = self.temporal_transformer_blocks[u](h, attention_mask=None, encoder_hidden_states=None,
                                                encoder_attention_mask=None, timestep=mod.repeat_interleave(tokens, dim=0),
                                                cross_attention_kwargs=None, class_labels=None)
        return h.reshape(n, -1, f, d).permute(0, 2, 1, 3).reshape(-1, tokens, d)   # (N*F, T, H)

    def head(self, trunk):
        n = trunk.c.shape[0]
        f = trunk.h.shape[0] // n
        emb = trunk.c.repeat_interleave(f, dim=0)                        # (N*F, H)
        shift, scale = (self.scale_shift_table[None] + emb[:, None]).chunk(2, dim=1)
        h = self.proj_out(self.norm_out(trunk.h) * (1 + scale) + shift)
        frames = self.unpatchify(h, trunk.grid)                          # (N*F, C_out, H, W)
        return self.hook_output(frames.reshape(n, f, *frames.shape[1:]).permute(0, 2, 1, 3, 4))
