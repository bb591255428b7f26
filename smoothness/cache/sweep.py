"""The cache sweep as library code: every method and setting on every model and seed, compared with
the uncached run from the same seed, on one quality-vs-MACs plane.

    from smoothness.cache.sweep import SweepConfig, sweep
    ds = sweep({"digits-skip-dit": model}, SweepConfig(methods=("skip-cache", "dbcache"), intervals=(2, 3)))

Each method spec is a registered method, or ``method+forecast`` (``skip-cache+taylor1``) for a
reusing method with TaylorSeer / FoCa forecasting. A static method runs every (interval, k, window)
of the grid (k only if it uses k); a dynamic one runs its own settings (``Method.sweep_settings``,
or ``thresholds``). The result has dims (model, method, setting, seed): ``setting`` numbers a
method's settings, and ``config`` (method, setting) names each one (NaN cells: no such setting).

For every model and seed the uncached chain is the reference: PSNR / SSIM / MSE of the final
samples, per-step cosine similarity of the model outputs, classifier accuracy and Frechet distance
(digits models), calls computed and reused, theoretical speedup (MACs of the calls actually made)
and realized speedup (wall time). Methods that need a calibration get one run per (model, sampler,
seed), recorded in the attrs. Skip-Cache on a model without skip branches is left empty (NaN).

With ``partial`` the results so far are written there (atomically) after every cell, and with
``resume`` the cells already in that file are skipped: the resumed result equals an uninterrupted
run except for wall times.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from .. import chain, devices, metrics, ranks
from ..data import classifier
from ..diffusion import Diffusion, SamplerConfig
from ..io_utils import atomic_path, versions
from ..models import Captions
from ..models.bundled import is_pixel_digits
from ..models.protocol import family_of
from . import flops, pixels
from .base import FORECASTS, CacheConfig, method_class, method_names
from .calibrate import calibrate
from .skip_cache import apply_cache

SWEEP_METHODS = tuple(m for m in method_names() if m != "none")    # "none" is the reference of every run
FORECAST_SPECS = ("skip-cache+taylor1", "skip-cache+taylor2", "skip-cache+foca", "deep-reuse+taylor1",
                  "fora+taylor1", "dbcache+taylor1")               # the forecasting variants "all" adds

SCORES = {  # variable: (long name, units)
    "psnr": ("PSNR against the uncached run, mean over samples", "dB"),
    "ssim": ("SSIM against the uncached run, mean over samples", "1"),
    "mse": ("MSE against the uncached run, mean over samples", "(data units)^2"),
    "accuracy": ("digits-classifier accuracy on the requested classes", "1"),
    "frechet": ("Frechet distance to real digits in classifier features", "1"),
    "full_steps": ("model calls computed in full (a call whose rows differed counts its full fraction)", "1"),
    "cached_steps": ("model calls served from the cache", "1"),
    "theoretical_speedup": ("uncached MACs / MACs of the calls made, over the chain", "1"),
    "realized_speedup": ("uncached wall time / cached wall time", "1"),
    "call_speedup": ("steps x median full-call time / total call time, within the cached run "
                     "(insensitive to load drift between runs)", "1"),
    "seconds": ("wall time of the chain", "s"),
    "temporal_change_ratio": ("videos: frame-to-frame change of the cached run / of the uncached run, "
                              "mean over samples", "1"),
}
WALL = ("realized_speedup", "call_speedup", "seconds")             # wall-time variables: differ between runs
DIMS = ("model", "method", "setting", "seed")


def parse_spec(spec: str) -> tuple[str, str]:
    """``"skip-cache+taylor1"`` -> ("skip-cache", "taylor1"); a plain name -> (name, "reuse")."""
    name, _, forecast = spec.partition("+")
    allowed = [m for m in method_names() if m != "none"]            # live: methods registered later count
    if name not in allowed:
        raise ValueError(f"unknown method {name!r}; allowed: {', '.join(allowed)} (or METHOD+FORECAST, "
                         f"FORECAST one of {', '.join(FORECASTS[1:])})")
    return name, forecast or "reuse"


@dataclass(frozen=True)
class SweepConfig:
    """The grid a sweep runs: methods x their settings, on every seed."""

    sampler: SamplerConfig = SamplerConfig(num_steps=50, cfg_scale=3.0, clip_denoised=True)  # DDPM-50, digits CFG
    methods: tuple[str, ...] = SWEEP_METHODS          # method specs compared with the uncached run
    intervals: tuple[int, ...] = (2, 3, 4)            # N of the static methods: a full step every N calls
    ks: tuple[int, ...] = (2,)                        # units recomputed on each side (12-unit bundled models)
    windows: tuple[tuple[int, int], ...] = ((20, 1000),)   # (stop, start): cache while stop < t < start (DiT)
    seeds: tuple[int, ...] = (0,)                     # one reference chain per seed
    classes: tuple[int, ...] = tuple(range(10))       # class-conditional models: labels drawn, each per_class times
    per_class: int = 2                                # samples per class (per caption for text-to-video)
    stop_inclusive: bool = True                       # reset after t <= stop (DiT) or t < stop (Latte c2v)
    captions: Captions | None = None                  # text-to-video models: the captions (N, L, C), loaded
    thresholds: tuple[float, ...] = ()                # dynamic methods' thresholds; empty: each method's own grid
    calibration: object = None                        # a Calibration for one model; None: one run per (model, seed)
    vae: object = None                                # a models.Vae: fidelity on decoded pixels (cache.pixels); None: as sampled
    lpips: object = None                              # a models.Lpips (needs vae): adds lpips on decoded pixels; None: not
    dtype: str = "float32"                            # float32, or bfloat16: every chain under bf16 autocast

    def __post_init__(self):
        object.__setattr__(self, "captions", Captions.of(self.captions))
        for name in ("methods", "intervals", "ks", "windows", "seeds", "classes", "thresholds"):
            object.__setattr__(self, name, tuple(tuple(v) if name == "windows" else v for v in getattr(self, name)))
            if not getattr(self, name) and name != "thresholds":
                raise ValueError(f"{name} is empty; give at least one")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods {self.methods} name a method twice")
        if self.lpips is not None and self.vae is None:
            raise ValueError("lpips given without vae; LPIPS compares decoded RGB pixels: give a VAE too")
        if self.dtype not in devices.DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not allowed; use one of {', '.join(devices.DTYPES)}")
        if not (isinstance(self.per_class, int) and self.per_class >= 1):
            raise ValueError(f"per_class={self.per_class!r} is not allowed; use a positive integer")
        for spec in self.methods:
            self.settings(spec)                                            # validates every setting

    def settings(self, spec: str) -> list[CacheConfig]:
        """The configs of one method spec, in setting order (no calibration attached yet)."""
        name, forecast = parse_spec(spec)
        cls = method_class(name)
        base = dict(method=name, forecast=forecast, stop_inclusive=self.stop_inclusive)
        if cls.dynamic:
            return [CacheConfig(**base, **kw) for kw in cls.sweep_settings(self.ks, self.thresholds)]
        ks = self.ks if "k" in cls.uses else self.ks[:1]
        return [CacheConfig(**base, interval=n, k=k, t_stop=stop, t_start=start)
                for n, k, (stop, start) in itertools.product(self.intervals, ks, self.windows)]

    @property
    def num_settings(self) -> int:
        return max(len(self.settings(m)) for m in self.methods)

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

    def grid_json(self) -> str:
        """What a partial file must match to be resumed: the sampler, samples, seeds and every config name."""
        return json.dumps({"sampler": dataclasses.asdict(self.sampler), "classes": self.classes,
                           "per_class": self.per_class, "seeds": self.seeds,
                           "configs": {m: [c.name for c in self.settings(m)] for m in self.methods},
                           **({"vae": chain.config_json(self.vae)} if self.vae is not None else {}),
                           **({"lpips": chain.config_json(self.lpips)} if self.lpips is not None else {})})


def run_chain(model, diffusion, shape, y, sampler, seed, config: CacheConfig | None, dtype: str = "float32"):
    """(final samples (N, C, [F,] H, W), model outputs per step (S, N, C_out, [F,] H, W), seconds, state),
    on the CPU in float32 whatever device and autocast ``dtype`` the chain ran in."""
    state, device = None, next(model.parameters()).device
    devices.sync(device)
    start = time.perf_counter()
    with torch.inference_mode(), devices.autocast(str(device), dtype):
        if config is None:
            steps = list(diffusion.sample_steps(model, shape, y, sampler, seed=seed))
        else:
            with apply_cache(model, config) as state:
                steps = list(diffusion.sample_steps(model, shape, y, sampler, seed=seed))
    devices.sync(device)
    seconds = time.perf_counter() - start
    outs = torch.stack([s.model_output for s in steps]).float().cpu()
    return steps[-1].x_next.float().cpu(), outs, seconds, state


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
    """The sweep's arrays, filled cell by cell; a cell is done when ``done`` is set."""

    def __init__(self, models: dict, cfg: SweepConfig, shard: tuple[int, int] = (0, 1)):
        self.cfg, self.shard = cfg, shard
        self.coords = {"model": list(models), "method": list(cfg.methods), "setting": list(range(cfg.num_settings)),
                       "seed": list(cfg.seeds)}
        size = [len(self.coords[d]) for d in DIMS]
        self.data = {v: np.full(size, np.nan) for v in (*SCORES, *pixels.extra(cfg.vae, cfg.lpips))}
        self.cos = np.full(size + [cfg.sampler.num_steps], np.nan)
        self.ref = {v: np.full((len(models), len(cfg.seeds)), np.nan) for v in ("accuracy", "frechet", "seconds")}
        self.masks = np.full(size, "", dtype=object)
        self.done = np.ones(size, dtype=bool)                          # settings a method lacks: empty on purpose
        for mi, ai, ki, si in cells(models, cfg):
            self.done[mi, ai, ki, si] = False
        self.calibrations: dict[str, str] = {}
        fam = {label: family_of(m) for label, m in models.items()}
        self.process = {"model_family": json.dumps({k: f.name for k, f in fam.items()}),
                        "diffusion_process": json.dumps({k: f"{f.schedule} betas, {f.prediction} prediction"
                                                         for k, f in fam.items()})}

    def dataset(self, diffusion: Diffusion) -> xr.Dataset:
        cfg, sampler = self.cfg, self.cfg.sampler
        ds = xr.Dataset({v: (DIMS, self.data[v], {"long_name": ln, "units": u}) for v, (ln, u) in SCORES.items()},
                        coords={**self.coords, "step": np.arange(1, sampler.num_steps + 1),
                                "timestep": ("step", diffusion.chain)})
        ds["step_cosine"] = (DIMS + ("step",), self.cos, {"long_name": "cosine similarity of model outputs to the "
                                                          "uncached run, mean over samples", "units": "1"})
        ds["realized_over_theoretical"] = (ds.realized_speedup / ds.theoretical_speedup).assign_attrs(
            long_name="realized speedup / theoretical speedup", units="1")
        ds["mask"] = (DIMS, self.masks.astype(str), {"long_name": "calls actually run (F full, c cached, "
                                                                  "m rows decided differently)"})
        ds["done"] = (DIMS, self.done, {"long_name": "cell finished (or left empty on purpose)"})
        for v, arr in self.ref.items():
            ds[f"reference_{v}"] = (("model", "seed"), arr, {"long_name": f"uncached run: {SCORES[v][0]}",
                                                             "units": SCORES[v][1]})
        self._describe(ds)
        ds.attrs.update(sampler=sampler.sampler, num_sampling_steps=sampler.num_steps, cfg_scale=sampler.cfg_scale,
                        clip_denoised=int(sampler.clip_denoised), classes=list(cfg.classes), per_class=cfg.per_class,
                        seeds=list(cfg.seeds), stop_inclusive=int(cfg.stop_inclusive), data_range=2.0,
                        torch_threads=torch.get_num_threads(), grid=cfg.grid_json(), dtype=cfg.dtype,
                        skipped_metrics="; ".join(f"{k}: {v}" for k, v in cfg.skipped_metrics.items()),
                        **self.process, **{f"calibration_{k}": v for k, v in self.calibrations.items()},
                        **{f"version_{k}": str(v) for k, v in versions().items()})
        ds.attrs.update(chain.sampler_attrs(sampler))               # the chain's spacing and guided channels too
        pixels.describe(ds, self.data, DIMS, cfg.vae, cfg.lpips)
        if self.shard[1] > 1:
            ds.attrs["shard"] = f"{self.shard[0]}/{self.shard[1]}"   # which cells this file may hold
        return ds

    def _describe(self, ds: xr.Dataset):
        """Per (method, setting): the config's name and its settings, for selection and labels."""
        shape = (len(self.coords["method"]), len(self.coords["setting"]))
        names, window = np.full(shape, "", dtype=object), np.full(shape, "", dtype=object)
        nums = {v: np.full(shape, np.nan) for v in ("interval", "k", "threshold", "fn", "bn")}
        for i, spec in enumerate(self.cfg.methods):
            for j, c in enumerate(self.cfg.settings(spec)):
                uses = c.kind.uses
                names[i, j] = c.name
                window[i, j] = c.rule.window if "window" in uses else ""
                for v in nums:
                    value = getattr(c, v) if v in ("interval", "k") else c.get(v)
                    if (v in uses or (v == "interval" and "window" in uses)) and value is not None:
                        nums[v][i, j] = value
        ds["config"] = (("method", "setting"), names.astype(str), {"long_name": "the run's name (all settings)"})
        ds["window"] = (("method", "setting"), window.astype(str), {"long_name": "caching window (static methods)"})
        for v, arr in nums.items():
            ds[f"setting_{v}"] = (("method", "setting"), arr, {"long_name": f"{v} of the setting (NaN: not used)"})

    def load(self, path: Path):
        """Take the finished cells of a partial file written by the same grid."""
        with xr.open_dataset(path, engine="h5netcdf") as old:
            old = old.load()
        if old.attrs.get("grid") != self.cfg.grid_json() or list(old.model.values) != self.coords["model"]:
            raise ValueError(f"--resume: {str(path)!r} was written by another sweep (models, sampler, samples, "
                             "seeds or settings differ); remove it or run without --resume")
        if ranks.shard_attr(old.attrs.get("shard"), str(path)) != self.shard:
            raise ValueError(f"--resume: {str(path)!r} is shard {old.attrs.get('shard', '0/1')}, not "
                             f"{self.shard[0]}/{self.shard[1]}; resume each shard with its own --shard")
        for v in self.data:
            self.data[v][...] = old[v].values
        self.cos[...], self.masks[...], self.done[...] = old.step_cosine.values, old["mask"].values, old.done.values
        for v in self.ref:
            self.ref[v][...] = old[f"reference_{v}"].values
        self.calibrations = {k[len("calibration_"):]: v for k, v in old.attrs.items() if k.startswith("calibration_")}


