"""Smoothness against caching quality: does a flatter surface at a sampler step go with a smaller
caching error at that step?

    python -m smoothness.correlate                         # bundled DiT and Skip-DiT -> results/ (~2.5 CPU-min)
    python -m smoothness.correlate --seeds 0,1,2,3,4 --grid=-0.25:0.25:11 --window 4

For every model, sampler step s and seed (one uncached chain per seed, batch 1, class 0: the same
chains as the surfaces), three things are measured:

* smoothness: the scores of the step-s surface (``scores.smoothness_scores``; larger = rougher);
* the per-step caching error (``cosine_distance``, ``rel_l2``: the cached output at step s against
  the uncached one on the same x_s) and the window error (``psnr`` of the final sample when the
  steps around s are cached); both are defined in ``smoothness.caching_error``.

The cache is Skip-Cache on models with skip branches and deep-reuse (DeepCache-style) on models
without (``method="auto"``), k units recomputed on each side.

Spearman and Pearson coefficients are computed over the (model, step) points of each group
(``all`` pools the models; then one group per model) on seed means. Their intervals are percentile
bootstrap intervals over seeds: seeds are drawn with replacement (one draw for both variables), the
points re-averaged and the coefficient recomputed; NaN with fewer than 2 seeds.

The CLI computes each model in its own process (``--jobs``, default 2: the bundled pair on two
cores), writes ``<name>.nc`` (this Dataset), ``<name>_surface.nc`` (the surfaces) and
``<name>.png`` (the scatter plot), and prints the table.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
import xarray as xr

from . import chain
from .cache import METHODS, CacheConfig
from .caching_error import ERRORS, caching_errors
from .diffusion import SamplerConfig
from .stats import bootstrap_ci, pearson, spearman
from .surface import SurfaceConfig

__all__ = ["CorrelateConfig", "ERRORS", "SCORES", "bootstrap_ci", "caching_errors", "compute", "correlations",
           "pearson", "scatter", "spearman", "table"]

SCORES = ("mean_deviation", "at_radius", "total_variation", "laplacian_energy", "curvature")
def _default_surface() -> SurfaceConfig:
    return SurfaceConfig(steps=(10, 70, 130, 190, 250), alpha="-0.25:0.25:7", beta="-0.25:0.25:7",
                         seeds=(0, 1, 2))


@dataclass(frozen=True)
class CorrelateConfig:
    # steps, seeds, sampler, class label, grid and perturbation: all from the surfaces' config.
    # Default: DDPM-250 steps 10, 70, 130, 190, 250 (the paper's 10 and 250, every 60 between), seeds
    # 0, 1, 2, a coarse 7x7 grid over +-0.25: about 75 s of one CPU core per bundled model.
    surface: SurfaceConfig = field(default_factory=_default_surface)
    method: str = "auto"           # auto: skip-cache with skip branches, deep-reuse without; or one of METHODS
    k: int = 2                     # units recomputed on each side (12-unit bundled models: 2)
    lag: int = 1                   # per-step error: the cache was filled at step s - lag
    window: int = 2                # window error: steps s-window..s+window are cached
    readout: str = "output"        # the surface readout whose scores are correlated
    data_range: float = 2.0        # PSNR peak-to-peak range of the samples ([-1, 1] pixels)
    n_resamples: int = 2000        # bootstrap resamples
    confidence: float = 0.95       # bootstrap interval coverage
    bootstrap_seed: int = 0        # seed of the bootstrap draws

    def __post_init__(self):
        allowed = ("auto",) + tuple(m for m in METHODS if m != "none")
        if self.method not in allowed:
            raise ValueError(f"unknown method {self.method!r}; allowed: {', '.join(allowed)}")
        for name, low in (("k", 1), ("lag", 1), ("window", 0), ("n_resamples", 1)):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= low):
                raise ValueError(f"{name}={v!r} is not allowed; use an integer >= {low}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence={self.confidence!r} is not allowed; use a number in (0, 1)")
        if not self.data_range > 0:
            raise ValueError(f"data_range={self.data_range!r} is not allowed; use a positive number")
        if self.readout not in self.surface.readouts:
            raise ValueError(f"readout {self.readout!r} is not among the surface readouts; "
                             f"allowed: {', '.join(self.surface.readouts)}")
        low = [s for s in self.surface.steps if s <= self.lag]
        if low:
            raise ValueError(f"step {low[0]} has no step {low[0] - self.lag} to fill the cache from (lag={self.lag}); "
                             f"allowed: steps {self.lag + 1}..{self.surface.sampler.num_steps}")
        chain.check_seeds(self.surface.seeds)

    @property
    def steps(self) -> list[int]:
        return sorted(self.surface.steps)

    @property
    def sampler(self) -> SamplerConfig:
        return self.surface.sampler

    def method_for(self, model) -> str:
        if self.method != "auto":
            return self.method
        return "skip-cache" if getattr(model, "skip_into", None) else "deep-reuse"

    def window_of(self, step: int) -> tuple[int, int]:
        """Cached steps (first, last) around ``step``; step 1 is always full."""
        return max(2, step - self.window), min(self.sampler.num_steps, step + self.window)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


# ------------------------------------------------------------------ correlation
def correlations(smooth: xr.DataArray, error: xr.DataArray, n_resamples: int = 2000, confidence: float = 0.95,
                 seed: int = 0) -> xr.Dataset:
    """Spearman and Pearson coefficients with bootstrap intervals over seeds, per group, score and
    error. ``smooth`` (model, step, seed, score) and ``error`` (model, step, seed, error)."""
    groups = ["all"] + [str(m) for m in smooth.model.values]
    if "all" in groups[1:]:
        raise ValueError("a model may not be labelled 'all' (the pooled group's name)")
    scores, errors = list(smooth.score.values), list(error.error.values)
    shape = (len(groups), len(scores), len(errors))
    res = {k: np.full(shape, np.nan) for k in ("spearman", "spearman_low", "spearman_high", "pearson",
                                               "pearson_low", "pearson_high", "n_points")}
    enough = smooth.sizes["seed"] >= 2
    for gi, g in enumerate(groups):
        sel = {} if g == "all" else {"model": [g]}
        for si, sc in enumerate(scores):
            x = smooth.sel(sel).sel(score=sc).transpose("model", "step", "seed").values
            for ei, er in enumerate(errors):
                y = error.sel(sel).sel(error=er).transpose("model", "step", "seed").values
                x2, y2 = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])   # (points, seeds)
                keep = np.isfinite(x2).all(1) & np.isfinite(y2).all(1)
                x2, y2 = x2[keep], y2[keep]
                res["n_points"][gi, si, ei] = len(x2)
                for name, fn in (("spearman", spearman), ("pearson", pearson)):
                    res[name][gi, si, ei] = fn(x2.mean(1), y2.mean(1))
                    if enough:
                        stat = lambda a, b, fn=fn: fn(a.mean(-1), b.mean(-1))
                        lo, hi = bootstrap_ci(stat, x2, y2, n_resamples=n_resamples, confidence=confidence, seed=seed)
                        res[f"{name}_low"][gi, si, ei], res[f"{name}_high"][gi, si, ei] = lo, hi
    dims = ("group", "score", "error")
    coords = {"group": groups, "score": scores, "error": errors}
    pct = f"{100 * confidence:g} %"
    long = {"spearman": "Spearman rank correlation of seed means", "pearson": "Pearson correlation of seed means",
            "n_points": "(model, step) points used"}
    ds = xr.Dataset(coords=coords)
    for k, v in res.items():
        base = k.split("_")[0] if k != "n_points" else k
        ln = long[base] + ("" if k == base else f", {'lower' if k.endswith('low') else 'upper'} end of the "
                                                 f"{pct} bootstrap interval over seeds")
        ds[k] = (dims, v, {"long_name": ln, "units": "1"})
    ds.attrs.update(n_resamples=n_resamples, confidence=confidence, bootstrap_seed=seed,
                    bootstrap="percentile, seeds resampled with replacement (paired), points re-averaged")
    return ds


def compute(entries, cfg: CorrelateConfig = CorrelateConfig(), *, surfaces: xr.Dataset | None = None,
            errors: xr.DataArray | None = None, progress: bool = False, log=print) -> xr.Dataset:
    """Surfaces, smoothness scores, caching errors and their correlations in one Dataset.
    ``entries``: ``surface.ModelEntry`` list (or {label: model}). ``surfaces`` (from
    ``surface.compute``) and ``errors`` (from ``caching_errors``) are computed unless given; given,
    they must hold these models, ``cfg.steps`` and seeds on the same chain."""
    from . import surface as surface_mod
    from .scores import smoothness_scores
    entries = chain.as_entries(entries)
    if surfaces is None:
        entries = [e if isinstance(e, surface_mod.ModelEntry) else surface_mod.ModelEntry(e.label, e.model)
                   for e in entries]
        surfaces = surface_mod.compute(entries, cfg.surface, progress=progress, log=log)
    _check_surfaces(surfaces, entries, cfg)
    labels, seeds = [e.label for e in entries], list(cfg.surface.seeds)
    sub = surfaces.sel(model=labels, step=cfg.steps, seed=seeds, readout=[cfg.readout])
    sc = smoothness_scores(sub).sel(readout=cfg.readout)
    smooth = sc[list(SCORES)].to_dataarray("score").transpose("model", "step", "seed", "score")
    smooth = smooth.drop_vars([c for c in smooth.coords if c not in ("model", "step", "seed", "score", "timestep")])
    if errors is None:
        errors = caching_errors(entries, cfg, log=log)
    _check_errors(errors, labels, cfg)
    errors = errors.sel(model=labels, step=cfg.steps, seed=seeds)
    corr = correlations(smooth, errors, cfg.n_resamples, cfg.confidence, cfg.bootstrap_seed)
    ds = xr.Dataset({"smoothness": smooth.assign_attrs(
        long_name=f"smoothness score of the {cfg.readout} surface (larger = rougher)", units="1",
        radius=sc.attrs.get("radius", np.nan)), "caching_error": errors})
    ds = ds.merge(corr)
    ds.attrs.update(title="smoothness against caching quality", config=cfg.to_json(), method=cfg.method, k=cfg.k,
                    lag=cfg.lag, window=cfg.window, readout=cfg.readout, data_range=cfg.data_range,
                    seeds=json.dumps(seeds), class_label=cfg.surface.class_label,
                    surface_metric=surfaces.attrs.get("metric", ""), surface_mode=surfaces.attrs.get("mode", ""),
                    grid_alpha=cfg.surface.alpha, grid_beta=cfg.surface.beta,
                    direction_seed=cfg.surface.perturbation.directions.seed,
                    **chain.sampler_attrs(cfg.sampler), **chain.provenance(entries), **corr.attrs,
                    **chain.caption_attrs(cfg.surface.caption_embeds))
    return ds


def _check_errors(err: xr.DataArray, labels, cfg: CorrelateConfig):
    for dim, want in (("model", labels), ("step", cfg.steps), ("seed", list(cfg.surface.seeds)),
                      ("error", list(ERRORS))):
        missing = [v for v in want if v not in list(err[dim].values)]
        if missing:
            raise ValueError(f"the caching errors lack {dim} {missing}; allowed: {list(err[dim].values)}")
    if (err.attrs.get("lag", cfg.lag), err.attrs.get("window", cfg.window)) != (cfg.lag, cfg.window):
        raise ValueError(f"the caching errors were made with lag={err.attrs.get('lag')}, window="
                         f"{err.attrs.get('window')}, not this config's lag={cfg.lag}, window={cfg.window}")


def _check_surfaces(ds: xr.Dataset, entries, cfg: CorrelateConfig):
    for dim, want in (("model", [e.label for e in entries]), ("step", cfg.steps), ("seed", list(cfg.surface.seeds)),
                      ("readout", [cfg.readout])):
        missing = [v for v in want if v not in list(ds[dim].values)]
        if missing:
            raise ValueError(f"the surfaces lack {dim} {missing}; allowed: {list(ds[dim].values)}")
    chain_name = f"{cfg.sampler.sampler.upper()}-{cfg.sampler.num_steps}"
    if ds.attrs.get("chain", chain_name) != chain_name or float(ds.attrs.get("cfg_scale", cfg.sampler.cfg_scale)) \
            != cfg.sampler.cfg_scale:
        raise ValueError(f"the surfaces were made on {ds.attrs.get('chain')} (cfg {ds.attrs.get('cfg_scale')}), "
                         f"not on this config's {chain_name} (cfg {cfg.sampler.cfg_scale})")


# ------------------------------------------------------------------ reporting
def table(ds: xr.Dataset) -> str:
    """The points (seed means) and the coefficients with their bootstrap intervals."""
    mean = ds.mean("seed")
    head = f"{'model':<18}{'step':>5}{'t':>5}" + "".join(f"{s[:14]:>16}" for s in ds.score.values) + \
        "".join(f"{e:>17}" for e in ds.error.values)
    lines = [head, "-" * len(head)]
    for m in ds.model.values:
        for s in ds.step.values:
            r = mean.sel(model=m, step=s)
            lines.append(f"{str(m):<18}{int(s):>5}{int(r.timestep):>5}"
                         + "".join(f"{float(r.smoothness.sel(score=c)):>16.4g}" for c in ds.score.values)
                         + "".join(f"{float(r.caching_error.sel(error=e)):>17.4g}" for e in ds.error.values))
    pct = f"{100 * ds.attrs.get('confidence', 0.95):g} %"
    lines += ["", f"{'group':<18}{'score':<18}{'error':<17}{'n':>3}   spearman rho [{pct}]      pearson r [{pct}]"]
    for g in ds.group.values:
        for sc in ds.score.values:
            for er in ds.error.values:
                r = ds.sel(group=g, score=sc, error=er)
                lines.append(f"{str(g):<18}{str(sc):<18}{str(er):<17}{int(r.n_points):>3}   "
                             f"{float(r.spearman):+.2f} [{float(r.spearman_low):+.2f}, {float(r.spearman_high):+.2f}]"
                             f"      {float(r.pearson):+.2f} [{float(r.pearson_low):+.2f}, "
                             f"{float(r.pearson_high):+.2f}]")
    return "\n".join(lines)


def scatter(ds: xr.Dataset, score: str = "mean_deviation", error: str = "rel_l2", ax=None):
    """Matplotlib figure: caching error (y) against smoothness score (x), seed means with the seed
    range as bars; models coloured, points labelled with their step."""
    from .plots_analysis import correlation_scatter
    return correlation_scatter(ds, score, error, ax=ax)


# ------------------------------------------------------------------ CLI
def _parser():
    import argparse
    from pathlib import Path

    from .cli import add_model_args
    d = CorrelateConfig()
    s = d.surface
    p = argparse.ArgumentParser(prog="python -m smoothness.correlate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    add_model_args(p)
    a("--steps", default=",".join(map(str, s.steps)), help=f"sampler steps, 1-based (default: {','.join(map(str, s.steps))})")
    a("--num-steps", type=int, default=s.sampler.num_steps, help=f"chain length (default: {s.sampler.num_steps})")
    a("--sampler", default=s.sampler.sampler, help=f"ddpm or ddim (default: {s.sampler.sampler})")
    a("--cfg-scale", type=float, default=s.sampler.cfg_scale, help=f"guidance >= 1 (default: {s.sampler.cfg_scale})")
    a("--seeds", default=",".join(map(str, s.seeds)), help=f"chain seeds (default: {','.join(map(str, s.seeds))})")
    a("--class-label", type=int, default=s.class_label, help=f"(default: {s.class_label})")
    a("--caption-embeds", default=s.caption_embeds, metavar="FILE",
      help="text-to-video checkpoints: one caption's embeddings (L, C) or (1, L, C), .pt or .safetensors, "
           "conditioning every chain (default: none)")
    a("--grid", default=s.alpha, help=f"min:max:count of alpha and beta (default: {s.alpha})")
    a("--direction-seed", type=int, default=s.perturbation.directions.seed,
      help=f"seed of the surface directions (default: {s.perturbation.directions.seed})")
    a("--method", default=d.method, help=f"auto, skip-cache, deep-reuse, delta or fora (default: {d.method}: "
      "skip-cache on models with skip branches, deep-reuse on the others)")
    a("--k", type=int, default=d.k, help=f"units recomputed on each side (default: {d.k})")
    a("--lag", type=int, default=d.lag, help=f"per-step error: cache filled at step s-lag (default: {d.lag})")
    a("--window", type=int, default=d.window, help=f"window error: steps s-W..s+W cached (default: {d.window})")
    a("--resamples", type=int, default=d.n_resamples, help=f"bootstrap resamples (default: {d.n_resamples})")
    a("--confidence", type=float, default=d.confidence, help=f"bootstrap coverage (default: {d.confidence})")
    a("--bootstrap-seed", type=int, default=d.bootstrap_seed, help=f"(default: {d.bootstrap_seed})")
    a("--score", default="mean_deviation", help=f"smoothness score on the plot's x axis: {', '.join(SCORES)} "
      "(default: mean_deviation)")
    a("--error", default="rel_l2", help=f"caching error on the plot's y axis: {', '.join(ERRORS)} (default: rel_l2)")
    a("--jobs", type=int, default=2, help="models computed side by side, one process each (default: 2, the "
      "bundled pair on two cores)")
    a("--threads", type=int, default=1, help="torch CPU threads per process (default: 1: the models are small)")
    a("--out", type=Path, default=Path("results"), help="output folder (default: results/)")
    a("--name", default="correlate", help="file stem inside --out (default: correlate)")
    return p


def config_from_args(args) -> CorrelateConfig:
    from .cli import parse_int_list
    from .perturb import DirectionSpec
    d = CorrelateConfig()
    if args.score not in SCORES:
        raise ValueError(f"unknown --score {args.score!r}; allowed: {', '.join(SCORES)}")
    if args.error not in ERRORS:
        raise ValueError(f"unknown --error {args.error!r}; allowed: {', '.join(ERRORS)}")
    if args.threads < 1:
        raise ValueError(f"--threads={args.threads} is not allowed; use a positive integer")
    sampler = SamplerConfig(num_steps=args.num_steps, sampler=args.sampler, cfg_scale=args.cfg_scale,
                            clip_denoised=d.surface.sampler.clip_denoised)
    pert = replace(d.surface.perturbation, directions=DirectionSpec(seed=args.direction_seed))
    surf = SurfaceConfig(steps=tuple(sorted(set(parse_int_list(args.steps, "--steps")))), sampler=sampler,
                         alpha=args.grid, beta=args.grid, perturbation=pert,
                         seeds=tuple(parse_int_list(args.seeds, "--seeds")), class_label=args.class_label,
                         caption_embeds=args.caption_embeds)
    return CorrelateConfig(surface=surf, method=args.method, k=args.k, lag=args.lag, window=args.window,
                           n_resamples=args.resamples, confidence=args.confidence, bootstrap_seed=args.bootstrap_seed)


def _one_model(name: str, num_heads, cfg: CorrelateConfig, threads: int):
    """Surfaces and caching errors of one model (a worker of ``main``; loads the model itself)."""
    from . import surface as surface_mod
    torch.set_num_threads(threads)
    entries = surface_mod.load_entries([name], num_heads)
    return surface_mod.compute(entries, cfg.surface, progress=False), caching_errors(entries, cfg, log=print)


def main(argv=None):
    import multiprocessing
    import time
    from concurrent.futures import ProcessPoolExecutor

    from . import io
    from .io_utils import atomic_path, check_writable
    from .models import bundled
    from .surface import load_entries
    args = _parser().parse_args(argv)
    cfg = config_from_args(args)
    if args.jobs < 1:
        raise ValueError(f"--jobs={args.jobs} is not allowed; use a positive integer")
    out = check_writable(args.out)
    torch.set_num_threads(args.threads)
    names = (args.model or []) + (args.ckpt or []) or list(bundled.DEFAULT_PAIR)
    entries = load_entries(names, args.num_heads)
    captions = chain.load_captions(cfg.surface.caption_embeds)
    for e in entries:                                                  # validate before any work
        CacheConfig(method=cfg.method_for(e.model), k=cfg.k).check(e.model)
        chain.labels(e.model, cfg.surface.class_label, who=e.label, captions=captions)
    t0 = time.time()
    work = (names, [args.num_heads] * len(names), [cfg] * len(names), [args.threads] * len(names))
    if min(args.jobs, len(names)) > 1:                                 # one process per model
        with ProcessPoolExecutor(min(args.jobs, len(names)), mp_context=multiprocessing.get_context("spawn")) as pool:
            parts = list(pool.map(_one_model, *work))
    else:
        parts = [_one_model(*w) for w in zip(*work)]
    surfaces = xr.concat([p[0] for p in parts], dim="model", combine_attrs="override")
    surfaces.attrs.update(io.surface_attrs(entries, cfg.surface))
    errors = xr.concat([p[1] for p in parts], dim="model", combine_attrs="override")
    surf_path, nc, png = out / f"{args.name}_surface.nc", out / f"{args.name}.nc", out / f"{args.name}.png"
    io.save(surfaces, surf_path)
    ds = compute(entries, cfg, surfaces=surfaces, errors=errors)
    ds.attrs.update(seconds=time.time() - t0, jobs=args.jobs, torch_threads=args.threads)
    with atomic_path(nc) as tmp:
        ds.to_netcdf(tmp, engine="h5netcdf")
    fig = scatter(ds, args.score, args.error)
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    print(table(ds))
    print(f"done in {time.time() - t0:.0f}s: {nc}, {surf_path}, {png}")


if __name__ == "__main__":
    import sys

    from .cli import run_cli
    sys.exit(run_cli(main))
