"""What the analyses share: a model's sample shape and labels, and the per-seed reference chain.

Every analysis (correlate, dynamics, spectral) follows the surfaces' convention: one uncached chain
per seed, batch 1, conditioned on one class label; the seed draws x_T and all sampler noise, so the
same seed gives the same x_t at every step in every module. Nothing here assumes images: a sample
is whatever ``model.sample_shape()`` says ((C, H, W) for DiT, (C, F, H, W) for a video model), and
models without classes (``config.num_classes == 0``) are called with ``y=None``.
"""
from __future__ import annotations

import dataclasses
import json
import numbers
from typing import Iterable, Iterator

import torch

from .diffusion import Diffusion, SamplerConfig, Step
from .io_utils import versions
from .models import Captions, Lpips, ModelEntry, Vae, as_entries, caption_attrs
from .models.protocol import family_of

__all__ = ["Captions", "ModelEntry", "as_entries", "at_steps", "caption_attrs", "check_captions_for", "check_seeds",
           "check_steps", "config_json", "embeds", "finite", "is_text", "labels", "model_device_dtype", "num_classes",
           "provenance", "reference_chain", "sampler_attrs", "text_kind", "tile"]


def num_classes(model) -> int:
    return int(getattr(model.config, "num_classes", 0) or 0)


def is_text(model) -> bool:
    """A text-conditioned model (LatteT2V): its condition is caption embeddings (N, L, C)."""
    return hasattr(model, "check_captions")


def text_kind(model) -> str:
    """"text-to-video" or "text-to-image", by the model's sample shape, for messages."""
    return "text-to-video" if len(model.sample_shape()) == 4 else "text-to-image"


def embeds(captions: Captions | torch.Tensor | None) -> torch.Tensor | None:
    """The caption tensor of ``Captions`` (a tensor or None passes through)."""
    return captions.embeds if isinstance(captions, Captions) else captions


def labels(model, class_label: int, n: int = 1, device=None, who: str = "this model",
           captions: Captions | torch.Tensor | None = None, dtype=None) -> torch.Tensor | None:
    """The condition of n rows: (n,) labels for a class-conditional model, None for an unconditional
    one, and ``captions`` (one caption, (1, L, C)) repeated to (n, L, C) for a text-to-video model.
    ``who`` names the model in the errors."""
    captions = embeds(captions)
    if is_text(model):
        if captions is None:
            raise ValueError(f"{who} is a {text_kind(model)} model: give one caption's embeddings "
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


def check_captions_for(model, captions: Captions | torch.Tensor | None, who: str):
    """A CLI's caption file goes with text-to-video models, and only with them; its shape must fit."""
    captions = embeds(captions)
    if is_text(model) != (captions is not None):
        raise ValueError(f"{who} is a {text_kind(model)} model: pass --caption-embeds" if captions is None else
                         f"--caption-embeds is for text-to-video checkpoints; {who} is not one")
    if captions is not None:
        model.check_captions(captions)


def model_device_dtype(model) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


def reference_chain(model, diffusion: Diffusion, sampler: SamplerConfig, seed: int, class_label: int,
                    generator: torch.Generator | None = None,
                    captions: Captions | torch.Tensor | None = None) -> Iterator[Step]:
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
        if not isinstance(s, numbers.Integral) or isinstance(s, bool):
            raise ValueError(f"{what} {s!r} is not an integer; allowed: integers 1..{sampler.num_steps}")
        if not 1 <= s <= sampler.num_steps:
            raise ValueError(f"{what} {s!r} is outside the chain; allowed: 1..{sampler.num_steps} "
                             f"(a {sampler.num_steps}-step {sampler.sampler.upper()} chain)")


def check_seeds(seeds):
    if not seeds:
        raise ValueError("no seeds requested")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds {list(seeds)} repeat; give each seed once")


def provenance(entries) -> dict:
    """attrs naming every model's source, checksum and family with its training process (beta
    schedule, prediction) the chains were sampled with (JSON strings, netCDF-safe)."""
    fam = {e.label: family_of(e.model) for e in entries}
    return {"models": json.dumps({e.label: getattr(e, "source", "") for e in entries}),
            "model_sha256": json.dumps({e.label: getattr(e, "sha256", "") for e in entries}),
            "model_family": json.dumps({k: f.name for k, f in fam.items()}),
            "diffusion_process": json.dumps({k: f"{f.schedule} betas, {f.prediction} prediction"
                                             for k, f in fam.items()}),
            "versions": json.dumps(versions())}


def sampler_attrs(sampler: SamplerConfig) -> dict:
    return {"chain": sampler.label, "spacing": sampler.spacing, "steps_offset": sampler.steps_offset,
            "cfg_scale": sampler.cfg_scale,
            "cfg_channels": -1 if sampler.cfg_channels is None else sampler.cfg_channels,
            "clip_denoised": int(sampler.clip_denoised), "eta": sampler.eta}


def finite(records: Iterable[Step], who: str = "the model") -> Iterator[Step]:
    """The records of a chain, refusing the first step whose model output is not finite (a broken
    checkpoint, not a perturbation: nothing else has happened to the chain)."""
    for rec in records:
        if not torch.isfinite(rec.model_output).all():
            raise ValueError(f"{who}: the unperturbed model's output is not finite at step {rec.step} "
                             f"(t={rec.timestep}); check the checkpoint's weights")
        yield rec


def at_steps(records: Iterable[Step], steps) -> Iterator[Step]:
    """The records of a chain at the requested steps, stopping after the last of them (the one
    "run the chain and keep what it has at these steps" loop every tool shares)."""
    want, last = set(steps), max(steps)
    for rec in records:
        if rec.step in want:
            yield rec
        if rec.step >= last:
            return


CAPTION_FIELDS = ("caption_embeds", "captions")
OPTIONAL_FIELDS = ("vae", "lpips")       # left out while None: configs without them keep their JSON (and fingerprints)


def _plain(value, name: str = ""):
    if isinstance(value, Captions):
        return value.source
    if isinstance(value, Vae):                       # by content: the same weights elsewhere are the same VAE
        return {k: v for k, v in value.attrs().items() if k != "vae_path"}
    if isinstance(value, Lpips):                     # by content too
        return {k: v for k, v in value.attrs().items() if k != "lpips_path"}
    if value is None and name in CAPTION_FIELDS:
        return ""                                    # no captions: the empty file name
    if hasattr(value, "spelling"):                   # a grid axis: its "min:max:count"
        return value.spelling
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name), f.name) for f in dataclasses.fields(value)
                if not (f.name in OPTIONAL_FIELDS and getattr(value, f.name) is None)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def config_json(cfg) -> str:
    """A frozen config as JSON for a result's attributes: nested configs as objects, grid axes in
    their ``min:max:count`` spelling, captions by file (their sha256 is recorded beside)."""
    return json.dumps(_plain(cfg), sort_keys=True)
