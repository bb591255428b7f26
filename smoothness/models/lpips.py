"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual
Metric"), version 0.1 on the AlexNet trunk, from a local weights file; plain torch, no torchvision.

    lpips = Lpips.load("lpips_alex.pth")
    d = lpips(a, b)                                # (N, 3, H, W) in [0, 1] -> (N,), lower is closer

The file is the full module state dict of the ``lpips`` package's ``LPIPS(net='alex',
version='0.1')``, as ``torch.save(lpips.LPIPS(net='alex').state_dict(), f)`` writes it: the AlexNet
feature layers (``net.slice1.0.*`` ... ``net.slice5.10.*``, torchvision's ``alexnet().features``
indices), the five 1x1 linear heads (``lin0.model.1.weight`` ... after a dropout at index 0) and
the scaling layer's buffers (``scaling_layer.shift`` / ``.scale``; optional here, since the paper fixes
them). The package's own ``weights/v0.1/alex.pth`` holds the heads only and is refused with a line on
how to make the full file. It is read weights-only (``read_state_dict``) and loaded strictly.

The distance, per image: map [0, 1] to [-1, 1]; ``(x - shift) / scale``; the five ReLU outputs of
AlexNet (after conv1 .. conv5); each unit-normalised over channels (``f / (|f| + 1e-10)``); the squared
difference of the two images' features, weighted per channel by the 1x1 head; mean over space; sum
over the five layers. Videos (N, 3, F, H, W): per frame, mean over frames.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .checkpoint import CheckpointError, read_state_dict, sha256
from .folders import load_strict

__all__ = ["MIN_SIZE", "Lpips", "LpipsAlex", "check_file"]

SHIFT = (-0.030, -0.088, -0.188)  # ScalingLayer: the ImageNet mean in [-1, 1] units (fixed by the paper)
SCALE = (0.458, 0.448, 0.450)     # ScalingLayer: the ImageNet std in [-1, 1] units
EPS = 1e-10                       # unit normalisation over channels: f / (|f| + EPS), as the reference
CHANNELS = (64, 192, 384, 256, 256)   # channels of the five tapped ReLU outputs
SLICES = ((0, 2), (2, 5), (5, 8), (8, 10), (10, 12))   # alexnet().features indices of each slice
MIN_SIZE = 31                     # smallest side: conv1 (k11 s4 p2) and two 3/2 max-pools leave >= 1 pixel
DEFAULT_CHUNK = 16                # images (or frames) per backbone call
MAKE_FULL = ("on a machine with the lpips package: python -c \"import lpips, torch; "
             "torch.save(lpips.LPIPS(net='alex').state_dict(), 'lpips_alex.pth')\"")


def _features() -> list[nn.Module]:
    """torchvision's AlexNet ``features`` up to the last ReLU (index 11), in its indexing."""
    return [nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(),
            nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(),
            nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU()]


class _Scaling(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor(SHIFT)[None, :, None, None])   # (1, 3, 1, 1)
        self.register_buffer("scale", torch.tensor(SCALE)[None, :, None, None])


class _Lin(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))   # dropout: off in eval


