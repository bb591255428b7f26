"""The cache sweep as library code: every (method, interval, k, window) run on every model and seed,
compared with the uncached run from the same seed.

    from smoothness.cache.sweep import SweepConfig, sweep
    ds = sweep({"digits-skip-dit": model}, SweepConfig(methods=("skip-cache",), intervals=(2, 3)))

For every model and seed the uncached chain is the reference; every run starts from the same seed
and is compared with it: PSNR / SSIM / MSE of the final samples, per-step cosine similarity of the
model outputs, classifier accuracy and Frechet distance (digits models), steps computed and reused,
theoretical speedup (MACs) and realized speedup (wall time). Skip-Cache on a model without skip
branches is left empty (NaN): use deep-reuse there.
"""
from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass

import numpy as np
import torch
import xarray as xr

from .. import chain, metrics
from ..data import classifier
from ..diffusion import Diffusion, SamplerConfig
from ..io_utils import versions
from ..models import Captions
from ..models.bundled import is_pixel_digits
from ..models.protocol import family_of
from . import flops
from .base import METHODS, CacheConfig
from .skip_cache import apply_cache

SWEEP_METHODS = tuple(m for m in METHODS if m != "none")    # "none" is the reference every run is compared with

SCORES = {  # variable: (long name, units)
    "psnr": ("PSNR against the uncached run, mean over samples", "dB"),
    "ssim": ("SSIM against the uncached run, mean over samples", "1"),
    "mse": ("MSE against the uncached run, mean over samples", "(data units)^2"),
    "accuracy": ("digits-classifier accuracy on the requested classes", "1"),
    "frechet": ("Frechet distance to real digits in classifier features", "1"),
    "full_steps": ("model calls computed in full", "1"),
    "cached_steps": ("model calls served from the cache", "1"),
    "theoretical_speedup": ("uncached MACs / cached MACs over the chain", "1"),
    "realized_speedup": ("uncached wall time / cached wall time", "1"),
    "call_speedup": ("steps x median full-call time / total call time, within the cached run "
                     "(insensitive to load drift between runs)", "1"),
    "seconds": ("wall time of the chain", "s"),
    "temporal_change_ratio": ("videos: frame-to-frame change of the cached run / of the uncached run, "
                              "mean over samples", "1"),
}
DIMS = ("model", "method", "interval", "k", "window", "seed")


@dataclass(frozen=True)
class SweepConfig:
    """The grid a sweep runs: methods x intervals x k x windows, on every seed."""

    sampler: SamplerConfig = SamplerConfig(num_steps=50, cfg_scale=3.0, clip_denoised=True)  # DDPM-50, digits CFG
    methods: tuple[str, ...] = SWEEP_METHODS          # compared with the uncached run
    intervals: tuple[int, ...] = (2, 3, 4)            # N: a full step every N calls
    ks: tuple[int, ...] = (2,)                        # units recomputed on each side (12-unit bundled models)
    windows: tuple[tuple[int, int], ...] = ((20, 1000),)   # (stop, start): cache while stop < t < start (DiT)
    seeds: tuple[int, ...] = (0,)                     # one reference chain per seed
    classes: tuple[int, ...] = tuple(range(10))       # class-conditional models: labels drawn, each per_class times
    per_class: int = 2                                # samples per class (per caption for text-to-video)
    stop_inclusive: bool = True                       # reset after t <= stop (DiT) or t < stop (Latte c2v)
    captions: Captions | None = None                  # text-to-video models: the captions (N, L, C), loaded

    def __post_init__(self):
        object.__setattr__(self, "captions", Captions.of(self.captions))
        for name in ("methods", "intervals", "ks", "windows", "seeds", "classes"):
            object.__setattr__(self, name, tuple(tuple(v) if name == "windows" else v for v in getattr(self, name)))
            if not getattr(self, name):
                raise ValueError(f"{name} is empty; give at least one")
        for m in self.methods:
            if m not in SWEEP_METHODS:
                raise ValueError(f"unknown method {m!r}; allowed: {', '.join(SWEEP_METHODS)}")
        if not (isinstance(self.per_class, int) and self.per_class >= 1):
            raise ValueError(f"per_class={self.per_class!r} is not allowed; use a positive integer")
        for n, k, (stop, start) in itertools.product(self.intervals, self.ks, self.windows):
            self.cache(self.methods[0], n, k, stop, start)                 # validates interval, k and window

    def cache(self, method: str, interval: int, k: int, stop: int, start: int) -> CacheConfig:
        return CacheConfig(method=method, interval=interval, k=k, t_stop=stop, t_start=start,
                           stop_inclusive=self.stop_inclusive)

    @property
    def window_names(self) -> list[str]:
        return [self.cache("none", 2, 1, s, e).rule.window for s, e in self.windows]

    @property
    def caption_tensor(self) -> torch.Tensor | None:
        return chain.embeds(self.captions)

    @property
    def samples(self) -> int:
        """Samples per chain: per_class for each class, or for each caption of a text-to-video sweep."""
        return self.per_class * (len(self.captions.embeds) if self.captions is not None else len(self.classes))

    @property
    def skipped_metrics(self) -> dict[str, str]:
        """Metrics this sweep cannot compute, with the reason (checked before any work)."""
        if self.samples < 2:
            return {"frechet": f"the Frechet distance needs at least 2 samples per chain, this sweep draws "
                               f"{self.samples} (raise --per-class)"}
        return {}


