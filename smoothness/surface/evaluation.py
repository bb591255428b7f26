"""How a surface evaluates one chunk of grid points (``SurfaceConfig.evaluation``).

* ``local``: on the unperturbed chain's x_t at the requested steps. Every step's and seed's x_t are
  rows of one batched forward, so each grid point's perturbed weights are built once for all.
* ``trajectory``: the perturbed model runs the whole chain, one per seed, up to the last step.

Both return {(readout, step): (G, N, ...)} for the chunk's G points and N seeds: the eps channels of
the output and any recorded site, as float32 on the CPU. They take an ``EvalSpec``: only what an
evaluation uses (a ``SurfaceConfig`` gives one as ``cfg.eval_spec``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import chain, hooks
from ..diffusion import Diffusion, SamplerConfig
from .engine import GridEngine, Perturbation, _unit_of_site

EVALUATIONS = ("local", "trajectory")


@dataclass(frozen=True)
class EvalSpec:
    """What a chunk evaluation needs to know of the surface it fills."""

    steps: tuple[int, ...]           # sampler steps whose readouts are kept
    readouts: tuple[str, ...]        # "output" and/or sites
    sampler: SamplerConfig           # the chain (guidance scale and channels)
    perturbation: Perturbation       # for the sites a feature perturbation leaves unperturbed
    device: str = "cpu"


class Collector:
    """Keeps the requested readouts of one batched evaluation, per step, as (G, R, ...) tensors.

    A video block sees N*F (spatial) or N*T (temporal) rows per N samples; those rows are folded
    into the sample's token axis, (G, R, F*T, H). Sites in ``shared`` run once before the engine
    tiles the batch (the unperturbed prefix of a feature perturbation) and are broadcast."""

    def __init__(self, readouts, steps, groups, rows, cond_rows, shared=frozenset()):
        self.readouts, self.steps = readouts, None if steps is None else set(steps)   # None: every call
        self.groups, self.rows, self.cond_rows = groups, rows, cond_rows
        self.shared = shared
        self.data: dict[tuple[str, int], torch.Tensor] = {}

    def hook(self, h, ctx: hooks.HookContext):
        if self.steps is None or ctx.step in self.steps:
            g = 1 if ctx.site in self.shared else self.groups
            h = h.reshape(g, self.rows, -1, *h.shape[1:])                # (G, R, rows per sample, ...)
            h = h.flatten(2, 3) if h.dim() > 3 else h.flatten(2)
            if g == 1:
                h = h.expand(self.groups, *h.shape[1:])
            self.data[(ctx.site, ctx.step)] = h[:, : self.cond_rows].detach().float().cpu()
        return None


def shared_sites(model, perturbation: Perturbation, sites) -> frozenset:
    """Readout sites computed once, before tiling: those up to a feature perturbation's unit."""
    if perturbation.mode != "features":
        return frozenset()
    unit = _unit_of_site(model, perturbation.site)
    if unit is None:
        return frozenset()
    shared = {"input", "embed"}
    for u in range(unit + 1):
        for i in model.unit_blocks(u):
            shared |= {f"blocks.{i}", f"blocks.{i}.attn", f"blocks.{i}.mlp"}
        if u in model.skip_into:
            shared.add(f"skips.{model.skip_into[u][1]}")
    return frozenset(s for s in sites if s in shared)


def readout_sites(readouts):
    return [r for r in readouts if r != "output"]


def local(model, cfg: EvalSpec, diffusion: Diffusion, inputs, y1, coef, engine):
    """Evaluate chunk ``coef`` on the chain's x_t at every requested step in one batched forward:
    each grid point carries the x_t of all steps and seeds as its rows (step-major), so its
    perturbed weights are built once for all of them. Returns {(readout, step): (G, N, ...)} for
    N seeds."""
    g, n, steps = len(coef[0]), len(inputs), sorted(cfg.steps)
    x = torch.cat([inp[step] for step in steps for inp in inputs])              # (S*N, C, ...)
    t = torch.cat([torch.full((n,), diffusion.timestep_of(step), dtype=torch.long, device=x.device)
                   for step in steps])
    rows = x.shape[0] * (2 if cfg.sampler.cfg_scale != 1.0 else 1)
    col = Collector(readout_sites(cfg.readouts), None, g, rows, x.shape[0],
                    shared_sites(model, cfg.perturbation, readout_sites(cfg.readouts)))
    with hooks.inject(model, {s: col.hook for s in readout_sites(cfg.readouts)}):
        out = engine.forward(x, t, chain.tile(y1, len(steps) * n), coef, cfg.sampler.cfg_scale,
                             cfg.sampler.cfg_channels)
    col.data[("output", None)] = out[:, :, : x.shape[1]].float().cpu()       # eps channels
    return {(r, step): v[:, i * n:(i + 1) * n] for (r, _), v in col.data.items() for i, step in enumerate(steps)}


class GroupedModel(torch.nn.Module):
    """Presents the engine to the sampler as a model, reordering CFG batches to group-major."""

    def __init__(self, engine: GridEngine, coef):
        super().__init__()
        self.engine, self.coef, self.config = engine, coef, engine.model.config
        self.g = len(coef[0])

    def forward(self, x, t, y):
        cond = hooks.current_cfg_rows()
        if cond is None:
            return self.engine.run(x, t, y, self.coef)
        r0 = cond // self.g                                             # rows per group per half
        idx = torch.arange(x.shape[0]).reshape(2, self.g, r0).transpose(0, 1).reshape(-1)
        out = self.engine.run(x[idx], t[idx], y[idx], self.coef)
        inv = torch.empty_like(idx)
        inv[idx] = torch.arange(len(idx))
        return out[inv]


def trajectory(model, cfg: EvalSpec, diffusion: Diffusion, seed: int, y, coef, engine, shape, dtype: torch.dtype):
    """Run the perturbed chain for chunk ``coef`` up to the last requested step."""
    g = len(coef[0])
    wrapper = GroupedModel(engine, coef)
    rows = shape[0] * (2 if cfg.sampler.cfg_scale != 1.0 else 1)
    col = Collector(readout_sites(cfg.readouts), cfg.steps, g, rows, shape[0])
    records = diffusion.sample_steps(wrapper, (g * shape[0], *shape[1:]), chain.tile(y, g), cfg.sampler, seed=seed,
                                     groups=g, dtype=dtype, device=torch.device(cfg.device))
    with hooks.inject(model, {s: col.hook for s in readout_sites(cfg.readouts)}):
        for rec in chain.at_steps(records, cfg.steps):
            out = rec.model_output.reshape(g, shape[0], *rec.model_output.shape[1:])
            col.data[("output", rec.step)] = out[:, :, : shape[1]].float().cpu()
    return col.data


def chain_inputs(model, cfg: EvalSpec, diffusion: Diffusion, seed: int, y, shape, dtype: torch.dtype,
                 who: str = "the model"):
    """x_t at every requested step of the unperturbed chain for one seed (refusing a non-finite chain)."""
    records = chain.finite(diffusion.sample_steps(model, shape, y, cfg.sampler, seed=seed, dtype=dtype), who)
    return {rec.step: rec.x_t for rec in chain.at_steps(records, cfg.steps)}
