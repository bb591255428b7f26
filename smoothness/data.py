"""The bundled data: scikit-learn's 8x8 handwritten digits (shipped inside the wheel, no download),
scaled to [-1, 1] and bilinearly upsampled to 16x16 pixels, one channel."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

SIZE = 16            # pixels per side after upsampling
HELD_OUT = 0.2       # fraction kept out of every training run (classifier and diffusion models)
SPLIT_SEED = 0       # the split is fixed, so "held-out" means the same images everywhere


@dataclass(frozen=True)
class Digits:
    images: torch.Tensor   # (N, 1, 16, 16) float32 in [-1, 1]
    labels: torch.Tensor   # (N,) int64 in 0..9


def upsample(x8: torch.Tensor) -> torch.Tensor:
    """(N, 1, 8, 8) -> (N, 1, 16, 16), bilinear, as the models see digits."""
    return F.interpolate(x8, size=(SIZE, SIZE), mode="bilinear", align_corners=False)


def downsample(x16: torch.Tensor) -> torch.Tensor:
    """(N, 1, 16, 16) -> (N, 1, 8, 8) by 2x2 averaging."""
    return F.avg_pool2d(x16, 2)


@lru_cache(maxsize=None)
def _split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    d = load_digits()
    x = d.images.astype(np.float32) / 8.0 - 1.0                       # 0..16 -> [-1, 1]
    order = np.random.default_rng(SPLIT_SEED).permutation(len(x))
    cut = int(round(len(x) * (1 - HELD_OUT)))
    return x[order[:cut]], d.target[order[:cut]], x[order[cut:]], d.target[order[cut:]]


def load(split: str = "train") -> Digits:
    """``"train"`` (80 %), ``"test"`` (the held-out 20 %) or ``"all"``."""
    xtr, ytr, xte, yte = _split()
    if split == "train":
        x, y = xtr, ytr
    elif split == "test":
        x, y = xte, yte
    elif split == "all":
        x, y = np.concatenate([xtr, xte]), np.concatenate([ytr, yte])
    else:
        raise ValueError(f"unknown split {split!r}; allowed: train, test, all")
    images = upsample(torch.from_numpy(x).unsqueeze(1))
    return Digits(images.clamp(-1, 1), torch.from_numpy(np.asarray(y)).long())
