"""The planner against the references, on the same budgets, on evaluation seeds it never saw.

For each model of a pair: the profile and the oracle's measured edges come from the calibration
chain (``profile.seeds``, one class); then at every budget each schedule samples
``len(classes) * per_class`` samples per evaluation seed and is compared with the uncached run from
the same seed: PSNR, SSIM, digits-classifier accuracy (image models), theoretical speedup (MACs) and
realized speedup (wall time), plus what choosing the schedule cost (forward passes).

Rows (``planner`` dim): ``planner`` (calibration fitted on this model), ``planner-other`` (fitted on
the other model of the pair, applied without refitting), then every entry of
``references.REFERENCES``. A reference with several candidates keeps the best by mean PSNR. A row
that cannot run (a budget above what the planner's method reaches on the model, a dynamic method that
does not apply or cannot reach the budget) is left NaN with its reason in ``note``.

The theoretical speedup of every run is counted on the calls that run made (``cache.flops.run_cost``):
for a static schedule that is its schedule's; a dynamic method's decisions, tuned on the calibration
chain, differ per sample, so on the evaluation seeds it can land slightly above or below the budget.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import torch
import xarray as xr

from .. import chain, metrics
from ..analysis.stats import bootstrap_ci
from ..cache.flops import run_cost
from ..cache.sweep import run_chain
from ..data import classifier
from ..diffusion import Diffusion, SamplerConfig
from ..models import ModelEntry
from ..models.bundled import is_pixel_digits
from .planner import Calibration, PlanConfig, check_budget, plan
from .profile import ProfileConfig, check_profile, profile
from .references import REFERENCES, Candidates, Context

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

    def score(self, cache) -> tuple[np.ndarray, str]:
        """((seed, score) in SCORES order, the mask run on the first seed) for one CacheConfig. The
        theoretical speedup is counted on the calls each run actually made (a dynamic method's
        decisions are only known after the run); the mask has ``m`` where the rows decided differently."""
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
            out[i, 3] = float(run_cost(self.model, state).attrs["theoretical_speedup"])
            out[i, 4] = ref_sec / sec
            mask = mask or state.mask
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
    cells = {v: np.full((2, len(rows), len(budgets)), fill, dtype=type_) for v, fill, type_ in
             (("passes", np.nan, float), ("mask", "", object), ("k", -1, int), ("threshold", np.nan, float),
              ("note", "", object))}
    for m, e in enumerate(entries):
        model, prof = e.model.eval(), profiles[e.label]
        runs = _Runs(model, cfg)
        ctx = Context(model, cfg.sampler, cfg.plan, seed=cfg.profile.seeds[0], class_label=cfg.profile.class_label)
        for b, budget in enumerate(budgets):
            try:
                check_budget(model, budget, cfg.plan.method_for(model), cfg.plan.ks_for(model), cfg.sampler.num_steps,
                             cfg.plan.max_run)
                unreachable = ""
            except ValueError as err:                      # e.g. Skip-Cache on a 4-unit model: left NaN, said why
                unreachable = str(err)
                log(f"{e.label} {budget:g}x: planner and its references skipped ({err})")
            for r, row in enumerate(rows):
                at = (m, r, b)
                if unreachable and (row.startswith("planner") or REFERENCES[row].planned):
                    cells["note"][at] = unreachable
                    continue
                cands = _candidates(row, prof, fits[e.label if row != "planner-other" else entries[1 - m].label],
                                    ctx, budget)
                cells["passes"][at], cells["note"][at] = cands.calibration_passes, cands.note
                if not cands.configs:                      # a method that does not apply or cannot reach it
                    log(f"{e.label} {budget:g}x {row}: skipped ({cands.note})")
                    continue
                scored, ran = zip(*[runs.score(c) for c in cands.configs])
                best = int(np.argmax([s[:, 0].mean() for s in scored]))
                config = cands.configs[best]
                data[at], cells["mask"][at] = scored[best], ran[best]
                cells["k"][at] = config.k if "k" in config.kind.uses else -1
                cells["threshold"][at] = config.get("threshold") if config.kind.dynamic else np.nan
                log(f"{e.label} {budget:g}x {row}: PSNR {scored[best][:, 0].mean():.2f} dB at "
                    f"{scored[best][:, 3].mean():.3f}x theoretical, {scored[best][:, 4].mean():.2f}x realized "
                    f"({config.name})")
    return _dataset(entries, cfg, data, cells, fits, profiles)


def _candidates(row: str, prof: xr.Dataset, fit: Calibration, ctx: Context, budget: float) -> Candidates:
    """What one row runs at ``budget`` and what choosing it cost: the planner with ``fit`` (its own
    calibration counted only when fitted on this model), or a reference's candidates."""
    if not row.startswith("planner"):
        return REFERENCES[row].build(ctx, budget)
    a = prof.attrs
    return Candidates((plan(ctx.model, prof, budget, fit, ctx.plan).config,),
                      a["cost_profile_passes"] + (a["cost_calibration_passes"] if row == "planner" else 0), str(fit))


