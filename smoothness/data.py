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


#################################################################################
#                   Moving digits: the bundled video data                       #
#################################################################################

FRAMES = 8           # frames per video
DIGIT = 8            # a digit moves at its native 8x8 resolution across the 16x16 canvas
SPEEDS = (-1, 0, 1)  # pixels per frame along each axis; (0, 0) is excluded, every video moves


def _native(split: str) -> torch.Tensor:
    xtr, _, xte, _ = _split()
    x = {"train": xtr, "test": xte, "all": None}.get(split, "bad")
    if isinstance(x, str):
        raise ValueError(f"unknown split {split!r}; allowed: train, test, all")
    if x is None:
        x = np.concatenate([xtr, xte])
    return torch.from_numpy(x)                                        # (N, 8, 8) in [-1, 1]


def random_motion(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Start corners (n, 2) and velocities (n, 2) in pixels per frame, so that an 8x8 digit stays
    on the 16x16 canvas for all ``FRAMES`` frames; no video stands still."""
    travel = FRAMES - 1
    room = SIZE - DIGIT                                                # largest top-left offset, 8
    speeds = torch.tensor(SPEEDS)
    v = speeds[torch.randint(0, len(SPEEDS), (n, 2), generator=generator)]
    still = (v == 0).all(dim=1)
    # A still video gets a random nonzero speed on a random axis.
    axis = torch.randint(0, 2, (n,), generator=generator)
    sign = torch.randint(0, 2, (n,), generator=generator) * 2 - 1
    v[still, axis[still]] = sign[still]
    lo = torch.where(v < 0, travel, 0)                                 # start range keeps the path inside
    hi = torch.where(v > 0, room - travel, room)
    start = lo + (torch.rand(n, 2, generator=generator) * (hi - lo + 1)).long().clamp(max=hi - lo)
    return start, v


def moving_digits(digits8: torch.Tensor, start: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
    """Paste each 8x8 digit (N, 8, 8) at ``start + f * velocity`` on a blank (-1) 16x16 canvas for
    f = 0..FRAMES-1. Returns videos (N, 1, F, 16, 16), channels first."""
    n = digits8.shape[0]
    out = torch.full((n, 1, FRAMES, SIZE, SIZE), -1.0)
    for f in range(FRAMES):
        pos = start + f * velocity                                     # (N, 2) top-left corners
        if (pos < 0).any() or (pos > SIZE - DIGIT).any():
            raise ValueError("a motion leaves the canvas; use random_motion() for valid paths")
        for i in range(n):
            r, c = int(pos[i, 0]), int(pos[i, 1])
            out[i, 0, f, r:r + DIGIT, c:c + DIGIT] = digits8[i]
    return out


def video_batch(n: int, generator: torch.Generator, split: str = "train") -> torch.Tensor:
    """``n`` moving-digit videos (N, 1, 8, 16, 16) drawn from ``generator`` (digit and path)."""
    pool = _native(split)
    idx = torch.randint(0, len(pool), (n,), generator=generator)
    start, velocity = random_motion(n, generator)
    return moving_digits(pool[idx], start, velocity)


def load_videos(n: int = 256, seed: int = 0, split: str = "test") -> torch.Tensor:
    """A fixed evaluation set of moving digits, deterministic from ``seed``."""
    return video_batch(n, torch.Generator().manual_seed(seed), split)
