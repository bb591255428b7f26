"""The planner against the references, on the same budgets, on evaluation seeds it never saw.

For each model of a pair: the profile and the oracle's measured edges come from the calibration
chain (``profile.seeds``, one class); then at every budget each schedule samples
``len(classes) * per_class`` samples per evaluation seed and is compared with the uncached run from
the same seed: PSNR, SSIM, digits-classifier accuracy (image models), theoretical speedup (MACs) and
realized speedup (wall time), plus what choosing the schedule cost (forward passes).

Rows (``planner`` dim): ``planner`` (calibration fitted on this model), ``planner-other`` (fitted on
the other model of the pair, applied without refitting), then every entry of
``references.REFERENCES``. A reference with several candidates keeps the best by mean PSNR.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import xarray as xr

from .. import chain, metrics
from ..analysis.stats import bootstrap_ci
from ..cache.flops import schedule_cost
from ..cache.sweep import run_chain
from ..data import classifier
from ..diffusion import Diffusion, SamplerConfig
from ..models import ModelEntry
from ..models.bundled import is_pixel_digits
from .planner import Calibration, PlanConfig, check_budget, plan
from .profile import ProfileConfig, check_profile, profile
from .references import REFERENCES, Context

SCORES = {  # variable: (long name, units)
    "psnr": ("PSNR against the uncached run, mean over samples", "dB"),
    "ssim": ("SSIM against the uncached run, mean over samples", "1"),
    "accuracy": ("digits-classifier accuracy on the requested classes (image models)", "1"),
    "theoretical_speedup": ("uncached MACs / cached MACs over the chain", "1"),
    "realized_speedup": ("uncached wall time / cached wall time", "1"),
}


@dataclass(frozen=True)
class EvaluateConfig:
    budgets: tuple[float, ...] = (1.5, 2.0, 2.5)      # theoretical speedups asked for
    seeds: tuple[int, ...] = (1, 2, 3)                # evaluation seeds (the calibration chain uses profile.seeds)
    classes: tuple[int, ...] = tuple(range(10))       # class-conditional models: labels drawn, each per_class times
    per_class: int = 1                                # samples per class per seed
    profile: ProfileConfig = field(default_factory=ProfileConfig)   # also fixes the sampler chain
    plan: PlanConfig = field(default_factory=PlanConfig)
    references: tuple[str, ...] = tuple(REFERENCES)   # rows besides the planner

    def __post_init__(self):
        chain.check_seeds(self.seeds)
        clash = set(self.seeds) & set(self.profile.seeds)
        if clash:
            raise ValueError(f"evaluation seeds {sorted(clash)} are also calibration seeds; keep them apart")
        if not self.budgets or any(not (b >= 1) for b in self.budgets):
            raise ValueError(f"budgets={self.budgets!r} are not allowed; use speedups >= 1")
        bad = [r for r in self.references if r not in REFERENCES]
        if bad:
            raise ValueError(f"unknown reference {bad[0]!r}; allowed: {', '.join(REFERENCES)}")
        if not (isinstance(self.per_class, int) and self.per_class >= 1):
            raise ValueError(f"per_class={self.per_class!r} is not allowed; use a positive integer")

    @property
    def sampler(self) -> SamplerConfig:
        return self.profile.sampler

    @property
    def rows(self) -> list[str]:
        return ["planner", "planner-other", *self.references]


class _Runs:
    """Uncached references per seed and scores of cached runs of one model."""

    def __init__(self, model, cfg: EvaluateConfig):
        self.model, self.cfg = model, cfg
        self.diffusion = Diffusion.for_config(cfg.sampler)
        labels = torch.tensor([c for c in cfg.classes for _ in range(cfg.per_class)])
        self.y = labels if model.config.num_classes else None
        self.shape = (len(labels), *model.sample_shape())
        self.scorer = classifier.load() if is_pixel_digits(model) else None
        self.refs = {s: run_chain(model, self.diffusion, self.shape, self.y, cfg.sampler, s, None) for s in cfg.seeds}
        self.rows = self.shape[0] * (2 if cfg.sampler.cfg_scale > 1 and self.y is not None else 1)

    def score(self, cache) -> tuple[np.ndarray, str]:
        """((seed, score) in SCORES order, the mask run on the first seed) for one CacheConfig. The
        theoretical speedup is counted on the schedule each run actually took (a dynamic method's
        decisions are only known after the run)."""
        out, mask = np.full((len(self.cfg.seeds), len(SCORES)), np.nan), ""
        for i, seed in enumerate(self.cfg.seeds):
            x, _, sec, state = run_chain(self.model, self.diffusion, self.shape, self.y, self.cfg.sampler, seed, cache)
            x_ref, _, ref_sec, _ = self.refs[seed]
            side = min(x.shape[-2:])
            win = min(11, side if side % 2 else side - 1)
            out[i, 0] = metrics.psnr(x, x_ref, data_range=2.0).mean().item()
            out[i, 1] = metrics.ssim(x, x_ref, data_range=2.0, win_size=win).mean().item()
            if self.scorer is not None:
                out[i, 2] = metrics.classifier_accuracy(x, self.y, self.scorer).item()
            ran = replace(cache, mask=state.schedule)
            out[i, 3] = float(schedule_cost(self.model, ran, self.diffusion.chain, batch=self.rows)
                              .attrs["theoretical_speedup"])
            out[i, 4] = ref_sec / sec
            mask = mask or state.schedule.mask
        return out, mask


def evaluate(entries: list[ModelEntry], cfg: EvaluateConfig = EvaluateConfig(), log=print) -> xr.Dataset:
    """Evaluate on two models (a pair): each is planned with its own and with the other's calibration."""
    if len(entries) != 2:
        raise ValueError(f"evaluate takes a pair of models (each planned with the other's calibration); got "
                         f"{len(entries)}")
    log = log or (lambda *_: None)
    profiles = {}
    for e in entries:
        profiles[e.label] = profile(e, cfg.profile, log=log)
        check_profile(profiles[e.label], e, cfg.sampler)
    fits = {label: Calibration.fit(p) for label, p in profiles.items()}
    rows, budgets, seeds = cfg.rows, list(cfg.budgets), list(cfg.seeds)
    data = np.full((2, len(rows), len(budgets), len(seeds), len(SCORES)), np.nan)
    passes = np.full((2, len(rows), len(budgets)), np.nan)
    masks = np.full((2, len(rows), len(budgets)), "", dtype=object)
    ks = np.full((2, len(rows), len(budgets)), -1)
    for m, e in enumerate(entries):
        model, prof = e.model.eval(), profiles[e.label]
        other = entries[1 - m].label
        runs = _Runs(model, cfg)
        ctx = Context(model, cfg.sampler, cfg.plan, seed=cfg.profile.seeds[0], class_label=cfg.profile.class_label)
        a = prof.attrs
        for b, budget in enumerate(budgets):
            try:
                check_budget(model, budget, cfg.plan.method_for(model), cfg.plan.ks_for(model), cfg.sampler.num_steps,
                             cfg.plan.max_run)
            except ValueError as err:                      # e.g. Skip-Cache on a 4-unit model: left NaN, said why
                log(f"{e.label} {budget:g}x: skipped ({err})")
                continue
            for r, row in enumerate(rows):
                if row.startswith("planner"):
                    fit = fits[e.label if row == "planner" else other]
                    configs = (plan(model, prof, budget, fit, cfg.plan).config,)
                    passes[m, r, b] = a["cost_profile_passes"] + (a["cost_calibration_passes"] if row == "planner" else 0)
                else:
                    cands = REFERENCES[row].build(ctx, budget)
                    configs, passes[m, r, b] = cands.configs, cands.calibration_passes
                scored, ran = zip(*[runs.score(c) for c in configs])
                best = int(np.argmax([s[:, 0].mean() for s in scored]))
                data[m, r, b], masks[m, r, b] = scored[best], ran[best]
                ks[m, r, b] = -1 if configs[best].method == "fora" else configs[best].k
                log(f"{e.label} {budget:g}x {row}: PSNR {scored[best][:, 0].mean():.2f} dB at "
                    f"{scored[best][0, 3]:.3f}x theoretical, {scored[best][:, 4].mean():.2f}x realized "
                    f"({configs[best].name})")
    return _dataset(entries, cfg, data, passes, masks, ks, fits, profiles)


