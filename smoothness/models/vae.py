"""Latents to pixels: a local diffusers ``AutoencoderKL`` (SD-VAE, SDXL-VAE), offline, weights-only.

    vae = Vae.load("path/to/sd-vae-ft-ema")        # scaling factor from its config (0.18215)
    pixels = vae.decode(latents)                   # (N, 4, H, W) -> (N, 3, 8H, 8W) in [0, 1]

A VAE folder is what ``AutoencoderKL.save_pretrained`` writes and what the hubs hold:
``config.json`` (``_class_name`` AutoencoderKL) and ``diffusion_pytorch_model.safetensors`` (a
``.bin`` is read with ``torch.load(weights_only=True)``; a pickle that would run code is refused).
The model is built from its config and the weights are loaded strictly; nothing is downloaded.

Decoding follows the diffusers pipelines (DiT, Latte, HunYuan-DiT): ``decode(z / scaling_factor +
shift_factor).sample``, then ``(x + 1) / 2`` clamped to [0, 1] (``VaeImageProcessor.postprocess``).
Videos (N, C, F, H, W) are decoded frame by frame, as Latte's pipeline does, ``chunk`` frames per
call, so memory stays bounded; images (N, C, H, W) ``chunk`` at a time. Scaling factors: 0.18215
(``sd-vae-ft-ema`` / ``sd-vae-ft-mse``, DiT and Latte), 0.13025 (SDXL's VAE, HunYuan-DiT).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .bundled import is_pixel
from .checkpoint import read_state_dict, sha256
from .diffusers_adapter import import_diffusers
from .folders import load_strict, weight_files

__all__ = ["Vae", "check_folder", "check_latent"]

CLASS = "AutoencoderKL"
DEFAULT_CHUNK = 8                 # frames (or images) per decoder call


def check_folder(path) -> Path:
    """A VAE folder with a config.json and a weights file, before anything is read (one line each)."""
    folder = Path(path)
    if not str(path).strip():
        raise ValueError("--vae '' is empty; give a diffusers AutoencoderKL folder")
    if not folder.exists():
        raise ValueError(f"--vae {str(folder)!r} does not exist; allowed: a diffusers AutoencoderKL folder "
                         "(config.json + diffusion_pytorch_model.safetensors)")
    if not folder.is_dir():
        raise ValueError(f"--vae {str(folder)!r} is a file; allowed: the folder holding its config.json and "
                         "diffusion_pytorch_model.safetensors")
    if not (folder / "config.json").is_file():
        hint = f"; it is a pipeline folder: pass {str(folder / 'vae')!r}" if (folder / "vae" / "config.json").is_file() \
            else ""
        raise ValueError(f"--vae {str(folder)!r} has no config.json; allowed: a diffusers AutoencoderKL folder{hint}")
    weight_files(folder)                                               # one line when there are none
    return folder


def check_latent(model, label: str = "the model"):
    """Refuse a pixel-space model: it has no latents to decode."""
    if is_pixel(model):
        raise ValueError(f"--vae given, but {label} is a pixel-space model (the bundled 16x16 data): it has no "
                         "latents to decode; allowed: latent checkpoints (--ckpt), or leave out --vae")


def _config(folder: Path) -> dict:
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"--vae {str(path)!r} is not valid JSON: {e}") from None
    name = config.get("_class_name") if isinstance(config, dict) else None
    if name != CLASS:
        raise ValueError(f"--vae {str(folder)!r} holds a {name}; allowed: {CLASS} (the SD / SDXL VAEs)")
    for key in ("latents_mean", "latents_std"):
        if config.get(key) is not None:
            raise ValueError(f"--vae {str(folder)!r} sets {key} (a pipeline's own latent normalisation); allowed: "
                             "VAEs decoded with scaling_factor (and shift_factor) alone, as the SD and SDXL VAEs")
    return config


def _finite(sd: dict, source: str):
    for key, t in sd.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"--vae {source}: weight {key} has non-finite values (NaN or inf); allowed: finite "
                             "weights (the file is damaged)")


class Vae:
    """A loaded AutoencoderKL with the scaling factor it decodes with and its provenance."""

    def __init__(self, model, scaling_factor: float, shift_factor: float, path: str, sha256: str,
                 chunk: int = DEFAULT_CHUNK):
        self.model = model.eval()
        self.scaling_factor = float(scaling_factor)
        self.shift_factor = float(shift_factor)
        self.path, self.sha256, self.chunk = str(path), sha256, chunk
        self._last = None                                              # (latents, pixels) of decode(reuse=True)

    @classmethod
    def load(cls, path, scaling_factor: float | None = None, chunk: int = DEFAULT_CHUNK, device="cpu",
             dtype=torch.float32) -> Vae:
        """The VAE of a folder; ``scaling_factor`` overrides its config's (``--vae-scale``)."""
        if scaling_factor is not None and not (math.isfinite(scaling_factor) and scaling_factor > 0):
            raise ValueError(f"--vae-scale={scaling_factor} is not allowed; use a finite number > 0")
        if not (isinstance(chunk, int) and chunk >= 1):
            raise ValueError(f"--vae-chunk={chunk!r} is not allowed; use a positive integer")
        folder = check_folder(path)
        config = _config(folder)
        files = weight_files(folder)
        sd = {}
        for f in files:
            sd.update(read_state_dict(f)[0])
        _finite(sd, repr(str(folder)))
        inner = getattr(import_diffusers(), CLASS).from_config({k: v for k, v in config.items()
                                                                if not k.startswith("_")})
        sd = inner._fix_state_dict_keys_on_load(dict(sd)) or sd      # old folders: query/key/value -> to_q/to_k/to_v
        load_strict(inner, sd, f"--vae {str(folder)!r}")
        scale = inner.config.scaling_factor if scaling_factor is None else scaling_factor
        shift = inner.config.shift_factor or 0.0
        inner = inner.to(device=device)
        if dtype != next(inner.parameters()).dtype:                   # diffusers warns on a cast to float32 itself
            inner = inner.to(dtype=dtype)
        return cls(inner, scale, shift, folder,
                   ",".join(sha256(f) for f in files), chunk)

    def __reduce__(self):
        """Pickled by reference (a worker process reloads the folder and checks its sha256)."""
        return _reload, (self.path, self.scaling_factor, self.chunk, self.sha256)

    @property
    def latent_channels(self) -> int:
        return int(self.model.config.latent_channels)

    @property
    def upscale(self) -> int:
        """Pixels per latent along a side: the diffusers pipelines' ``vae_scale_factor``."""
        return 2 ** (len(self.model.config.block_out_channels) - 1)

    def attrs(self) -> dict:
        """What a result records about the decoding (netCDF-safe)."""
        return {"vae_path": self.path, "vae_sha256": self.sha256, "vae_scaling_factor": self.scaling_factor,
                "vae_shift_factor": self.shift_factor, "vae_chunk": self.chunk}

    def check_model(self, model, label: str = "the model"):
        """Refuse pixel-space models and a latent channel count the VAE does not decode."""
        check_latent(model, label)
        channels = model.sample_shape()[0]
        if channels != self.latent_channels:
            raise ValueError(f"{label} makes {channels}-channel latents, but the VAE {self.path!r} decodes "
                             f"{self.latent_channels}-channel latents; allowed: a VAE with latent_channels={channels}")

    def decode(self, latents: torch.Tensor, chunk: int | None = None, reuse: bool = False) -> torch.Tensor:
        """Pixels in [0, 1], float32 on the latents' device: (N, C, H, W) -> (N, 3, H', W'), videos
        (N, C, F, H, W) -> (N, 3, F, H', W') frame by frame, ``chunk`` frames per decoder call.
        ``reuse``: a second call on the same tensor object returns the first result (the reference
        run, scored against every cached run)."""
        if reuse and self._last is not None and self._last[0] is latents:
            return self._last[1]
        chunk = self.chunk if chunk is None else chunk
        if not (isinstance(chunk, int) and chunk >= 1):
            raise ValueError(f"chunk={chunk!r} is not allowed; use a positive integer")
        if latents.dim() not in (4, 5) or latents.shape[1] != self.latent_channels:
            raise ValueError(f"latents of shape {tuple(latents.shape)} are not allowed; the VAE decodes (N, "
                             f"{self.latent_channels}, H, W) images or (N, {self.latent_channels}, F, H, W) videos")
        video = latents.dim() == 5
        n = latents.shape[0]
        flat = latents.transpose(1, 2).flatten(0, 1) if video else latents   # (N*F, C, H, W), sample-major
        p = next(self.model.parameters())
        parts = []
        with torch.inference_mode():
            for start in range(0, len(flat), chunk):
                z = flat[start:start + chunk].to(device=p.device, dtype=p.dtype)
                x = self.model.decode(z / self.scaling_factor + self.shift_factor).sample   # (n, 3, H', W'), [-1, 1]
                parts.append(((x.float() + 1) / 2).clamp(0, 1).to(latents.device))
        out = torch.cat(parts)
        if video:
            out = out.unflatten(0, (n, -1)).transpose(1, 2)                 # (N, 3, F, H', W')
        if reuse:
            self._last = (latents, out)
        return out


def _reload(path: str, scaling_factor: float, chunk: int, expected: str) -> Vae:
    vae = Vae.load(path, scaling_factor, chunk)
    if vae.sha256 != expected:
        raise ValueError(f"--vae {path!r} changed on disk while the run was going (sha256 {vae.sha256[:12]} != "
                         f"{expected[:12]})")
    return vae