def run_chain(model, diffusion, shape, y, sampler, seed, config: CacheConfig | None):
    """(final samples (N, C, [F,] H, W), model outputs per step (S, N, C_out, [F,] H, W), seconds, state)."""
    state = None
    start = time.perf_counter()
    with torch.inference_mode():
        if config is None:
            steps = list(diffusion.sample_steps(model, shape, y, sampler, seed=seed))
        else:
            with apply_cache(model, config) as state:
                steps = list(diffusion.sample_steps(model, shape, y, sampler, seed=seed))
    seconds = time.perf_counter() - start
    outs = torch.stack([s.model_output for s in steps])
    return steps[-1].x_next, outs, seconds, state


def _condition(label: str, model, cfg: SweepConfig):
    """(condition rows, caption tokens or None): labels, None (unconditional) or caption rows."""
    if chain.is_text(model):
        captions = cfg.caption_tensor
        if captions is None:
            raise ValueError(f"{label} is a text-to-video model: give caption embeddings (--caption-embeds)")
        model.check_captions(captions)
        return captions.repeat_interleave(cfg.per_class, dim=0), captions.shape[1]   # (N*per, L, C)
    labels = torch.tensor([c for c in cfg.classes for _ in range(cfg.per_class)])
    return (labels if model.config.num_classes else None), None


class _Results:
    """The sweep's arrays, filled cell by cell."""

    def __init__(self, models: dict, cfg: SweepConfig):
        self.coords = {"model": list(models), "method": list(cfg.methods), "interval": list(cfg.intervals),
                       "k": list(cfg.ks), "window": cfg.window_names, "seed": list(cfg.seeds)}
        size = [len(self.coords[d]) for d in DIMS]
        self.data = {v: np.full(size, np.nan) for v in SCORES}
        self.cos = np.full(size + [cfg.sampler.num_steps], np.nan)
        self.ref = {v: np.full((len(models), len(cfg.seeds)), np.nan) for v in ("accuracy", "frechet", "seconds")}
        self.masks = np.full(size, "", dtype=object)
        fam = {label: family_of(m) for label, m in models.items()}
        self.process = {"model_family": json.dumps({k: f.name for k, f in fam.items()}),
                        "diffusion_process": json.dumps({k: f"{f.schedule} betas, {f.prediction} prediction"
                                                         for k, f in fam.items()})}

    def copy(self, at, source):
        for v in self.data:
            self.data[v][at] = self.data[v][source]
        self.cos[at], self.masks[at] = self.cos[source], self.masks[source]

    def dataset(self, cfg: SweepConfig, diffusion: Diffusion) -> xr.Dataset:
        sampler = cfg.sampler
        ds = xr.Dataset({v: (DIMS, self.data[v], {"long_name": ln, "units": u}) for v, (ln, u) in SCORES.items()},
                        coords={**self.coords, "step": np.arange(1, sampler.num_steps + 1),
                                "timestep": ("step", diffusion.chain)})
        ds["step_cosine"] = (DIMS + ("step",), self.cos, {"long_name": "cosine similarity of model outputs to the "
                                                          "uncached run, mean over samples", "units": "1"})
        ds["realized_over_theoretical"] = (ds.realized_speedup / ds.theoretical_speedup).assign_attrs(
            long_name="realized speedup / theoretical speedup", units="1")
        ds["mask"] = (DIMS, self.masks.astype(str), {"long_name": "schedule actually run (F full, c cached)"})
        for v, arr in self.ref.items():
            ds[f"reference_{v}"] = (("model", "seed"), arr, {"long_name": f"uncached run: {SCORES[v][0]}",
                                                             "units": SCORES[v][1]})
        ds.attrs.update(sampler=sampler.sampler, num_sampling_steps=sampler.num_steps, cfg_scale=sampler.cfg_scale,
                        clip_denoised=int(sampler.clip_denoised), classes=list(cfg.classes), per_class=cfg.per_class,
                        seeds=list(cfg.seeds), stop_inclusive=int(cfg.stop_inclusive), data_range=2.0,
                        skipped_metrics="; ".join(f"{k}: {v}" for k, v in cfg.skipped_metrics.items()),
                        torch_threads=torch.get_num_threads(), **self.process,
                        **{f"version_{k}": str(v) for k, v in versions().items()})
        return ds