def _dataset(entries, cfg: EvaluateConfig, data, passes, masks, ks, fits, profiles) -> xr.Dataset:
    dims = ("model", "planner", "budget", "seed")
    S = cfg.sampler.num_steps
    ds = xr.Dataset({v: (dims, data[..., i], {"long_name": ln, "units": u}) for i, (v, (ln, u)) in enumerate(SCORES.items())},
                    coords={"model": [e.label for e in entries], "planner": cfg.rows, "budget": list(cfg.budgets),
                            "seed": list(cfg.seeds)})
    ds["calibration_passes"] = (dims[:3], passes, {"long_name": "forward passes spent choosing the schedule",
                                                   "units": "passes"})
    ds["calibration_chains"] = (ds.calibration_passes / S).assign_attrs(long_name="calibration cost in uncached "
                                                                        f"chains of {S} steps", units="chains")
    ci = np.array([[[interval(ds.psnr.values[m, p, b]) for b in range(ds.sizes["budget"])]
                    for p in range(ds.sizes["planner"])] for m in range(ds.sizes["model"])])
    ds["psnr_ci"] = (dims[:3] + ("bound",), ci, {"long_name": "PSNR mean over seeds and its 95 % percentile "
                                                 "bootstrap interval", "units": "dB"})
    ds = ds.assign_coords(bound=["mean", "low", "high"])
    ds["mask"] = (dims[:3], masks.astype(str), {"long_name": "schedule run (F full, c cached)"})
    ds["k"] = (dims[:3], ks, {"long_name": "units recomputed on each side (-1: FORA, no k)"})
    ds.attrs.update(title="planner evaluation", config=chain.config_json(cfg), seeds=json.dumps(list(cfg.seeds)),
                    calibration_seeds=json.dumps(list(cfg.profile.seeds)), data_range=2.0,
                    calibrations=json.dumps({k: str(v) for k, v in fits.items()}),
                    calibration_spearman=json.dumps({k: v.spearman for k, v in fits.items()}),
                    profile_chains=json.dumps({k: p.attrs["cost_profile_chains"] for k, p in profiles.items()}),
                    torch_threads=torch.get_num_threads(),
                    **chain.sampler_attrs(cfg.sampler), **chain.provenance(entries))
    return ds


