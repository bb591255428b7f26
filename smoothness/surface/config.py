"""What a surface is: ``SurfaceConfig``, numbers only (grids as ``Axis``, captions loaded once)."""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch

from .. import chain
from ..devices import DTYPES
from ..diffusion import SamplerConfig
from ..models import Captions
from . import similarity
from .engine import Perturbation
from .evaluation import EVALUATIONS, EvalSpec
from .perturb import Axis

DEFAULT_GRID = Axis(-0.25, 0.25, 21)
MAX_RESULT_BYTES = 8 * 2 ** 30     # a surface result larger than this is refused before anything is allocated


def as_axis(value, what: str) -> Axis:
    """An ``Axis``; its ``min:max:count`` spelling is accepted for convenience and parsed here, once."""
    if isinstance(value, Axis):
        return value
    if isinstance(value, str):
        return Axis.parse(value, what)
    raise ValueError(f"{what} must be an Axis or 'min:max:count', got {type(value).__name__}")


@dataclass(frozen=True)
class SurfaceConfig:
    steps: tuple[int, ...] = (10, 250)       # sampler iterations, 1-based (the paper's DDPM steps 10 and 250)
    sampler: SamplerConfig = SamplerConfig(num_steps=250, clip_denoised=True)   # the unperturbed chain
    alpha: Axis = DEFAULT_GRID               # min, max, count; 0 is always added to the grid
    beta: Axis = DEFAULT_GRID
    perturbation: Perturbation = Perturbation()
    evaluation: str = "local"                # local | trajectory
    readouts: tuple[str, ...] = ("output",)  # "output" (the eps prediction, the paper's) and/or sites
    metric: str = "cosine"                   # cosine | rel_l2 | rel_l1
    flatten: str = "sample"                  # sample | token (see smoothness.surface.similarity)
    seeds: tuple[int, ...] = (0,)            # one chain per seed; x_T and sampler noise from it
    class_label: int = 0                     # the class every chain is conditioned on
    caption_embeds: Captions | None = None   # text-to-video models: one caption's embeddings (a path is loaded)
    batch_size: int = 64                     # grid points per batched forward
    dtype: str = "float32"                   # float32 | bfloat16 (never float16 on CPU: ~300x slower)
    device: str = "cpu"

    def __post_init__(self):
        object.__setattr__(self, "alpha", as_axis(self.alpha, "alpha grid"))
        object.__setattr__(self, "beta", as_axis(self.beta, "beta grid"))
        object.__setattr__(self, "caption_embeds", Captions.of(self.caption_embeds))
        if self.evaluation not in EVALUATIONS:
            raise ValueError(f"unknown evaluation {self.evaluation!r}; allowed: {', '.join(EVALUATIONS)}")
        similarity.check(self.metric, self.flatten)
        chain.check_steps(list(self.steps), self.sampler)          # integers inside the chain
        chain.check_seeds(self.seeds)                              # given, each once
        if not self.readouts:
            raise ValueError("no readouts requested; use output and/or sites such as blocks.5")
        if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise ValueError(f"batch_size={self.batch_size} is not allowed; use a positive integer")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not allowed; use one of {', '.join(DTYPES)}")
        self.check_size(1)

    def check_size(self, models: int):
        """Estimate the result's memory (float64 cells plus the grid plan) before allocating it."""
        points = (self.alpha.count + 1) * (self.beta.count + 1)          # +1: the origin may be added
        cells = models * len(self.steps) * len(self.readouts) * len(self.seeds) * points
        need = 8 * cells + 32 * points
        if need > MAX_RESULT_BYTES:
            raise ValueError(f"the surface grid {self.alpha} x {self.beta} ({points:,} points, {cells:,} values) "
                             f"needs about {need / 2 ** 30:.1f} GiB; the limit is {MAX_RESULT_BYTES / 2 ** 30:.0f} GiB: "
                             "use fewer grid points, steps, readouts or seeds")

    @property
    def alphas(self) -> np.ndarray:
        return self.alpha.values()

    @property
    def betas(self) -> np.ndarray:
        return self.beta.values()

    @property
    def captions(self) -> torch.Tensor | None:
        """The caption tensor (1, L, C), or None."""
        return chain.embeds(self.caption_embeds)

    @property
    def eval_spec(self) -> EvalSpec:
        return EvalSpec(tuple(self.steps), tuple(self.readouts), self.sampler, self.perturbation, self.device)

    def to_json(self) -> str:
        """Every setting used as JSON (grids in their ``min:max:count`` spelling, captions by file);
        the direction settings a features or latent perturbation does not use are null; the device is left
        out (ranks on cuda:0 and cuda:1 compute one surface)."""
        d = json.loads(chain.config_json(self))
        d.pop("device")                     # where it ran is an attribute of the result, not of the surface
        if self.perturbation.mode != "weights":
            d["perturbation"]["directions"].update(norm=None, params=None, include_1d=None)
        return json.dumps(d, sort_keys=True)