def cells(models: dict, cfg: SweepConfig) -> list[tuple[int, int, int, int]]:
    """Every (model, method, setting, seed) index of a setting that exists, in run order: model, then
    seed, then method and setting, so the cells of one reference chain are neighbours."""
    return [(mi, ai, ki, si) for mi in range(len(models)) for si in range(len(cfg.seeds))
            for ai, spec in enumerate(cfg.methods) for ki in range(len(cfg.settings(spec)))]


def sweep(models: dict, cfg: SweepConfig = SweepConfig(), log=print, partial: Path | None = None,
          resume: bool = False, shard: tuple[int, int] = (0, 1)) -> xr.Dataset:
    """Run the grid on ``models`` ({label: model}); returns the labelled Dataset. Unconditional
    models (no class table, e.g. the video pair) draw ``len(classes) * per_class`` unlabelled samples;
    text-to-video models draw ``per_class`` videos for each caption. ``partial``: a file rewritten
    after every cell; ``resume``: skip the cells that file already holds. ``shard`` (i, n): run only
    block i of n of ``cells`` (each shard runs the reference chains its cells need); ``shards.merge``
    joins the n results into the one-process result, bit for bit but for wall times."""
    diffusion = Diffusion.for_config(cfg.sampler)
    res = _Results(models, cfg, shard)
    every = cells(models, cfg)
    if resume and partial is not None and Path(partial).exists():
        res.load(Path(partial))
        log(f"resumed {sum(bool(res.done[at]) for at in every)} of {len(every)} cells from {partial}")
    owned = [every[c] for c in ranks.block(len(every), shard)]
    if shard[1] > 1:
        log(f"shard {shard[0]}/{shard[1]}: {len(owned)} of {len(every)} cells"
            + ("; nothing to do, more shards than cells" if not owned else ""))
    clf = classifier.load() if any(is_pixel_digits(m) for m in models.values()) else None
    for metric, why in cfg.skipped_metrics.items():
        log(f"skipping {metric}: {why}")
    for mi, (label, model) in enumerate(models.items()):
        if all(res.done[at] for at in owned if at[0] == mi):
            continue
        y, tokens = _condition(label, model, cfg)
        shape = (len(cfg.classes) * cfg.per_class if y is None else len(y), *model.sample_shape())
        with torch.inference_mode(), devices.autocast(str(next(model.parameters()).device), cfg.dtype):
            # warm-up: 3 real steps, untimed (and the compile of --compile)
            for i, _ in enumerate(diffusion.sample_steps(model, shape, y, cfg.sampler, seed=cfg.seeds[0])):
                if i == 2:
                    break
        scorer = clf if is_pixel_digits(model) else None
        for si, seed in enumerate(cfg.seeds):
            todo = [at for at in owned if at[0] == mi and at[3] == si and not res.done[at]]
            if not todo:
                continue
            ref = run_chain(model, diffusion, shape, y, cfg.sampler, seed, None, cfg.dtype)
            res.ref["seconds"][mi, si] = ref[2]
            if scorer is not None:
                res.ref["accuracy"][mi, si] = metrics.classifier_accuracy(ref[0], y, scorer).item()
                if "frechet" not in cfg.skipped_metrics:
                    res.ref["frechet"][mi, si] = metrics.frechet_distance(ref[0], classifier=scorer).item()
            log(f"{label} seed {seed}: uncached {cfg.sampler.num_steps} steps in {ref[2]:.1f}s")
            cal = _calibration(res, label, model, diffusion, shape, y, cfg, seed, log)
            for at in todo:
                cache = cfg.settings(cfg.methods[at[1]])[at[2]]
                if cache.kind.calibration:
                    cache = dataclasses.replace(cache, calibration=cal)
                _cell(res, at, label, model, diffusion, shape, y, cfg, seed, cache, ref, scorer, tokens, log)
                res.done[at] = True
                _save_partial(res, diffusion, partial)
    return res.dataset(diffusion)


