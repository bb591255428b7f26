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


def _arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Native 8x8 digits (N, 8, 8) in [-1, 1] and their labels (N,) of ``split``."""
    xtr, ytr, xte, yte = _split()
    if split == "train":
        return xtr, ytr
    if split == "test":
        return xte, yte
    if split == "all":
        return np.concatenate([xtr, xte]), np.concatenate([ytr, yte])
    raise ValueError(f"unknown split {split!r}; allowed: train, test, all")


def load(split: str = "train") -> Digits:
    """``"train"`` (80 %), ``"test"`` (the held-out 20 %) or ``"all"``."""
    x, y = _arrays(split)
    images = upsample(torch.from_numpy(x).unsqueeze(1))
    return Digits(images.clamp(-1, 1), torch.from_numpy(np.asarray(y)).long())


#################################################################################
#                   Moving digits: the bundled video data                       #
#################################################################################

FRAMES = 8           # frames per video
DIGIT = 12           # a digit is drawn bilinearly at 12x12 (smooth strokes, as the image pair's 16x16)
SPEEDS = (-1, 0, 1)  # pixels per frame along each axis; (0, 0) is excluded, every video moves
ROOM = SIZE - DIGIT  # largest top-left offset, 4: digits bounce off the canvas edges, as in Moving MNIST


def render(digits8: torch.Tensor) -> torch.Tensor:
    """(N, 8, 8) native digits -> (N, DIGIT, DIGIT) bilinear glyphs in [-1, 1] (blank border stays -1)."""
    x = F.interpolate(digits8.unsqueeze(1), size=(DIGIT, DIGIT), mode="bilinear", align_corners=False)
    return x.squeeze(1).clamp(-1, 1)


def _native(split: str) -> torch.Tensor:
    return torch.from_numpy(_arrays(split)[0])                        # (N, 8, 8) in [-1, 1]


def random_motion(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Start corners (n, 2) in 0..ROOM and velocities (n, 2) in pixels per frame; no video stands still."""
    speeds = torch.tensor(SPEEDS)
    v = speeds[torch.randint(0, len(SPEEDS), (n, 2), generator=generator)]
    still = (v == 0).all(dim=1)
    # A still video gets a random nonzero speed on a random axis.
    axis = torch.randint(0, 2, (n,), generator=generator)
    sign = torch.randint(0, 2, (n,), generator=generator) * 2 - 1
    v[still, axis[still]] = sign[still]
    start = torch.randint(0, ROOM + 1, (n, 2), generator=generator)
    return start, v


def bounce(start: torch.Tensor, velocity: torch.Tensor, room: int = ROOM) -> torch.Tensor:
    """Top-left corners (N, FRAMES, 2) of a path that reflects off the walls at 0 and ``room``:
    the unfolded position ``start + f * velocity`` folded into [0, room] (a triangle wave)."""
    if room < 1:
        raise ValueError(f"room={room} is not allowed; a moving glyph needs at least one pixel of room")
    if (start < 0).any() or (start > room).any():
        raise ValueError(f"start corners must lie in 0..{room}, got {start.tolist()}")
    f = torch.arange(FRAMES).view(1, FRAMES, 1)
    unfolded = (start.unsqueeze(1) + f * velocity.unsqueeze(1)) % (2 * room)   # Python modulo: >= 0
    return torch.where(unfolded > room, 2 * room - unfolded, unfolded)


def moving_digits(glyphs: torch.Tensor, start: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
    """Paste each glyph (N, D, D) at its ``bounce`` path on a blank (-1) 16x16 canvas for
    f = 0..FRAMES-1. Returns videos (N, 1, F, 16, 16), channels first."""
    n, d = glyphs.shape[0], glyphs.shape[-1]
    if d > SIZE - 1:
        raise ValueError(f"glyphs of {d}x{d} pixels cannot move on a {SIZE}x{SIZE} canvas; use <= {SIZE - 1}")
    path = bounce(start, velocity, SIZE - d)                           # (N, F, 2)
    out = torch.full((n, 1, FRAMES, SIZE, SIZE), -1.0)
    for i in range(n):
        for f in range(FRAMES):
            r, c = int(path[i, f, 0]), int(path[i, f, 1])
            out[i, 0, f, r:r + d, c:c + d] = glyphs[i]
    return out


GLYPHS = ("medoids", "all")   # which digits move: each class's medoid (10 glyphs), or every digit of the split


@lru_cache(maxsize=None)
def _medoids(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Per class, the digit of ``split`` nearest (L2) to its class mean: (10, 8, 8) and labels 0..9."""
    x, y = _arrays(split)
    out = []
    for c in range(10):
        xs = x[y == c]
        out.append(xs[((xs - xs.mean(0)) ** 2).sum(axis=(1, 2)).argmin()])
    return np.stack(out), np.arange(10)


def video_batch(n: int, generator: torch.Generator, split: str = "train", with_labels: bool = False,
                glyphs: str = "medoids"):
    """``n`` moving-digit videos (N, 1, 8, 16, 16) drawn from ``generator`` (digit and path), and
    their digits' labels (N,) if ``with_labels``. ``glyphs``: ``"medoids"`` (the bundled video data:
    each video shows one of the ten class medoids of ``split``) or ``"all"`` (any digit of ``split``)."""
    if glyphs not in GLYPHS:
        raise ValueError(f"unknown glyphs {glyphs!r}; allowed: {', '.join(GLYPHS)}")
    pool, labels = (torch.from_numpy(np.asarray(a)) for a in (_medoids if glyphs == "medoids" else _arrays)(split))
    idx = torch.randint(0, len(pool), (n,), generator=generator)
    start, velocity = random_motion(n, generator)
    videos = moving_digits(render(pool[idx]), start, velocity)
    return (videos, labels[idx].long()) if with_labels else videos


def load_videos(n: int = 256, seed: int = 0, split: str = "test", with_labels: bool = False,
                glyphs: str = "all"):
    """A fixed evaluation set of moving digits, deterministic from ``seed`` (and labels, as above).
    By default any held-out digit moves, the harder reference for the classifier scores."""
    return video_batch(n, torch.Generator().manual_seed(seed), split, with_labels, glyphs)