def interval(values: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): a 95 % percentile bootstrap over seeds (nan interval with one seed)."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return float(v.mean()), float("nan"), float("nan")
    lo, hi = bootstrap_ci(lambda s: s.mean(-1), v, seed=seed)
    return float(v.mean()), lo, hi


def table(ds: xr.Dataset) -> str:
    """A markdown table: one row per model, budget and planner."""
    head = ("| model | budget | planner | k | theoretical x | realized x | PSNR dB [95 % CI] | SSIM | accuracy | "
            "calibration (chains) |")
    lines = [head, "|" + "---|" * 10]
    for m in ds.model.values:
        for b in ds.budget.values:
            for p in ds.planner.values:
                r = ds.sel(model=m, budget=b, planner=p)
                if not np.isfinite(r.psnr).any():
                    lines.append(f"| {m} | {b:g}x | {p} | - | unreachable | | | | | |")
                    continue
                mean, lo, hi = (float(r.psnr_ci.sel(bound=v)) for v in ("mean", "low", "high"))
                k = int(r.k)
                lines.append(f"| {m} | {b:g}x | {p} | {k if k >= 0 else '-'} | {float(r.theoretical_speedup.mean()):.3f} | "
                             f"{float(r.realized_speedup.mean()):.2f} | {mean:.2f} [{lo:.2f}, {hi:.2f}] | "
                             f"{float(r.ssim.mean()):.3f} | {float(r.accuracy.mean()):.2f} | "
                             f"{float(r.calibration_chains):.1f} |")
    return "\n".join(lines)
