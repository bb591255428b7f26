"""HunYuan-DiT (text-to-image) behind the model protocol, through diffusers' ``HunyuanDiT2DModel``.

Two checkpoint layouts load strictly: the diffusers one directly, and the Tencent one of the official
``hydit`` code (``blocks.{i}.attn1.Wqkv``, ``default_modulation``, ``q_norm``, ``mlp_t5``, ...; a raw
``pytorch_model_ema.pt`` state dict or one under ``ema`` / ``module``), renamed by ``to_diffusers``
(peers.md 9.5; diffusers' ``convert_hunyuandit_to_diffusers.py``): ``Wqkv`` and ``kv_proj`` split in
rows, ``norm2`` and ``norm3`` swapped (official norm3 precedes the cross-attention), the final
layer's (shift, scale) halves swapped into ``norm_out.linear``'s (scale, shift).

**Long skips** (both layouts): with depth D (40 for DiT-g/2), blocks 0..D/2-2 push their outputs
and blocks D/2+1..D-1 pop them LIFO, so block i fuses the output of block D-1-i through its own
``skip_linear(skip_norm(cat[h, skip]))`` (fp32 LayerNorm over 2H); blocks D/2-1 and D/2 neither push
nor pop. ``skip_into[i] = (D-1-i, i-D/2-1)`` says exactly this, and site ``skips.{k}`` is block
D/2+1+k's ``skip_linear``.

**Captions** come as an embedding file with diffusers' pipeline names: ``prompt_embeds`` (77, 1024)
CLIP states, ``prompt_attention_mask`` (77,), ``prompt_embeds_2`` (256, 2048) mT5 states and
``prompt_attention_mask_2`` (256,) (a leading batch dim allowed). The model pools the mT5 states
itself (its ``pooler``), so no pooled vector is read. The tools carry a condition as one tensor, so
``pack_captions`` lays them out as y (N, 77+256, W+1), W = max(1024, 2048): rows 0..76 hold CLIP in
channels 0..1023, rows 77..332 hold mT5 in 0..2047, and the last channel is the attention mask.
The CFG unconditional input (``null_condition``) is the negative prompt's caption file given to
``set_negative_embeds``, else all-masked captions (zeros), which the model replaces by its learned
``text_embedding_padding``; no text encoder is bundled.

Positions are 2-D RoPE computed as ``HunyuanDiTPipeline`` does (base grid 512 px / 8 / patch); models
with ``use_style_cond_and_image_meta_size`` (v1.0-1.1) get style 0 and image meta size
(H*8, W*8, H*8, W*8, 0, 0), as the pipeline's defaults. Timesteps are passed as floats (the
pipeline's ``t_expand``).
"""
from __future__ import annotations

import torch
from torch import nn

from .diffusers_adapter import (AdapterConfig, AdapterTrunk, DiffusersAdapter, TextConditioned, check_image,
                                import_diffusers)

CAPTION_KEYS = ("prompt_embeds", "prompt_attention_mask", "prompt_embeds_2", "prompt_attention_mask_2")


# --------------------------------------------------------------------------- captions
def pack_captions(parts: dict, clip=(77, 1024), t5=(256, 2048)) -> torch.Tensor:
    """The four caption tensors as one (N, L1+L2, max(C1, C2)+1) float tensor (see the module doc)."""
    missing = [k for k in CAPTION_KEYS if k not in parts]
    if missing:
        raise ValueError(f"HunYuan-DiT caption file lacks {', '.join(missing)}; it needs {', '.join(CAPTION_KEYS)}")
    e1, m1, e2, m2 = (torch.as_tensor(parts[k]) for k in CAPTION_KEYS)
    e1, e2 = (e if e.dim() == 3 else e.unsqueeze(0) for e in (e1, e2))
    m1, m2 = (m if m.dim() == 2 else m.unsqueeze(0) for m in (m1, m2))
    for name, e, m in (("prompt_embeds", e1, m1), ("prompt_embeds_2", e2, m2)):
        if e.dim() != 3 or m.shape != e.shape[:2]:
            raise ValueError(f"HunYuan-DiT caption {name} has shape {tuple(e.shape)} with a mask of "
                             f"{tuple(m.shape)}; allowed: (L, C) or (N, L, C) with a mask (L,) or (N, L)")
    if e1.shape[0] != e2.shape[0]:
        raise ValueError(f"prompt_embeds has {e1.shape[0]} captions but prompt_embeds_2 has {e2.shape[0]}")
    n, (l1, c1), (l2, c2) = e1.shape[0], e1.shape[1:], e2.shape[1:]
    width = max(c1, c2)
    y = torch.zeros(n, l1 + l2, width + 1)
    y[:, :l1, :c1], y[:, l1:, :c2] = e1.float(), e2.float()
    y[:, :l1, -1], y[:, l1:, -1] = (m1 != 0).float(), (m2 != 0).float()
    return y


