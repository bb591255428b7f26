"""Smoothness against caching quality: does a flatter surface at a sampler step go with a smaller
caching error at that step?

    from smoothness.analysis import correlate
    ds = correlate.compute(load_entries(["digits-dit", "digits-skip-dit"]), correlate.CorrelateConfig())

For every model, sampler step s and seed (one uncached chain per seed, batch 1, class 0: the same
chains as the surfaces), three things are measured:

* smoothness: the scores of the step-s surface (``surface.scores.smoothness_scores``; larger = rougher);
* the per-step caching error (``cosine_distance``, ``rel_l2``: the cached output at step s against
  the uncached one on the same x_s) and the window error (``psnr`` of the final sample when the
  steps around s are cached); both are defined in ``smoothness.analysis.caching_error``.

The cache is Skip-Cache on models with skip branches and deep-reuse (DeepCache-style) on models
without (``method="auto"``), k units recomputed on each side.

Spearman and Pearson coefficients are computed over the (model, step) points of each group
(``all`` pools the models; then one group per model) on seed means. Their intervals are percentile
bootstrap intervals over seeds: seeds are drawn with replacement (one draw for both variables), the
points re-averaged and the coefficient recomputed; NaN with fewer than 2 seeds.
``python -m smoothness.correlate`` is the command (``smoothness.analysis.cli``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import xarray as xr

from .. import chain
from .._moved import moved_names
from ..diffusion import SamplerConfig
from ..models import caption_attrs
from ..surface import SurfaceConfig
from ..surface.dataset import compute as compute_surface
from ..surface.perturb import Axis
from ..surface.scores import smoothness_scores
from .caching_error import ERRORS, CachingErrorConfig, caching_errors, check_method
from .stats import bootstrap_ci, pearson, spearman

__all__ = ["CachingErrorConfig", "CorrelateConfig", "ERRORS", "SCORES", "bootstrap_ci", "caching_errors", "compute",
           "correlations", "pearson", "spearman", "table"]

SCORES = ("mean_deviation", "at_radius", "total_variation", "laplacian_energy", "curvature")


def _default_surface() -> SurfaceConfig:
    grid = Axis(-0.25, 0.25, 7)
    return SurfaceConfig(steps=(10, 70, 130, 190, 250), alpha=grid, beta=grid, seeds=(0, 1, 2))


@dataclass(frozen=True)
class CorrelateConfig:
    # steps, seeds, sampler, class label, captions, grid and perturbation: all from the surfaces' config.
    # Default: DDPM-250 steps 10, 70, 130, 190, 250 (the paper's 10 and 250, every 60 between), seeds
    # 0, 1, 2, a coarse 7x7 grid over +-0.25: about 75 s of one CPU core per bundled model.
    surface: SurfaceConfig = field(default_factory=_default_surface)
    method: str = "auto"           # auto: skip-cache with skip branches, deep-reuse without; or one of METHODS
    k: int = 2                     # units recomputed on each side (12-unit bundled models: 2)
    lag: int = 1                   # per-step error: the cache was filled at step s - lag
    window: int = 2                # window error: steps s-window..s+window are cached
    readout: str = "output"        # the surface readout whose scores are correlated
    data_range: float = 2.0        # PSNR peak-to-peak range of the samples ([-1, 1] pixels)
    vae: object = None             # a models.Vae: the window PSNR on decoded pixels (latent_psnr beside); None: as sampled
    n_resamples: int = 2000        # bootstrap resamples
    confidence: float = 0.95       # bootstrap interval coverage
    bootstrap_seed: int = 0        # seed of the bootstrap draws

    def __post_init__(self):
        check_method(self.method)
        if not (isinstance(self.n_resamples, int) and self.n_resamples >= 1):
            raise ValueError(f"n_resamples={self.n_resamples!r} is not allowed; use an integer >= 1")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence={self.confidence!r} is not allowed; use a number in (0, 1)")
        if self.readout not in self.surface.readouts:
            raise ValueError(f"readout {self.readout!r} is not among the surface readouts; "
                             f"allowed: {', '.join(self.surface.readouts)}")
        self.caching_error                            # validates k, lag, window, data_range, steps and seeds

    @property
    def caching_error(self) -> CachingErrorConfig:
        """The caching-error measurement on the surfaces' chains."""
        s = self.surface
        return CachingErrorConfig(steps=tuple(sorted(s.steps)), sampler=s.sampler, seeds=tuple(s.seeds),
                                  class_label=s.class_label, caption_embeds=s.caption_embeds, method=self.method,
                                  k=self.k, lag=self.lag, window=self.window, data_range=self.data_range,
                                  vae=self.vae)

    @property
    def steps(self) -> list[int]:
        return sorted(self.surface.steps)

    @property
    def sampler(self) -> SamplerConfig:
        return self.surface.sampler

    def method_for(self, model) -> str:
        return self.caching_error.method_for(model)

    def window_of(self, step: int) -> tuple[int, int]:
        return self.caching_error.window_of(step)

    def to_json(self) -> str:
        """Every setting as JSON; the surface's device is left out (ranks on different GPUs do one run)."""
        d = json.loads(chain.config_json(self))
        d["surface"].pop("device")
        return json.dumps(d, sort_keys=True)


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
    entries = chain.as_entries(entries)
    if surfaces is None:
        surfaces = compute_surface(entries, cfg.surface, progress=progress, log=log)
    _check_surfaces(surfaces, entries, cfg)
    labels, seeds = [e.label for e in entries], list(cfg.surface.seeds)
    sub = surfaces.sel(model=labels, step=cfg.steps, seed=seeds, readout=[cfg.readout])
    sc = smoothness_scores(sub).sel(readout=cfg.readout)
    smooth = sc[list(SCORES)].to_dataarray("score").transpose("model", "step", "seed", "score")
    smooth = smooth.drop_vars([c for c in smooth.coords if c not in ("model", "step", "seed", "score", "timestep")])
    if errors is None:
        errors = caching_errors(entries, cfg.caching_error, log=log)
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
                    grid_alpha=str(cfg.surface.alpha), grid_beta=str(cfg.surface.beta),
                    direction_seed=cfg.surface.perturbation.directions.seed,
                    **chain.sampler_attrs(cfg.sampler), **chain.provenance(entries), **corr.attrs,
                    **caption_attrs(cfg.surface.caption_embeds))
    if cfg.vae is not None:
        ds.attrs.update(data_range=1.0, latent_data_range=cfg.data_range, **cfg.vae.attrs())
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
    chain_name = cfg.sampler.label
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


__getattr__ = moved_names(__name__, {"scatter": "smoothness.plots.analysis:correlation_scatter"})