class LpipsAlex(nn.Module):
    """The module whose state dict is the ``lpips`` package's ``LPIPS(net='alex')``'s, key for key."""

    def __init__(self):
        super().__init__()
        self.scaling_layer = _Scaling()
        self.net = nn.Module()
        layers = _features()
        for i, (lo, hi) in enumerate(SLICES, 1):
            part = nn.Sequential()
            for j in range(lo, hi):
                part.add_module(str(j), layers[j])
            self.net.add_module(f"slice{i}", part)
        for i, c in enumerate(CHANNELS):
            self.add_module(f"lin{i}", _Lin(c))

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The five unit-normalised ReLU outputs of images ``x`` in [-1, 1], (n, C_l, H_l, W_l) each."""
        h = (x - self.scaling_layer.shift) / self.scaling_layer.scale
        out = []
        for i in range(1, len(SLICES) + 1):
            h = getattr(self.net, f"slice{i}")(h)
            out.append(h / (h.pow(2).sum(dim=1, keepdim=True).sqrt() + EPS))
        return out

    def distance(self, fa: list[torch.Tensor], fb: list[torch.Tensor]) -> torch.Tensor:
        """(n,): the weighted squared feature differences, mean over space, summed over layers."""
        per_layer = [getattr(self, f"lin{i}").model((a - b) ** 2).mean(dim=(1, 2, 3))
                     for i, (a, b) in enumerate(zip(fa, fb))]
        return torch.stack(per_layer).sum(0)


def check_file(path) -> Path:
    """An LPIPS weights file that exists, before anything is read (one line each)."""
    if not str(path).strip():
        raise ValueError("--lpips '' is empty; give an LPIPS weights file")
    file = Path(path)
    if not file.exists():
        raise ValueError(f"--lpips {str(file)!r} does not exist; allowed: the full state dict of "
                         f"lpips.LPIPS(net='alex') saved as a file ({MAKE_FULL})")
    if not file.is_file():
        raise ValueError(f"--lpips {str(file)!r} is not a file; allowed: an LPIPS (AlexNet, v0.1) weights file")
    return file


def _check_layout(sd: dict, source: str) -> dict:
    """The heads-only file and other trunks refused by name; the scaling constants filled in or checked;
    heads saved without dropout (``lin0.model.0.weight``) renamed to the dropout layout."""
    if all(k.startswith("lin") for k in sd):
        raise ValueError(f"--lpips {source} holds only the linear heads ({', '.join(sorted(sd)[:2])}, ...), as the "
                         f"lpips package's weights/v0.1/alex.pth does; the AlexNet backbone weights are needed too: "
                         f"{MAKE_FULL}")
    trunk = "SqueezeNet" if "lin5.model.1.weight" in sd or "lin5.model.0.weight" in sd else \
        "VGG" if "net.slice1.2.weight" in sd else None
    if trunk:
        raise ValueError(f"--lpips {source} is an LPIPS with the {trunk} trunk; allowed: net='alex' ({MAKE_FULL})")
    sd = {(k.replace(".model.0.", ".model.1.") if k.startswith("lin") else k): v for k, v in sd.items()}
    for name, want in (("shift", SHIFT), ("scale", SCALE)):
        key = f"scaling_layer.{name}"
        if key not in sd:
            sd[key] = torch.tensor(want)[None, :, None, None]
        elif sd[key].numel() != 3 or not torch.allclose(sd[key].double().flatten(), torch.tensor(want).double(),
                                                           atol=1e-6):
            raise ValueError(f"--lpips {source}: {key} is {sd[key].flatten().tolist()}; LPIPS v0.1 fixes it "
                             f"at {list(want)}")
    for key, t in sd.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"--lpips {source}: weight {key} has non-finite values (NaN or inf); allowed: finite "
                             "weights (the file is damaged)")
    return sd


class Lpips:
    """A loaded LPIPS (AlexNet, v0.1) with its provenance; call it on two batches of RGB images."""

    def __init__(self, model: LpipsAlex, path: str, sha256: str, chunk: int = DEFAULT_CHUNK):
        self.model = model.eval()
        self.path, self.sha256, self.chunk = str(path), sha256, chunk

    @classmethod
    def load(cls, path, device="cpu", chunk: int = DEFAULT_CHUNK, dtype=torch.float32) -> Lpips:
        """The LPIPS of a weights file, computing in ``dtype`` (float32; float64 for exact checks)."""
        if not (isinstance(chunk, int) and chunk >= 1):
            raise ValueError(f"chunk={chunk!r} is not allowed; use a positive integer")
        file = check_file(path)
        try:
            sd, _ = read_state_dict(file)
        except CheckpointError as e:
            raise ValueError(f"--lpips: {e}") from None
        sd = _check_layout(dict(sd), repr(str(file)))
        model = LpipsAlex()
        load_strict(model, {k: v.float() for k, v in sd.items()}, f"--lpips {str(file)!r}")
        return cls(model.to(device=device, dtype=dtype).requires_grad_(False), file, sha256(file), chunk)

    def attrs(self) -> dict:
        """What a result records about the metric (netCDF-safe)."""
        return {"lpips_path": self.path, "lpips_sha256": self.sha256, "lpips_net": "alex", "lpips_version": "0.1"}

    @staticmethod
    def check_size(height: int, width: int, label: str = "the images"):
        """Refuse images AlexNet's taps do not fit (a side under ``MIN_SIZE`` pixels)."""
        if min(height, width) < MIN_SIZE:
            raise ValueError(f"LPIPS (AlexNet) needs images of at least {MIN_SIZE}x{MIN_SIZE} pixels; {label} are "
                             f"{height}x{width}; allowed: larger samples, or leave out --lpips")

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(N,) in the model's dtype on ``a``'s device: LPIPS of RGB images in [0, 1], (N, 3, H, W), or of videos
        (N, 3, F, H, W) frame by frame, mean over frames; ``chunk`` images per backbone call."""
        if a.shape != b.shape or a.dim() not in (4, 5) or a.shape[1] != 3:
            raise ValueError(f"LPIPS of shapes {tuple(a.shape)} and {tuple(b.shape)} is not allowed; give two "
                             "equal-shaped RGB batches (N, 3, H, W) or videos (N, 3, F, H, W)")
        self.check_size(*a.shape[-2:])
        video = a.dim() == 5
        flat = [(v.transpose(1, 2).flatten(0, 1) if video else v) for v in (a, b)]   # (N*F, 3, H, W)
        p = next(self.model.parameters())
        parts = []
        with torch.inference_mode():
            for start in range(0, len(flat[0]), self.chunk):
                xa, xb = (v[start:start + self.chunk].to(device=p.device, dtype=p.dtype) * 2 - 1 for v in flat)
                parts.append(self.model.distance(self.model.taps(xa), self.model.taps(xb)).to(a.device))
        d = torch.cat(parts)                                                  # (N*F,)
        return d.unflatten(0, (a.shape[0], -1)).mean(1) if video else d
