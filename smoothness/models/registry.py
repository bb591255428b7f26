"""Named model sizes, as ``DiT_models`` in facebookresearch/DiT, plus small sizes for CPU work.

``build(name)`` makes a randomly initialised model; ``"DiT-XL/2-skip"`` (any size with ``-skip``)
switches on Skip-DiT's long skip branches. The bundled trained models live in ``bundled.py``.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from .dit import DiT, DiTConfig
from .latte import LatteConfig
from .latte_t2v import LatteT2VConfig
from .protocol import make

# name -> (depth, hidden, heads). Official sizes from the DiT paper; the small ones keep 32-wide heads.
_SIZES = {
    "DiT-XL": (28, 1152, 16),
    "DiT-L": (24, 1024, 16),
    "DiT-B": (12, 768, 12),
    "DiT-S": (12, 384, 6),
    "DiT-Ti": (12, 192, 3),     # DeiT-Tiny widths, for quick CPU experiments
    "DiT-D": (12, 96, 3),       # the bundled digits models' size
    "DiT-Mini": (4, 64, 2),     # unit tests
}

SIZES: dict[str, DiTConfig] = {}
for _name, (_depth, _hidden, _heads) in _SIZES.items():
    for _patch in (2, 4, 8):
        SIZES[f"{_name}/{_patch}"] = DiTConfig(depth=_depth, hidden_size=_hidden, num_heads=_heads, patch_size=_patch)

# Latte (class-to-video): the same widths, depth counted in blocks (two per spatial/temporal pair).
# Official: Latte-XL/2, 16 frames of 32x32 SD-VAE latents; dataset variants in LATTE_DATASETS.
_LATTE_SIZES = {
    "Latte-XL": (28, 1152, 16),
    "Latte-L": (24, 1024, 16),
    "Latte-B": (12, 768, 12),
    "Latte-S": (12, 384, 6),
    "Latte-D": (8, 96, 3),      # the bundled moving-digits video models' size (4 pairs)
    "Latte-Mini": (4, 64, 2),   # unit tests (2 pairs)
}
for _name, (_depth, _hidden, _heads) in _LATTE_SIZES.items():
    for _patch in (1, 2, 4):
        SIZES[f"{_name}/{_patch}"] = LatteConfig(depth=_depth, hidden_size=_hidden, num_heads=_heads,
                                                 patch_size=_patch)
# The official class-to-video checkpoints differ only in conditioning (Latte's ``extras``).
LATTE_DATASETS = {
    "ucf101": dict(num_classes=101),     # extras 2: 101 classes plus the null row, cfg 7
    "taichi": dict(num_classes=0),       # extras 1: unconditional
    "skytimelapse": dict(num_classes=0),
    "ffs": dict(num_classes=0),
}

# Latte text-to-video (diffusers layout): depth counts blocks, two per pair. Latte-0 / Latte-skip T2V is
# LatteT2V-XL/2 (28 pairs, T5-XXL captions 4096 wide, 64x64 latents, 16 frames).
SIZES["LatteT2V-XL/2"] = LatteT2VConfig()
SIZES["LatteT2V-Mini/2"] = LatteT2VConfig(depth=4, hidden_size=64, num_heads=2, caption_channels=32,
                                          caption_tokens=4, input_size=8, num_frames=4)   # unit tests (2 pairs)

# Heads are not visible in a state dict: the official size with the same width decides.
HEADS_BY_WIDTH = {hidden: heads for depth, hidden, heads in _SIZES.values()}


def model_names() -> list[str]:
    """Every name ``build`` accepts, skip variants included."""
    return sorted(SIZES) + sorted(f"{n}-skip" for n in SIZES)


def config_for(name: str, **overrides) -> DiTConfig:
    base, skip = (name[: -len("-skip")], True) if name.endswith("-skip") else (name, False)
    if base not in SIZES:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(model_names())}")
    return replace(SIZES[base], skips=skip, **overrides)


def build(name: str, device: str | torch.device | None = None, **overrides) -> DiT:
    """Build a named size with random weights; ``device="meta"`` allocates nothing."""
    config = config_for(name, **overrides)
    with torch.device(device or "cpu"):
        return make(config)