def _calibration(res, label, model, diffusion, shape, y, cfg: SweepConfig, seed: int, log):
    """One calibration run per (model, sampler, seed) when a method needs it; recorded in the attrs."""
    if not any(method_class(parse_spec(m)[0]).calibration for m in cfg.methods):
        return None
    cal = cfg.calibration
    if cal is None:
        cal = calibrate(model, diffusion, shape, y, cfg.sampler, seed=seed, label=label)
        log(f"  {label}: calibrated on one uncached run (seed {seed})")
    res.calibrations[f"{label}_seed{seed}"] = cal.to_json()
    return cal


def _cell(res, at, label, model, diffusion, shape, y, cfg, seed, cache, ref, scorer, tokens, log):
    try:
        cache.check(model)
    except ValueError as e:
        log(f"  {label} {cache.name}: skipped ({e})")
        return
    run = run_chain(model, diffusion, shape, y, cfg.sampler, seed, cache, cfg.dtype)
    _score(res, at, run, ref, y, scorer, flops.run_cost(model, run[3], caption_tokens=tokens),
           frechet="frechet" not in cfg.skipped_metrics)
    log(f"  {label} {cache.name}: {run[3].num_full:g} full / {run[3].num_cached:g} cached, speedup "
        f"{res.data['theoretical_speedup'][at]:.2f}x theoretical, "
        f"{res.data['realized_speedup'][at]:.2f}x realized, PSNR {res.data['psnr'][at]:.2f} dB")


