"""What the analyses share: a model's sample shape and labels, and the per-seed reference chain.

Every analysis (correlate, dynamics, spectral) follows the surfaces' convention: one uncached chain
per seed, batch 1, conditioned on one class label; the seed draws x_T and all sampler noise, so the
same seed gives the same x_t at every step in every module. Nothing here assumes images: a sample
is whatever ``model.sample_shape()`` says ((C, H, W) for DiT, (C, F, H, W) for a video model), and
models without classes (``config.num_classes == 0``) are called with ``y=None``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterator

import torch

from .diffusion import Diffusion, SamplerConfig, Step


def num_classes(model) -> int:
    return int(getattr(model.config, "num_classes", 0) or 0)


def is_text(model) -> bool:
    """A text-conditioned model (LatteT2V): its condition is caption embeddings (N, L, C)."""
    return hasattr(model, "check_captions")


def labels(model, class_label: int, n: int = 1, device=None, who: str = "this model",
           captions: torch.Tensor | None = None, dtype=None) -> torch.Tensor | None:
    """The condition of n rows: (n,) labels for a class-conditional model, None for an unconditional
    one, and ``captions`` (one caption, (1, L, C)) repeated to (n, L, C) for a text-to-video model.
    ``who`` names the model in the errors."""
    if is_text(model):
        if captions is None:
            raise ValueError(f"{who} is a text-to-video model: give one caption's embeddings "
                             "(a tensor (L, C) or (1, L, C); the surface CLI takes --caption-embeds FILE)")
        if captions.dim() != 3 or captions.shape[0] != 1:
            raise ValueError(f"caption embeddings of shape {tuple(captions.shape)} hold "
                             f"{captions.shape[0] if captions.dim() == 3 else '?'} captions; every chain is "
                             "conditioned on one caption: give (L, C) or (1, L, C)")
        model.check_captions(captions)
        return captions.to(device=device, dtype=dtype or captions.dtype).repeat(n, 1, 1)
    if captions is not None:
        raise ValueError(f"caption embeddings are for text-to-video models; {who} is not one")
    classes = num_classes(model)
    if classes == 0:
        return None
    if not 0 <= class_label < classes:
        raise ValueError(f"class label {class_label} is not allowed for {who}; use 0..{classes - 1}")
    return torch.full((n,), class_label, dtype=torch.long, device=device)


def tile(y: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """Labels or caption embeddings repeated n times along the batch (group-major)."""
    return None if y is None else y.repeat(n, *([1] * (y.dim() - 1)))


def load_captions(path: str) -> torch.Tensor | None:
    """The caption embeddings in ``path`` (a config's ``caption_embeds``), or None for no path."""
    if not path:
        return None
    from .models.captions import load_caption_embeds
    return load_caption_embeds(path)


def check_captions_for(model, captions: torch.Tensor | None, who: str):
    """A CLI's caption file goes with text-to-video models, and only with them; its shape must fit."""
    if is_text(model) != (captions is not None):
        raise ValueError(f"{who} is a text-to-video model: pass --caption-embeds" if captions is None else
                         f"--caption-embeds is for text-to-video checkpoints; {who} is not one")
    if captions is not None:
        model.check_captions(captions)


def caption_attrs(path: str) -> dict:
    """attrs naming a caption embedding file and its checksum (empty strings without one)."""
    from .models import sha256
    return {"caption_embeds": str(path or ""), "caption_sha256": sha256(path) if path else ""}


def model_device_dtype(model) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


def reference_chain(model, diffusion: Diffusion, sampler: SamplerConfig, seed: int, class_label: int,
                    generator: torch.Generator | None = None, captions: torch.Tensor | None = None) -> Iterator[Step]:
    """The uncached chain of one seed, batch 1, in the model's own device and dtype (``captions``:
    one caption's embeddings, for a text-to-video model)."""
    device, dtype = model_device_dtype(model)
    y = labels(model, class_label, 1, device, captions=captions, dtype=dtype)
    g = generator if generator is not None else torch.Generator().manual_seed(int(seed))
    return diffusion.sample_steps(model, (1, *model.sample_shape()), y, sampler, generator=g, device=device,
                                  dtype=dtype)


def check_steps(steps, sampler: SamplerConfig, what: str = "step"):
    if not steps:
        raise ValueError(f"no {what}s requested")
    for s in steps:
        if not (isinstance(s, int) and 1 <= s <= sampler.num_steps):
            raise ValueError(f"{what} {s!r} is outside the chain; allowed: 1..{sampler.num_steps} "
                             f"(a {sampler.num_steps}-step {sampler.sampler.upper()} chain)")


def check_seeds(seeds):
    if not seeds:
        raise ValueError("no seeds requested")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds {list(seeds)} repeat; give each seed once")


@dataclass
class Labelled:
    """A model with the label it gets on the ``model`` dim, and where it came from."""

    label: str
    model: torch.nn.Module
    source: str = ""
    sha256: str = ""


def as_entries(models) -> list:
    """Accept ``{label: model}``, a list of ``surface.ModelEntry`` or of ``Labelled``; labels distinct."""
    if isinstance(models, dict):
        out = [Labelled(str(k), m) for k, m in models.items()]
    else:
        out = list(models)
    if not out:
        raise ValueError("no models given")
    names = [e.label for e in out]
    if len(set(names)) != len(names):
        raise ValueError(f"model labels must be distinct, got {names}")
    return out


def provenance(entries) -> dict:
    """attrs naming every model's source and checksum (JSON strings, netCDF-safe)."""
    from .io_utils import versions
    return {"models": json.dumps({e.label: getattr(e, "source", "") for e in entries}),
            "model_sha256": json.dumps({e.label: getattr(e, "sha256", "") for e in entries}),
            "versions": json.dumps(versions())}


def sampler_attrs(sampler: SamplerConfig) -> dict:
    return {"chain": f"{sampler.sampler.upper()}-{sampler.num_steps}", "cfg_scale": sampler.cfg_scale,
            "cfg_channels": -1 if sampler.cfg_channels is None else sampler.cfg_channels,
            "clip_denoised": int(sampler.clip_denoised), "eta": sampler.eta}