def _dataset(entries, cfg: EvaluateConfig, data, cells, fits, profiles) -> xr.Dataset:
    dims = ("model", "planner", "budget", "seed")
    S = cfg.sampler.num_steps
    ds = xr.Dataset({v: (dims, data[..., i], {"long_name": ln, "units": u}) for i, (v, (ln, u)) in enumerate(SCORES.items())},
                    coords={"model": [e.label for e in entries], "planner": cfg.rows, "budget": list(cfg.budgets),
                            "seed": list(cfg.seeds)})
    ds["calibration_passes"] = (dims[:3], cells["passes"], {"long_name": "forward passes spent choosing the schedule",
                                                   "units": "passes"})
    ds["calibration_chains"] = (ds.calibration_passes / S).assign_attrs(long_name="calibration cost in uncached "
                                                                        f"chains of {S} steps", units="chains")
    ci = np.array([[[interval(ds.psnr.values[m, p, b]) for b in range(ds.sizes["budget"])]
                    for p in range(ds.sizes["planner"])] for m in range(ds.sizes["model"])])
    ds["psnr_ci"] = (dims[:3] + ("bound",), ci, {"long_name": "PSNR mean over seeds and its 95 % percentile "
                                                 "bootstrap interval", "units": "dB"})
    ds = ds.assign_coords(bound=["mean", "low", "high"])
    ds["mask"] = (dims[:3], cells["mask"].astype(str), {"long_name": "schedule run on the first evaluation seed "
                                                        "(F full, c cached, m rows decided differently)"})
    ds["k"] = (dims[:3], cells["k"], {"long_name": "units recomputed on each side (-1: the method has no k)"})
    ds["threshold"] = (dims[:3], cells["threshold"], {"long_name": "threshold of a dynamic method, tuned to the "
                                                      "budget on the calibration chain (NaN: static)", "units": "1"})
    ds["note"] = (dims[:3], cells["note"].astype(str), {"long_name": "how the schedule was chosen; for a row "
                                                        "left NaN, why"})
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
    """A markdown table: one row per model, budget and planner (k, or a dynamic method's threshold)."""
    head = ("| model | budget | planner | k or τ | theoretical x | realized x | PSNR dB [95 % CI] | SSIM | accuracy | "
            "calibration (chains) |")
    lines = [head, "|" + "---|" * 10]
    for m in ds.model.values:
        for b in ds.budget.values:
            for p in ds.planner.values:
                r = ds.sel(model=m, budget=b, planner=p)
                if not np.isfinite(r.psnr).any():
                    why = str(r.note.values) if "note" in r else ""
                    lines.append(f"| {m} | {b:g}x | {p} | - | not run{f': {why}' if why else ''} | | | | | |")
                    continue
                mean, lo, hi = (float(r.psnr_ci.sel(bound=v)) for v in ("mean", "low", "high"))
                k, tau = int(r.k), float(r.threshold) if "threshold" in r else np.nan
                setting = f"τ {tau:.3g}" if np.isfinite(tau) else k if k >= 0 else "-"
                lines.append(f"| {m} | {b:g}x | {p} | {setting} | {float(r.theoretical_speedup.mean()):.3f} | "
                             f"{float(r.realized_speedup.mean()):.2f} | {mean:.2f} [{lo:.2f}, {hi:.2f}] | "
                             f"{float(r.ssim.mean()):.3f} | {float(r.accuracy.mean()):.2f} | "
                             f"{float(r.calibration_chains):.1f} |")
    return "\n".join(lines)