def _save_partial(res: _Results, diffusion, partial: Path | None):
    if partial is None:
        return
    with atomic_path(partial) as tmp:
        res.dataset(diffusion).to_netcdf(tmp, engine="h5netcdf")


def _score(res: _Results, at, run, ref, y, scorer, cost: xr.Dataset, frechet: bool = True):
    """Fill cell ``at`` from a cached run against the reference run (both ``run_chain`` results)."""
    (x, out, sec, state), (x_ref, ref_out, ref_sec, _) = run, ref
    data = res.data
    pixels.fidelity(data, at, x, x_ref, res.cfg.vae, res.cfg.lpips)   # PSNR, SSIM, MSE (decoded with a VAE), LPIPS
    res.cos[at] = torch.nn.functional.cosine_similarity(out.flatten(2).double(), ref_out.flatten(2).double(),
                                                        dim=2).mean(1).numpy()
    if scorer is not None:
        data["accuracy"][at] = metrics.classifier_accuracy(x, y, scorer).item()
        if frechet:
            data["frechet"][at] = metrics.frechet_distance(x, classifier=scorer).item()
    data["full_steps"][at], data["cached_steps"][at] = state.num_full, state.num_cached
    data["theoretical_speedup"][at] = cost.attrs["theoretical_speedup"]
    data["realized_speedup"][at] = ref_sec / sec
    full_calls = [c.seconds for c in state.calls if c.full] or [max(c.seconds for c in state.calls)]
    data["call_speedup"][at] = len(state.calls) * float(np.median(full_calls)) / sum(c.seconds for c in state.calls)
    data["seconds"][at] = sec
    res.masks[at] = state.mask
