"""How much caching changes a chain at a sampler step s: the errors ``smoothness.correlate`` sets
against the smoothness of the step-s surface.

* per-step error (paper-spec 3.4, reading (i)): the chain's x_{s-lag} goes through the cached model
  as a full step, filling the cache, then the chain's x_s as a cached step. That output is compared
  with the uncached output on the same x_s: ``cosine_distance`` = 1 - cosine, ``rel_l2`` =
  ||cached - uncached|| / ||uncached||, on the eps channels, each sample flattened over all its
  non-batch dims;
* window error (closer to reading (ii)): steps s-window .. s+window reuse the cache filled at step
  s-window-1 and every other step is full; ``psnr`` of that chain's final sample against the
  uncached one (same noise), in dB, larger = better. The chain is only run from step s-window-1 on,
  starting from the uncached chain's x_t and sampler-noise state there, which gives exactly the
  same result as the whole chain.

With a VAE (``vae``, a ``models.Vae``) both final samples are decoded and ``psnr`` is taken on the RGB
pixels in [0, 1] (data range 1), as the paper reports it; the latents' PSNR is kept as
``latent_psnr`` (data range ``data_range``).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch
import xarray as xr

from .. import chain
from ..cache import METHODS, REGISTRY, CacheConfig, Schedule, apply_cache
from ..diffusion import Diffusion, SamplerConfig
from ..models import Captions

METHODS_OR_AUTO = ("auto",) + tuple(m for m in METHODS if m != "none" and not REGISTRY[m].dynamic)
#  static methods only: the errors cache chosen steps (a fixed mask), which a run-time rule cannot follow

ERRORS = {  # name: (long name, units, larger is worse)
    "cosine_distance": ("1 - cosine similarity of cached and uncached outputs at the step", "1", True),
    "rel_l2": ("relative L2 distance of cached and uncached outputs at the step", "1", True),
    "psnr": ("PSNR of the final sample, caching around the step, against the uncached one", "dB", False),
}


def check_method(method: str) -> str:
    """``auto`` or a static method (one line naming the bad value otherwise)."""
    if method not in METHODS_OR_AUTO:
        why = (" (it decides at run time; the caching errors cache chosen steps, so static methods only)"
               if method in REGISTRY else "")
        raise ValueError(f"unknown method {method!r}{why}; allowed: {', '.join(METHODS_OR_AUTO)}")
    return method


@dataclass(frozen=True)
class CachingErrorConfig:
    """What the caching errors are measured on (the chains: those of the surfaces) and how."""

    steps: tuple[int, ...] = (10, 70, 130, 190, 250)   # sampler steps s, 1-based
    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(num_steps=250, clip_denoised=True))
    seeds: tuple[int, ...] = (0, 1, 2)                # one uncached chain per seed
    class_label: int = 0                              # the class every chain is conditioned on
    caption_embeds: Captions | None = None            # text-to-video models: the one caption (a path is loaded)
    method: str = "auto"           # auto: skip-cache with skip branches, deep-reuse without; or one of METHODS
    k: int = 2                     # units recomputed on each side (12-unit bundled models: 2)
    lag: int = 1                   # per-step error: the cache was filled at step s - lag
    window: int = 2                # window error: steps s-window..s+window are cached
    data_range: float = 2.0        # PSNR peak-to-peak range of the samples ([-1, 1] pixels)
    vae: object = None             # a models.Vae: psnr on decoded pixels in [0, 1], latent_psnr beside; None: as sampled

    def __post_init__(self):
        object.__setattr__(self, "caption_embeds", Captions.of(self.caption_embeds))
        check_method(self.method)
        for name, low in (("k", 1), ("lag", 1), ("window", 0)):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= low):
                raise ValueError(f"{name}={v!r} is not allowed; use an integer >= {low}")
        if not self.data_range > 0:
            raise ValueError(f"data_range={self.data_range!r} is not allowed; use a positive number")
        low = [s for s in self.steps if s <= self.lag]
        if low:
            raise ValueError(f"step {low[0]} has no step {low[0] - self.lag} to fill the cache from (lag={self.lag}); "
                             f"allowed: steps {self.lag + 1}..{self.sampler.num_steps}")
        chain.check_steps(list(self.steps), self.sampler)
        chain.check_seeds(self.seeds)
        if 2 * self.window + 1 > self.sampler.num_steps - 1:     # steps 2..N can be cached; step 1 is always full
            raise ValueError(f"window={self.window} caches {2 * self.window + 1} steps, more than the "
                             f"{self.sampler.num_steps - 1} cacheable steps of a {self.sampler.num_steps}-step chain; "
                             f"allowed: 0..{(self.sampler.num_steps - 2) // 2}")

    @property
    def errors(self) -> dict:
        """ERRORS, and with a VAE ``latent_psnr`` too (``psnr`` is then on decoded pixels)."""
        if self.vae is None:
            return ERRORS
        return {**ERRORS, "psnr": ("PSNR of the decoded final sample (RGB in [0, 1]), caching around the step, "
                                   "against the uncached one", "dB", False),
                "latent_psnr": ("PSNR of the final latents, caching around the step, against the uncached ones",
                                "dB", False)}

    def method_for(self, model) -> str:
        if self.method != "auto":
            return self.method
        return "skip-cache" if getattr(model, "skip_into", None) else "deep-reuse"

    def window_of(self, step: int) -> tuple[int, int]:
        """Cached steps (first, last) around ``step``; step 1 is always full."""
        return max(2, step - self.window), min(self.sampler.num_steps, step + self.window)


def _flat(v: torch.Tensor) -> torch.Tensor:
    return v.double().reshape(v.shape[0], -1)                          # (N, everything else)


def output_errors(cached: torch.Tensor, full: torch.Tensor) -> tuple[float, float]:
    """(1 - cosine, relative L2) of two (N, ...) outputs, each sample flattened, mean over samples."""
    a, b = _flat(cached), _flat(full)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
    rel = torch.linalg.vector_norm(a - b, dim=1) / torch.linalg.vector_norm(b, dim=1).clamp_min(1e-300)
    return float((1 - cos).mean()), float(rel.mean())


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> float:
    """10 log10(range^2 / MSE), each sample flattened over all its dims, mean over samples (inf if equal)."""
    err = ((_flat(a) - _flat(b)) ** 2).mean(1)
    return float((10 * torch.log10(data_range ** 2 / err)).mean())


def _psnrs(x0: torch.Tensor, final: torch.Tensor, cfg: CachingErrorConfig) -> list[float]:
    """[psnr] of the samples; with a VAE [psnr of the decoded pixels, psnr of the latents]."""
    if cfg.vae is None:
        return [psnr(x0, final, cfg.data_range)]
    pixels = psnr(cfg.vae.decode(x0), cfg.vae.decode(final, reuse=True), 1.0)
    return [pixels, psnr(x0, final, cfg.data_range)]


def step_error(model, cache: CacheConfig, diffusion: Diffusion, sampler: SamplerConfig, x_fill, t_fill,
               x, t, y, reference: torch.Tensor) -> tuple[float, float]:
    """Reading (i): fill the cache with a full call on (x_fill, t_fill), then call cached on (x, t);
    compare the eps channels with ``reference`` (the uncached output on x)."""
    rule = replace(cache, interval=2, t_start=1000, t_stop=-1, mask=None)   # full, then cached; no window
    with apply_cache(model, rule) as state:
        diffusion.model_output(model, x_fill, t_fill, y, sampler)
        out = diffusion.model_output(model, x, t, y, sampler)
    if [c.full for c in state.calls] != [True, False]:
        raise RuntimeError(f"expected a full then a cached call, got {state.schedule.mask}")
    c = x.shape[1]
    return output_errors(out[:, :c], reference[:, :c])


def window_final(model, cache: CacheConfig, diffusion: Diffusion, sampler: SamplerConfig, first: int, last: int,
                 x_start, generator: torch.Generator, y) -> torch.Tensor:
    """Final sample of the chain whose steps first..last are cached, run from step first-1 on:
    ``x_start`` is the uncached chain's x_t at step first-1 and ``generator`` its noise state there."""
    start = first - 1
    m = sampler.num_steps - start + 1                                  # steps left, start included
    sub = Diffusion(list(diffusion.timestep_map[:m]))                  # the same last m timesteps
    mask = [not (first <= start + i <= last) for i in range(m)]
    cfg = replace(cache, mask=Schedule.from_mask(mask))
    with apply_cache(model, cfg):
        return sub.sample(model, tuple(x_start.shape), y, replace(sampler, num_steps=m), generator=generator,
                          x_T=x_start, device=x_start.device, dtype=x_start.dtype)