def unpack_captions(y, clip_len: int, clip_dim: int, t5_dim: int):
    """(CLIP (N, L1, C1), its mask (N, L1), mT5 (N, L2, C2), its mask (N, L2)) from a packed y."""
    mask = y[..., -1]
    return y[:, :clip_len, :clip_dim], mask[:, :clip_len], y[:, clip_len:, :t5_dim], mask[:, clip_len:]


# --------------------------------------------------------------------------- layouts
def is_tencent(sd) -> bool:
    return any(k.endswith("attn1.Wqkv.weight") for k in sd) or "mlp_t5.0.weight" in sd


def is_hunyuan(sd) -> bool:
    """Either layout: blocks.{i}.attn1 with a cross-attention attn2 and the text padding table."""
    return "text_embedding_padding" in sd and any(k.startswith("blocks.0.attn1.") for k in sd)


_RENAME = [  # official prefix -> diffusers prefix (applied to the start of each key, first match)
    ("x_embedder.proj.", "pos_embed.proj."), ("t_embedder.mlp.0.", "time_extra_emb.timestep_embedder.linear_1."),
    ("t_embedder.mlp.2.", "time_extra_emb.timestep_embedder.linear_2."), ("pooler.", "time_extra_emb.pooler."),
    ("extra_embedder.0.", "time_extra_emb.extra_embedder.linear_1."),
    ("extra_embedder.2.", "time_extra_emb.extra_embedder.linear_2."),
    ("style_embedder.", "time_extra_emb.style_embedder."), ("mlp_t5.0.", "text_embedder.linear_1."),
    ("mlp_t5.2.", "text_embedder.linear_2."), ("final_layer.linear.", "proj_out."),
]
_BLOCK_RENAME = {  # within blocks.{i}.
    "attn1.q_norm.": "attn1.norm_q.", "attn1.k_norm.": "attn1.norm_k.", "attn1.out_proj.": "attn1.to_out.0.",
    "attn2.q_proj.": "attn2.to_q.", "attn2.q_norm.": "attn2.norm_q.", "attn2.k_norm.": "attn2.norm_k.",
    "attn2.out_proj.": "attn2.to_out.0.", "norm1.": "norm1.norm.", "default_modulation.1.": "norm1.linear.",
    "norm2.": "norm3.", "norm3.": "norm2.", "mlp.fc1.": "ff.net.0.proj.", "mlp.fc2.": "ff.net.2.",
}


def to_diffusers(sd: dict) -> dict:
    """Rename a Tencent-layout state dict to the diffusers layout (tensors are views or cat copies)."""
    out = {}
    for key, v in sd.items():
        if key.startswith("blocks."):
            _, i, rest = key.split(".", 2)
            pre = f"blocks.{i}."
            if rest.startswith("attn1.Wqkv."):
                for name, part in zip(("to_q", "to_k", "to_v"), v.chunk(3, dim=0)):
                    out[pre + f"attn1.{name}." + rest.rsplit(".", 1)[1]] = part
                continue
            if rest.startswith("attn2.kv_proj."):
                for name, part in zip(("to_k", "to_v"), v.chunk(2, dim=0)):
                    out[pre + f"attn2.{name}." + rest.rsplit(".", 1)[1]] = part
                continue
            new = next((n + rest[len(o):] for o, n in _BLOCK_RENAME.items() if rest.startswith(o)), rest)
            out[pre + new] = v
        elif key.startswith("final_layer.adaLN_modulation.1."):
            shift, scale = v.chunk(2, dim=0)                     # official (shift, scale) -> (scale, shift)
            out["norm_out.linear." + key.rsplit(".", 1)[1]] = torch.cat([scale, shift], dim=0)
        else:
            out[next((n + key[len(o):] for o, n in _RENAME if key.startswith(o)), key)] = v
    return out


def _count(sd, prefix: str) -> int:
    idx = {int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix) and k[len(prefix):].split(".")[0].isdigit()}
    return max(idx) + 1 if idx else 0