def sweep(models: dict, cfg: SweepConfig = SweepConfig(), log=print) -> xr.Dataset:
    """Run the grid on ``models`` ({label: model}); returns the labelled Dataset. Unconditional
    models (no class table, e.g. the video pair) draw ``len(classes) * per_class`` unlabelled samples;
    text-to-video models draw ``per_class`` videos for each caption."""
    diffusion = Diffusion.for_config(cfg.sampler)
    res = _Results(models, cfg)
    clf = classifier.load() if any(is_pixel_digits(m) for m in models.values()) else None
    for metric, why in cfg.skipped_metrics.items():
        log(f"skipping {metric}: {why}")
    for mi, (label, model) in enumerate(models.items()):
        y, tokens = _condition(label, model, cfg)
        shape = (len(cfg.classes) * cfg.per_class if y is None else len(y), *model.sample_shape())
        rows = shape[0] * (2 if cfg.sampler.cfg_scale > 1 and y is not None else 1)
        with torch.inference_mode():                                  # warm-up: 3 real steps, untimed
            for i, _ in enumerate(diffusion.sample_steps(model, shape, y, cfg.sampler, seed=cfg.seeds[0])):
                if i == 2:
                    break
        scorer = clf if is_pixel_digits(model) else None
        skipped = set()
        for si, seed in enumerate(cfg.seeds):
            ref = run_chain(model, diffusion, shape, y, cfg.sampler, seed, None)
            res.ref["seconds"][mi, si] = ref[2]
            if scorer is not None:
                res.ref["accuracy"][mi, si] = metrics.classifier_accuracy(ref[0], y, scorer).item()
                if "frechet" not in cfg.skipped_metrics:
                    res.ref["frechet"][mi, si] = metrics.frechet_distance(ref[0], classifier=scorer).item()
            log(f"{label} seed {seed}: uncached {cfg.sampler.num_steps} steps in {ref[2]:.1f}s")
            for (ai, method), (ni, n), (ki, k), (wi, (stop, start)) in itertools.product(
                    enumerate(cfg.methods), enumerate(cfg.intervals), enumerate(cfg.ks), enumerate(cfg.windows)):
                cache = cfg.cache(method, n, k, stop, start)
                try:
                    cache.check(model)
                except ValueError as e:
                    if method not in skipped:
                        log(f"  {label} {method}: skipped ({e})")
                        skipped.add(method)
                    continue
                at = (mi, ai, ni, ki, wi, si)
                if method == "fora" and ki > 0:                      # FORA does not use k: same run
                    res.copy(at, (mi, ai, ni, 0, wi, si))
                    continue
                run = run_chain(model, diffusion, shape, y, cfg.sampler, seed, cache)
                _score(res, at, run, ref, y, scorer, flops.schedule_cost(model, cache, diffusion.chain, batch=rows,
                                                                          caption_tokens=tokens),
                       frechet="frechet" not in cfg.skipped_metrics)
                log(f"  {label} {cache.name}: {run[3].num_full} full / {run[3].num_cached} cached, speedup "
                    f"{res.data['theoretical_speedup'][at]:.2f}x theoretical, "
                    f"{res.data['realized_speedup'][at]:.2f}x realized, PSNR {res.data['psnr'][at]:.2f} dB")
    return res.dataset(cfg, diffusion)


