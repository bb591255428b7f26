"""Pictures of samples: image grids, video frame strips, animated GIFs, and training-loss curves.

Samples are drawn as the chain leaves them (first channel, grey: [-1, 1] pixels or latents), or with
``rgb=True`` as decoded pixels in [0, 1] (``models.Vae.decode``): three channels in colour, one in grey."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

from ..io_utils import atomic_path


def _rgb(image: torch.Tensor) -> np.ndarray:
    """(C, H, W) decoded pixels in [0, 1] -> (H, W, 3) or (H, W) for ``imshow``."""
    image = image.float().clamp(0, 1)
    return image.permute(1, 2, 0).numpy() if image.shape[0] == 3 else image[0].numpy()


def grid_figure(samples: torch.Tensor, classes: list[int], title: str, rgb: bool = False):
    """(rows * cols, C, H, W) class-major samples: one row per class, first channel, [-1, 1] grey;
    ``rgb``: decoded pixels in [0, 1], in colour."""
    rows = len(classes)
    cols = samples.shape[0] // rows
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.6 + 0.8, rows * 0.6 + 0.6), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if rgb:
            ax.imshow(_rgb(samples[i]), cmap="gray", vmin=0, vmax=1)
        else:
            ax.imshow(samples[i, 0].float().clamp(-1, 1).numpy(), cmap="gray", vmin=-1, vmax=1)
        ax.set_xticks([]); ax.set_yticks([])
        if i % cols == 0:
            ax.set_ylabel(str(classes[i // cols]), rotation=0, labelpad=10, va="center")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def strip_figure(videos: torch.Tensor, title: str, pixel_range: bool = True, rgb: bool = False):
    """Frame strips of (N, C, F, H, W) videos: one row per video, one column per frame (first channel).
    ``pixel_range``: grey scale fixed to [-1, 1] (pixel models); else scaled per video (latents).
    ``rgb``: decoded pixels in [0, 1], in colour."""
    n, f = videos.shape[0], videos.shape[2]
    fig, axes = plt.subplots(n, f, figsize=(f * 0.6 + 0.6, n * 0.6 + 0.6), squeeze=False)
    for i in range(n):
        video = videos[i, 0].float()                                     # (F, H, W)
        lo, hi = (-1.0, 1.0) if pixel_range else (video.min().item(), video.max().item())
        for j in range(f):
            ax = axes[i, j]
            if rgb:
                ax.imshow(_rgb(videos[i, :, j]), cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(video[j].clamp(lo, hi).numpy(), cmap="gray", vmin=lo, vmax=hi)
            ax.set_xticks([]); ax.set_yticks([])
            if i == n - 1:
                ax.set_xlabel(f"f{j}", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def write_gif(videos: torch.Tensor, path: Path, columns: int = 5, scale: int = 4, ms_per_frame: int = 200,
              rgb: bool = False):
    """An animated GIF of (N, C, F, H, W) videos tiled ``columns`` wide, each pixel ``scale`` x ``scale``:
    first channel in [-1, 1] grey, or with ``rgb`` decoded (N, 3, F, H, W) pixels in [0, 1] in colour."""
    from PIL import Image
    n, _, f, h, w = videos.shape
    rows = -(-n // columns)
    frames = []
    for j in range(f):
        canvas = np.zeros((rows * (h + 1), columns * (w + 1)) + ((3,) if rgb else ()), dtype=np.uint8)
        for i in range(n):
            r, c = divmod(i, columns)
            if rgb:
                img = (videos[i, :3, j].float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
            else:
                img = ((videos[i, 0, j].float().clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
            canvas[r * (h + 1):r * (h + 1) + h, c * (w + 1):c * (w + 1) + w] = img
        frames.append(Image.fromarray(canvas.repeat(scale, 0).repeat(scale, 1)))
    with atomic_path(path) as tmp:
        frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=ms_per_frame, loop=0)


def loss_figure(curves: dict[str, np.ndarray], window: int = 50):
    """Training-loss curves ({label: per-step losses}), as moving averages over ``window`` steps."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, loss in curves.items():
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        ax.plot(np.arange(window, len(loss) + 1), smooth, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"hybrid loss (mean of {window})")
    ax.set_title("bundled digits models: training loss")
    ax.legend()
    fig.tight_layout()
    return fig