def infer_kwargs(sd: dict, sample_size: int = 128) -> dict:
    """``HunyuanDiT2DModel`` keyword arguments from a diffusers-layout state dict. The latent size
    is not stored (RoPE needs no table): ``sample_size`` (128 = 1024 px) unless told."""
    need = ["pos_embed.proj.weight", "proj_out.weight", "blocks.0.attn1.norm_q.weight", "blocks.0.ff.net.0.proj.weight",
            "blocks.0.attn2.to_k.weight", "text_embedder.linear_1.weight", "time_extra_emb.pooler.positional_embedding",
            "time_extra_emb.pooler.c_proj.weight", "text_embedding_padding"]
    missing = [k for k in need if k not in sd]
    if missing:
        raise ValueError(f"not a HunYuan-DiT state dict: missing {', '.join(missing)}")
    hidden, in_ch, patch, _ = sd["pos_embed.proj.weight"].shape
    head_dim = sd["blocks.0.attn1.norm_q.weight"].shape[0]
    out = sd["proj_out.weight"].shape[0] // (patch * patch)
    if out not in (in_ch, 2 * in_ch) or hidden % head_dim:
        raise ValueError(f"proj_out gives {out} channels for {in_ch} inputs, or hidden {hidden} is not a multiple of "
                         f"the head size {head_dim}")
    t5_len = sd["time_extra_emb.pooler.positional_embedding"].shape[0] - 1
    inner = sd["blocks.0.ff.net.0.proj.weight"].shape[0]
    return dict(num_attention_heads=hidden // head_dim, attention_head_dim=head_dim, in_channels=in_ch, patch_size=patch,
                sample_size=sample_size, hidden_size=hidden, num_layers=_count(sd, "blocks."),
                mlp_ratio=(inner + 0.5) / hidden,                # int(hidden * ratio) == inner exactly
                learn_sigma=out == 2 * in_ch, cross_attention_dim=sd["blocks.0.attn2.to_k.weight"].shape[1],
                cross_attention_dim_t5=sd["text_embedder.linear_1.weight"].shape[1],
                pooled_projection_dim=sd["time_extra_emb.pooler.c_proj.weight"].shape[0],
                text_len=sd["text_embedding_padding"].shape[0] - t5_len, text_len_t5=t5_len,
                use_style_cond_and_image_meta_size="time_extra_emb.style_embedder.weight" in sd)


def build(kwargs: dict, device="cpu") -> nn.Module:
    """An unmodified ``HunyuanDiT2DModel`` (``device="meta"`` allocates nothing)."""
    diffusers = import_diffusers()
    with torch.device(device):
        return diffusers.HunyuanDiT2DModel(**kwargs)