def _score(res: _Results, at, run, ref, y, scorer, cost: xr.Dataset, frechet: bool = True):
    """Fill cell ``at`` from a cached run against the reference run (both ``run_chain`` results)."""
    (x, out, sec, state), (x_ref, ref_out, ref_sec, _) = run, ref
    data = res.data
    data["psnr"][at] = metrics.psnr(x, x_ref, data_range=2.0).mean().item()
    side = min(x.shape[-2:])                                          # 11-tap Gaussian window, or smaller
    win = min(11, side if side % 2 else side - 1)
    data["ssim"][at] = metrics.ssim(x, x_ref, data_range=2.0, win_size=win).mean().item()
    data["mse"][at] = metrics.mse(x, x_ref).mean().item()
    if x.dim() == 5:
        data["temporal_change_ratio"][at] = (metrics.temporal_change(x) / metrics.temporal_change(x_ref)).mean().item()
    res.cos[at] = torch.nn.functional.cosine_similarity(out.flatten(2).double(), ref_out.flatten(2).double(),
                                                        dim=2).mean(1).numpy()
    if scorer is not None:
        data["accuracy"][at] = metrics.classifier_accuracy(x, y, scorer).item()
        if frechet:
            data["frechet"][at] = metrics.frechet_distance(x, classifier=scorer).item()
    data["full_steps"][at], data["cached_steps"][at] = state.num_full, state.num_cached
    data["theoretical_speedup"][at] = cost.attrs["theoretical_speedup"]
    data["realized_speedup"][at] = ref_sec / sec
    full_calls = [c.seconds for c in state.calls if c.full]
    data["call_speedup"][at] = len(state.calls) * float(np.median(full_calls)) / sum(c.seconds for c in state.calls)
    data["seconds"][at] = sec
    res.masks[at] = state.schedule.mask


def table(ds: xr.Dataset) -> str:
    head = (f"{'model':<18}{'method':<12}{'N':>3}{'k':>3}  {'window':<14}{'full':>5}{'cached':>7}"
            f"{'theo x':>8}{'real x':>8}{'call x':>8}{'PSNR':>7}{'SSIM':>7}{'acc':>6}{'FD':>8}")
    lines = [head, "-" * len(head)]
    for m in ds.model.values:
        acc, fd = ds.reference_accuracy.sel(model=m).mean().item(), ds.reference_frechet.sel(model=m).mean().item()
        lines.append(f"{m:<18}{'none':<12}{'':>3}{'':>3}  {'':<14}{ds.sizes['step']:>5}{0:>7}{1:>8.2f}{1:>8.2f}{1:>8.2f}"
                     f"{'inf':>7}{1:>7.3f}{acc:>6.2f}{fd:>8.2f}")
        mean = ds.sel(model=m).mean("seed")
        for a, n, k, w in itertools.product(ds.method.values, ds.interval.values, ds.k.values, ds.window.values):
            r = mean.sel({"method": a, "interval": n, "k": k, "window": w})
            if np.isnan(r.psnr.item()):
                continue
            lines.append(f"{'':<18}{a:<12}{n:>3}{k:>3}  {w:<14}{r.full_steps.item():>5.0f}{r.cached_steps.item():>7.0f}"
                         f"{r.theoretical_speedup.item():>8.2f}{r.realized_speedup.item():>8.2f}"
                         f"{r.call_speedup.item():>8.2f}{r.psnr.item():>7.2f}"
                         f"{r.ssim.item():>7.3f}{r.accuracy.item():>6.2f}{r.frechet.item():>8.2f}")
    return "\n".join(lines)
