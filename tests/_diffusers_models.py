"""Tiny randomized diffusers transformers for the adapter tests (diffusers must be importable)."""
from __future__ import annotations

import torch

HY = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, patch_size=2, sample_size=8, hidden_size=16,
          num_layers=8, mlp_ratio=2.0, cross_attention_dim=12, cross_attention_dim_t5=16, pooled_projection_dim=24,
          text_len=5, text_len_t5=7, use_style_cond_and_image_meta_size=True)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (adaLN-Zero and zero-init skips would otherwise hide mistakes): weights
    N(0, 1/fan_in), vectors N(0, 0.1) (norm scales around 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if p.dim() > 1:
                p.copy_(r / p[0].numel() ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * r)
            else:
                p.copy_(0.1 * r)
    return model.eval()


def hunyuan(seed: int = 0, **overrides):
    import diffusers
    return randomize(diffusers.HunyuanDiT2DModel(**{**HY, **overrides}), seed)


def caption_parts(n: int = 1, seed: int = 1, clip=(5, 12), t5=(7, 16)) -> dict:
    g = torch.Generator().manual_seed(seed)
    m1 = torch.ones(n, clip[0], dtype=torch.long)
    m1[:, -2:] = 0                                       # padded CLIP tokens
    m2 = torch.ones(n, t5[0], dtype=torch.long)
    m2[:, -3:] = 0
    return dict(prompt_embeds=torch.randn(n, *clip, generator=g), prompt_attention_mask=m1,
                prompt_embeds_2=torch.randn(n, *t5, generator=g), prompt_attention_mask_2=m2)


def dit(seed: int = 0, **overrides):
    import diffusers
    kw = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=3,
              sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    return randomize(diffusers.DiTTransformer2DModel(**{**kw, **overrides}), seed)


def pixart(seed: int = 0, **overrides):
    import diffusers
    kw = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=3,
              sample_size=8, patch_size=2, caption_channels=12, cross_attention_dim=16)
    return randomize(diffusers.PixArtTransformer2DModel(**{**kw, **overrides}), seed)


def latte(seed: int = 0, **overrides):
    import diffusers
    kw = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
              sample_size=8, patch_size=2, caption_channels=12, cross_attention_dim=16, video_length=3,
              norm_elementwise_affine=False, norm_eps=1e-6, attention_bias=True, activation_fn="gelu-approximate",
              norm_type="ada_norm_single")                      # Latte-0's block settings
    return randomize(diffusers.LatteTransformer3DModel(**{**kw, **overrides}), seed)
