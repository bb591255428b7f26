"""The models this project trains itself and ships inside the package (no download).

``digits-dit`` and ``digits-skip-dit``: DiT-D/2 (12 blocks, hidden 96, 3 heads, patch 2) on 16x16
one-channel digits, 10 classes, learned sigma; identical training budget, the second with Skip-DiT's
6 long skip branches. ``digits-classifier`` scores their samples.

``moving-digits-latte`` and ``moving-digits-latte-skip``: Latte-D/2 (4 spatial/temporal pairs,
hidden 96, 3 heads, patch 2), unconditional, on 8-frame videos of a digit moving across a 16x16
canvas; the second with Latte-skip's 2 long skips. Same budget for both.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import CheckpointError, load_model
from .dit import DiT
from .registry import model_names

WEIGHTS = Path(__file__).parent / "weights"
BUNDLED = {
    "digits-dit": "digits-dit.pt",
    "digits-skip-dit": "digits-skip-dit.pt",
    "digits-classifier": "digits-classifier.pt",
    "moving-digits-latte": "moving-digits-latte.pt",
    "moving-digits-latte-skip": "moving-digits-latte-skip.pt",
}
DEFAULT_PAIR = ("digits-dit", "digits-skip-dit")
VIDEO_PAIR = ("moving-digits-latte", "moving-digits-latte-skip")
# Sampler settings that suit the pixel-space digits models (see README for their accuracy).
DIGITS_SAMPLER = dict(num_steps=250, cfg_scale=3.0, clip_denoised=True)


def weight_path(name: str) -> Path:
    if name not in BUNDLED:
        raise ValueError(f"unknown bundled model {name!r}; allowed: {', '.join(BUNDLED)}")
    path = WEIGHTS / BUNDLED[name]
    if not path.is_file():
        raise CheckpointError(f"bundled weights {str(path)!r} are missing from this install; "
                              f"retrain with python -m smoothness.train (see README)")
    return path


def diffusion_models() -> list[str]:
    return [n for n in BUNDLED if n != "digits-classifier"]


def load(name_or_path: str, device="cpu", dtype=None, num_heads: int | None = None) -> DiT:
    """A bundled model by name, or any DiT checkpoint by path (configuration inferred)."""
    if not str(name_or_path).strip():
        raise ValueError(f"the model name or checkpoint path is empty; allowed: {', '.join(diffusion_models())} "
                         "or a checkpoint path (.pt, .pth, .safetensors)")
    if name_or_path in diffusion_models():
        return load_model(weight_path(name_or_path), device=device, dtype=dtype)
    if Path(name_or_path).suffix.lower() in (".pt", ".pth", ".bin", ".ckpt", ".safetensors") or Path(name_or_path).exists():
        return load_model(name_or_path, num_heads=num_heads, device=device, dtype=dtype)
    if name_or_path in model_names():
        raise ValueError(f"{name_or_path!r} is a size with random weights, not a trained model; pass its "
                         f"checkpoint with --ckpt, or one of the bundled models: {', '.join(diffusion_models())}")
    raise ValueError(f"unknown model {name_or_path!r}; allowed: {', '.join(diffusion_models())} "
                     "or a checkpoint path (.pt, .pth, .safetensors)")


def label(name_or_path: str) -> str:
    """A short label for plots and dataset coordinates."""
    return name_or_path if name_or_path in BUNDLED else Path(name_or_path).stem


def is_pixel_digits(model: DiT) -> bool:
    """A 16x16 one-channel class-conditional digits model (the classifier can score its samples)."""
    c = model.config
    return is_pixel(model) and c.num_classes == 10 and model.family == "dit"


def is_pixel(model: DiT) -> bool:
    """A model of the bundled pixel data, images or videos in [-1, 1]: sample with x0 clipped."""
    c = model.config
    return c.in_channels == 1 and c.input_size == 16


def parameter_dtype(model: DiT) -> torch.dtype:
    return next(model.parameters()).dtype
