"""A model's per-step, per-unit smoothness profile: what the planner reads.

For every seed, one uncached chain (batch 1, one class, the sampler the schedule is for) gives

* ``change`` (step x unit x seed): each unit's output change from the previous step, relative L2
  (the feature dynamics of ``smoothness.analysis.dynamics``, measured on the same chain);
* ``response`` (probe x unit x seed x alpha): at a few probe steps, the model output's relative L2
  change when unit u's output is perturbed by alpha * d1, d1 Gaussian scaled per token to the token's
  norm (the ``features`` surface of ``smoothness.surface`` at the unit's output, a 1-D slice of its
  local surface at +-radius); ``gain`` = response / |alpha|, mean over alpha, is the unit's
  first-order sensitivity (relative output change per relative feature change), interpolated
  linearly in the step to every step;
* ``calib_error``: measured caching errors for the calibration (cache filled by a full call at a probe
  step f, then cached calls on the chain's x at f+1 .. f+gap; relative L2 of the eps channels against
  the uncached output), for a few k.

Cost is counted in forward passes: one pass = one model evaluation of the chain's rows (a batched
CFG call is one pass; a probe of G grid points is G passes). The chain costs S passes, the probes
``probes x units x len(alphas)``, the calibration ``probes x len(calib_ks) x (1 + calib_gaps)``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import torch
import xarray as xr

from .. import chain, hooks
from ..cache import CacheConfig, Schedule, apply_cache
from ..diffusion import Diffusion, SamplerConfig
from ..io_utils import versions
from ..models import ModelEntry
from ..surface import DirectionSpec, GridEngine, Perturbation

PLAN_METHODS = ("auto", "skip-cache", "deep-reuse", "fora")


def method_for(method: str, model) -> str:
    """``auto``: Skip-Cache on a model with skip branches, FORA on one without; else ``method``."""
    if method != "auto":
        return method
    return "skip-cache" if model.skip_into else "fora"


@dataclass(frozen=True)
class ProfileConfig:
    """The chain a profile is measured on and how densely."""

    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(num_steps=50, cfg_scale=3.0,
                                                                         clip_denoised=True))  # the sweep's DDPM-50
    seeds: tuple[int, ...] = (0,)        # one uncached chain per seed
    class_label: int = 0                 # the class every chain is conditioned on (ignored if unconditional)
    probes: int = 4                      # probe steps, evenly spaced over 2..S (4: <= 3 chains on the bundled models)
    radius: float = 0.1                  # alpha of the probes: +-radius (relative feature perturbation)
    direction_seed: int = 0              # seed of the feature directions
    method: str = "auto"                 # cache the calibration measures: auto = skip-cache with skips, else fora
    calib_ks: tuple[int, ...] = (1, 2)   # k of the calibration measurements (skip-cache / deep-reuse)
    calib_gaps: int = 3                  # cached calls after each calibration fill

    def __post_init__(self):
        chain.check_seeds(self.seeds)
        if self.method not in PLAN_METHODS:
            raise ValueError(f"unknown method {self.method!r}; allowed: {', '.join(PLAN_METHODS)}")
        if not (isinstance(self.probes, int) and 1 <= self.probes <= self.sampler.num_steps - 1):
            raise ValueError(f"probes={self.probes!r} is not allowed; use 1..{self.sampler.num_steps - 1}")
        if not (0 < self.radius <= 1):
            raise ValueError(f"radius={self.radius!r} is not allowed; use a number in (0, 1]")
        if not self.calib_ks or any(not (isinstance(k, int) and k >= 1) for k in self.calib_ks):
            raise ValueError(f"calib_ks={self.calib_ks!r} is not allowed; use integers >= 1")
        if not (isinstance(self.calib_gaps, int) and self.calib_gaps >= 1):
            raise ValueError(f"calib_gaps={self.calib_gaps!r} is not allowed; use an integer >= 1")

    @property
    def alphas(self) -> tuple[float, float]:
        return (-self.radius, self.radius)

    @property
    def probe_steps(self) -> list[int]:
        """Evenly spaced over 2 .. S - calib_gaps (so every calibration gap fits in the chain)."""
        last = max(2, self.sampler.num_steps - self.calib_gaps)
        return sorted({int(round(v)) for v in np.linspace(2, last, self.probes)})

    def method_for(self, model) -> str:
        return method_for(self.method, model)

    def ks_for(self, model) -> list[int]:
        """Calibration k values that fit the model (none for FORA, which has no k)."""
        if self.method_for(model) == "fora":
            return [1]
        return [k for k in self.calib_ks if k <= model.num_units // 2 - 1] or [1]

    def cost(self, model) -> dict[str, int]:
        """Forward passes of the profile (chain + probes) and of the calibration, per the module doc."""
        s, p, g = self.sampler.num_steps, len(self.probe_steps), len(self.alphas)
        return {"chain": s * len(self.seeds), "probes": p * model.num_units * g * len(self.seeds),
                "calibration": p * len(self.ks_for(model)) * (1 + self.calib_gaps) * len(self.seeds)}


def unit_site(model, u: int) -> str:
    """The hook site of unit u's output (its last block)."""
    return f"blocks.{model.unit_blocks(u)[-1]}"