def caching_errors(models, cfg: CachingErrorConfig, log=None) -> xr.DataArray:
    """Caching errors, dims (model, step, seed, error); ``models`` is {label: model} or entries.
    ``cfg``: a CachingErrorConfig (a CorrelateConfig gives its own as ``.caching_error``)."""
    cfg = getattr(cfg, "caching_error", cfg)
    entries = chain.as_entries(models)
    diffusion = Diffusion.for_config(cfg.sampler)
    steps, seeds = sorted(cfg.steps), list(cfg.seeds)
    errors = cfg.errors
    out = np.full((len(entries), len(steps), len(seeds), len(errors)), np.nan)
    caches, captions = {}, cfg.caption_embeds
    for e in entries:                                                  # validate before any work
        caches[e.label] = CacheConfig(method=cfg.method_for(e.model), k=cfg.k)
        caches[e.label].check(e.model)
        if cfg.vae is not None:
            cfg.vae.check_model(e.model, e.label)
        chain.labels(e.model, cfg.class_label, who=e.label, captions=captions)
    for m, e in enumerate(entries):
        model, cache = e.model.eval(), caches[e.label]
        device, dtype = chain.model_device_dtype(model)
        y = chain.labels(model, cfg.class_label, 1, device, captions=captions, dtype=dtype)
        need = set(steps) | {s - cfg.lag for s in steps} | {cfg.window_of(s)[0] - 1 for s in steps}
        at = lambda step: torch.full((1,), diffusion.timestep_of(step), dtype=torch.long, device=device)
        for j, seed in enumerate(seeds):
            g = torch.Generator().manual_seed(int(seed))
            after_x_T = torch.Generator().manual_seed(int(seed))
            torch.randn((1, *model.sample_shape()), generator=after_x_T)
            x_t, outs, noise = {}, {}, {1: after_x_T.get_state()}    # noise[j]: generator state entering step j
            with torch.inference_mode():
                for rec in chain.reference_chain(model, diffusion, cfg.sampler, seed, cfg.class_label, g,
                                                 captions=captions):
                    if rec.step in need:
                        x_t[rec.step], outs[rec.step] = rec.x_t, rec.model_output
                    if rec.step + 1 in need:
                        noise[rec.step + 1] = g.get_state()
                    final = rec.x_next
                for i, s in enumerate(steps):
                    out[m, i, j, :2] = step_error(model, cache, diffusion, cfg.sampler, x_t[s - cfg.lag],
                                                  at(s - cfg.lag), x_t[s], at(s), y, outs[s])
                    first, last = cfg.window_of(s)
                    gen = torch.Generator()
                    gen.set_state(noise[first - 1])
                    x0 = window_final(model, cache, diffusion, cfg.sampler, first, last, x_t[first - 1], gen, y)
                    out[m, i, j, 2:] = _psnrs(x0, final, cfg)
            if log:
                log(f"{e.label} seed {seed}: caching errors at steps {steps} done ({cache.method}, k={cache.k})")
    return xr.DataArray(
        out, dims=("model", "step", "seed", "error"),
        coords={"model": [e.label for e in entries], "step": ("step", steps, {"long_name": "sampler iteration (1-based)"}),
                "timestep": ("step", [diffusion.timestep_of(s) for s in steps],
                             {"long_name": "DDPM timestep t on the 1000-step scale"}),
                "seed": seeds, "error": list(errors),
                "error_units": ("error", [v[1] for v in errors.values()]),
                "error_long_name": ("error", [v[0] for v in errors.values()]),
                "method": ("model", [caches[e.label].method for e in entries]),
                "window_first": ("step", [cfg.window_of(s)[0] for s in steps], {"long_name": "first cached step"}),
                "window_last": ("step", [cfg.window_of(s)[1] for s in steps], {"long_name": "last cached step "
                                "(windows are clipped to the chain)"})},
        name="caching_error", attrs={"long_name": "caching error", "lag": cfg.lag, "window": cfg.window, "k": cfg.k})