# --------------------------------------------------------------------------- the adapter
class HunyuanAdapter(TextConditioned, DiffusersAdapter):
    """``HunyuanDiT2DModel``: 1 unit = 1 block; native long skips (see the module doc)."""

    family = "hunyuan-dit"
    block_lists = ("blocks",)

    def __init__(self, inner, config: AdapterConfig):
        super().__init__(inner, config)
        d = config.depth
        self.skip_into = {i: (d - 1 - i, i - d // 2 - 1) for i in range(d // 2 + 1, d)}
        self.skip_sources = frozenset(range(d // 2 - 1))

    @classmethod
    def config_of(cls, inner) -> AdapterConfig:
        c = inner.config
        w = max(c.cross_attention_dim, c.cross_attention_dim_t5) + 1
        return AdapterConfig(type(inner).__name__, c.sample_size, c.patch_size, c.in_channels, inner.inner_dim,
                             c.num_layers, c.num_attention_heads, inner.blocks[0].ff.net[-1].in_features / inner.inner_dim,
                             c.learn_sigma, skips=True, caption_channels=w, caption_tokens=c.text_len + c.text_len_t5)

    def skip_sites(self):
        first = self.config.depth // 2 + 1
        return {f"skips.{i - first}": f"blocks.{i}.skip_linear" for i in range(first, self.config.depth)}

    # ----------------------------------------------------------- conditioning
    def check_captions(self, y, batch: int | None = None):
        c, ic = self.config, self.inner.config
        want = (c.caption_tokens, c.caption_channels)
        if y is None or not torch.is_tensor(y) or not y.is_floating_point() or y.dim() != 3 or tuple(y.shape[1:]) != want:
            got = f"shape {tuple(y.shape)}" if torch.is_tensor(y) else type(y).__name__
            raise ValueError(f"HunYuan-DiT takes a caption file with {', '.join(CAPTION_KEYS)} (CLIP "
                             f"{ic.text_len}x{ic.cross_attention_dim}, mT5 {ic.text_len_t5}x{ic.cross_attention_dim_t5}), "
                             f"packed to (N, {want[0]}, {want[1]}); got {got}")
        if batch is not None and y.shape[0] != batch:
            raise ValueError(f"caption embeddings have {y.shape[0]} rows for a batch of {batch}")

    def _extras(self, x, n: int):
        """RoPE (cos, sin) for the latent grid, and style / image meta size where the model takes them."""
        from diffusers.models.embeddings import get_2d_rotary_pos_embed   # optional dependency
        p = self.config.patch_size
        gh, gw = x.shape[-2] // p, x.shape[-1] // p
        rope = get_2d_rotary_pos_embed(self.config.hidden_size // self.config.num_heads,
                                       crop_region((gh, gw), 512 // 8 // p), (gh, gw), device=x.device, output_type="pt")
        if not self.inner.config.use_style_cond_and_image_meta_size:
            return rope, None, None
        hp, wp = x.shape[-2] * 8, x.shape[-1] * 8
        meta = torch.tensor([[hp, wp, hp, wp, 0, 0]], dtype=x.dtype, device=x.device).repeat(n, 1)
        return rope, meta, torch.zeros(n, dtype=torch.long, device=x.device)

    def embed(self, x, t, y=None) -> AdapterTrunk:
        """x (N, C, H, W) latents; t (N,) timesteps; y (N, 333, 2049) packed captions."""
        check_image(x, self.config)
        self.check_captions(y, x.shape[0])
        x = self.hook_input(x)
        ic, n = self.inner.config, x.shape[0]
        rope, meta, style = self._extras(x, n)
        clip, clip_mask, t5, t5_mask = unpack_captions(y.to(x.dtype), ic.text_len, ic.cross_attention_dim,
                                                       ic.cross_attention_dim_t5)
        t = t.to(x.dtype)                                                # the pipeline's float t_expand
        h = self.hook_embed(self.pos_embed(x))                           # (N, T, H), no position table (RoPE)
        temb = self.time_extra_emb(t, t5, meta, style, hidden_dtype=t.dtype)   # (N, H)
        t5 = self.text_embedder(t5.reshape(-1, t5.shape[-1])).view(n, t5.shape[1], -1)
        context = torch.cat([clip, t5], dim=1)                           # (N, 333, 1024)
        mask = torch.cat([clip_mask, t5_mask], dim=-1).unsqueeze(2).bool()
        context = torch.where(mask, context, self.text_embedding_padding)
        grid = (x.shape[-2] // self.config.patch_size, x.shape[-1] // self.config.patch_size)
        return AdapterTrunk(h, temb, batch={"context": context}, fixed={"rope": rope}, grid=grid)

    # ----------------------------------------------------------------- blocks
    def fuse(self, k: int, deep, skip):
        """Skip fusion k (block D/2+1+k): skip_linear(skip_norm(cat[deep, skip])), deep first."""
        block = self.blocks[self.config.depth // 2 + 1 + k]
        return block.skip_linear(block.skip_norm(torch.cat([deep, skip], dim=-1)))

    def run_blocks(self, u, h, trunk, skip=None):
        block = self.blocks[u]
        kw = dict(encoder_hidden_states=trunk.batch["context"], temb=trunk.c, image_rotary_emb=trunk.fixed["rope"])
        if skip is not None or block.skip_linear is None:
            return block(h, skip=skip, **kw)                             # the block's own forward (fusion inside)
        # h is already fused (spectral analysis): the block's forward after its fusion, same submodules.
        h = h + block.attn1(block.norm1(h, trunk.c), image_rotary_emb=kw["image_rotary_emb"])
        h = h + block.attn2(block.norm2(h), encoder_hidden_states=kw["encoder_hidden_states"],
                            image_rotary_emb=kw["image_rotary_emb"])
        return h + block.ff(block.norm3(h))

    def head(self, trunk):
        h = self.proj_out(self.norm_out(trunk.h, trunk.c.to(torch.float32)))
        return self.hook_output(self.unpatchify(h, trunk.grid))          # (N, C_out, H, W)


def crop_region(grid: tuple[int, int], base: int):
    """``get_resize_crop_region_for_grid`` of the HunYuan-DiT pipeline: the grid fitted into a base
    square, centred ((top, left), (bottom, right))."""
    h, w = grid
    if h / w > 1:
        rh, rw = base, int(round(base / h * w))
    else:
        rw, rh = base, int(round(base / w * h))
    top, left = int(round((base - rh) / 2.0)), int(round((base - rw) / 2.0))
    return (top, left), (top + rh, left + rw)