def cache_for(method: str, k: int, gaps: int) -> CacheConfig:
    """A full call followed by ``gaps`` cached calls (the measurement of one fill)."""
    return CacheConfig(method=method, k=k, mask=Schedule.from_mask([True] + [False] * gaps))


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Relative L2 of (G, ...) against (...), each flattened; (G,)."""
    a, b = a.double().reshape(a.shape[0], -1), b.double().reshape(1, -1)
    return torch.linalg.vector_norm(a - b, dim=1) / torch.linalg.vector_norm(b).clamp_min(1e-300)


class ChainRecord:
    """The uncached chain of one seed: x_t, t and guided output per step, and unit output changes."""

    def __init__(self, model, diffusion: Diffusion, sampler: SamplerConfig, seed: int, class_label: int):
        self.x, self.t, self.out = {}, {}, {}
        units = model.num_units
        self.change = np.full((sampler.num_steps, units), np.nan)           # (step, unit)
        prev: dict[int, torch.Tensor] = {}
        site_unit = {unit_site(model, u): u for u in range(units)}

        def track(h, ctx: hooks.HookContext):
            if ctx.cond_rows is not None:
                h = h[: h.shape[0] // 2]                                      # the conditional half
            v, u = h.detach().double().reshape(-1), site_unit[ctx.site]
            if u in prev:
                self.change[ctx.step - 1, u] = float(torch.linalg.vector_norm(v - prev[u])
                                                     / torch.linalg.vector_norm(prev[u]).clamp_min(1e-300))
            prev[u] = v
        with torch.inference_mode(), hooks.inject(model, {s: track for s in site_unit}):
            for rec in chain.reference_chain(model, diffusion, sampler, seed, class_label):
                self.x[rec.step], self.out[rec.step] = rec.x_t, rec.model_output
                self.t[rec.step] = torch.full((1,), rec.timestep, dtype=torch.long, device=rec.x_t.device)
        self.y = chain.labels(model, class_label, 1, next(model.parameters()).device)


def measure_fill(model, method: str, k: int, diffusion: Diffusion, sampler: SamplerConfig, rec: ChainRecord,
                 fill: int, gaps: int) -> list[float]:
    """Caching errors at steps fill+1 .. fill+gaps with the cache filled at ``fill`` (1 + gaps passes)."""
    c = rec.x[fill].shape[1]
    errs = []
    with torch.inference_mode(), apply_cache(model, cache_for(method, k, gaps)) as state:
        diffusion.model_output(model, rec.x[fill], rec.t[fill], rec.y, sampler)
        for s in range(fill + 1, fill + gaps + 1):
            out = diffusion.model_output(model, rec.x[s], rec.t[s], rec.y, sampler)
            errs.append(float(rel_l2(out[:, :c], rec.out[s][0, :c])[0]))
    if state.num_cached != gaps:
        raise RuntimeError(f"expected 1 full and {gaps} cached calls, got {state.schedule.mask}")
    return errs


def _probe(model, sampler: SamplerConfig, rec: ChainRecord, step: int, cfg: ProfileConfig) -> np.ndarray:
    """Output responses (unit, alpha) at one step."""
    c = rec.x[step].shape[1]
    out = np.full((model.num_units, len(cfg.alphas)), np.nan)
    coef = (torch.tensor(cfg.alphas), torch.zeros(len(cfg.alphas)))
    for u in range(model.num_units):
        engine = GridEngine(model, Perturbation(mode="features", site=unit_site(model, u),
                                                directions=DirectionSpec(seed=cfg.direction_seed)))
        with torch.inference_mode():
            got = engine.forward(rec.x[step], rec.t[step], rec.y, coef, sampler.cfg_scale, sampler.cfg_channels)
        out[u] = rel_l2(got[:, 0, :c], rec.out[step][0, :c]).cpu().numpy()  # (G,)
    return out


def profile(entry: ModelEntry, cfg: ProfileConfig = ProfileConfig(), log=None) -> xr.Dataset:
    """The profile of one model (a ``ModelEntry``, for its sha256) as a labelled Dataset."""
    model = entry.model.eval()
    chain.labels(model, cfg.class_label, who=entry.label)                     # validates before any work
    if not model.config.num_classes and cfg.sampler.cfg_scale != 1.0:
        raise ValueError(f"cfg_scale={cfg.sampler.cfg_scale:g} needs a conditional model; {entry.label} is "
                         "unconditional (use a guidance scale of 1)")
    diffusion = Diffusion.for_config(cfg.sampler)
    S, U, probes, seeds = cfg.sampler.num_steps, model.num_units, cfg.probe_steps, list(cfg.seeds)
    method, ks = cfg.method_for(model), cfg.ks_for(model)
    CacheConfig(method=method, k=max(ks)).check(model)
    change = np.full((S, U, len(seeds)), np.nan)
    response = np.full((len(probes), U, len(seeds), len(cfg.alphas)), np.nan)
    calib = np.full((len(ks), len(probes), cfg.calib_gaps, len(seeds)), np.nan)
    for j, seed in enumerate(seeds):
        rec = ChainRecord(model, diffusion, cfg.sampler, seed, cfg.class_label)
        change[:, :, j] = rec.change
        for p, step in enumerate(probes):
            response[p, :, j] = _probe(model, cfg.sampler, rec, step, cfg)
            for i, k in enumerate(ks):
                calib[i, p, :, j] = measure_fill(model, method, k, diffusion, cfg.sampler, rec, step, cfg.calib_gaps)
        if log:
            log(f"{entry.label} seed {seed}: chain, {len(probes)} probe steps x {U} units, calibration done")
    gain = np.abs(response).mean(-1) / cfg.radius                                 # (probe, unit, seed)
    gain_all = np.stack([[np.interp(np.arange(1, S + 1), probes, gain[:, u, j]) for j in range(len(seeds))]
                         for u in range(U)]).transpose(2, 0, 1)                      # (step, unit, seed)
    cost = cfg.cost(model)
    steps = np.arange(1, S + 1)
    ds = xr.Dataset(
        {"change": (("step", "unit", "seed"), change, {"long_name": "relative L2 change of the unit output from "
                                                       "the previous step", "units": "1"}),
         "gain": (("step", "unit", "seed"), gain_all, {"long_name": "relative output change per relative change "
                                                       "of the unit output (interpolated between probes)",
                                                       "units": "1"}),
         "response": (("probe_step", "unit", "seed", "alpha"), response,
                      {"long_name": "relative L2 change of the model output (eps) with the unit output perturbed "
                                    "by alpha * d1", "units": "1"}),
         "calib_error": (("calib_k", "probe_step", "gap", "seed"), calib,
                         {"long_name": "measured caching error (relative L2, eps) at step probe_step + gap with "
                                       "the cache filled at probe_step", "units": "1"})},
        coords={"step": ("step", steps, {"long_name": "sampler iteration (1-based)"}),
                "timestep": ("step", diffusion.chain, {"long_name": "DDPM timestep t on the 1000-step scale"}),
                "unit": np.arange(U), "seed": seeds, "probe_step": probes, "alpha": list(cfg.alphas),
                "calib_k": ks, "gap": np.arange(1, cfg.calib_gaps + 1)})
    ds.attrs.update(title="smoothness profile", model=entry.label, source=entry.source, model_sha256=entry.sha256,
                    num_units=U, skips=int(bool(model.skip_into)), calib_method=method, radius=cfg.radius,
                    class_label=cfg.class_label, direction_seed=cfg.direction_seed, config=chain.config_json(cfg),
                    cost_chain_passes=cost["chain"], cost_probe_passes=cost["probes"],
                    cost_calibration_passes=cost["calibration"], cost_profile_passes=cost["chain"] + cost["probes"],
                    cost_profile_chains=(cost["chain"] + cost["probes"]) / S,
                    versions=json.dumps(versions()), **chain.sampler_attrs(cfg.sampler),
                    num_sampling_steps=S, sampler=cfg.sampler.sampler)
    return ds


def cost_line(ds: xr.Dataset) -> str:
    """The profile's cost, as printed by the CLI."""
    s, a = ds.sizes["step"], ds.attrs
    return (f"profile of {a['model']}: {a['cost_profile_passes']} forward passes ({a['cost_chain_passes']} chain + "
            f"{a['cost_probe_passes']} probes = {a['cost_profile_passes'] / s:.2f} uncached chains of {s} steps); "
            f"calibration {a['cost_calibration_passes']} passes ({a['cost_calibration_passes'] / s:.2f} chains)")


def check_profile(ds: xr.Dataset, entry: ModelEntry, sampler: SamplerConfig):
    """A profile fits ``entry`` and ``sampler``: same checkpoint (sha256), same chain, not empty."""
    if ds.sizes.get("step", 0) == 0 or ds.sizes.get("unit", 0) == 0 or not np.isfinite(ds.gain.values).any():
        raise ValueError("the profile is empty (no steps, units or finite gains); make one with "
                         "python -m smoothness.plan profile")
    have, want = ds.attrs.get("model_sha256", ""), entry.sha256
    if have and want and have != want:
        raise ValueError(f"the profile is of another model (sha256 {have[:12]}..., {ds.attrs.get('model')}); "
                         f"{entry.label} has sha256 {want[:12]}...: profile this model")
    chain_have = (ds.attrs.get("chain"), float(ds.attrs.get("cfg_scale", 1.0)))
    if chain_have != (sampler.label, float(sampler.cfg_scale)):
        raise ValueError(f"the profile is of another sampler chain ({chain_have[0]}, CFG {chain_have[1]:g}); "
                         f"allowed: {sampler.label}, CFG {sampler.cfg_scale:g}, the chain the schedule is for")
    if ds.sizes["unit"] != entry.model.num_units:
        raise ValueError(f"the profile has {ds.sizes['unit']} units but {entry.label} has {entry.model.num_units}")
