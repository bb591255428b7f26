"""Feature dynamics (Skip-DiT, arXiv 2411.17616 v1 Fig. 4): how much each block's output changes
from one sampler step to the next, blocks x timesteps, DiT against Skip-DiT.

    from smoothness.analysis import dynamics
    ds = dynamics.compute({"DiT": dit, "Skip-DiT": skip_dit}, dynamics.DynamicsConfig(seeds=(0, 1)))
    dynamics.heatmap(ds, metric="rel_l2")          # a matplotlib Figure

The paper does not state its per-cell metric; the official code records block outputs at every
timestep, and the natural readings are given here (paper-spec 3.3). For block i at step s >= 2 of
the uncached chain (one chain per seed, batch 1, as the surfaces), with h the block's output
flattened over everything but the batch (the conditional half under guidance):

    rel_l2            ||h_s - h_{s-1}|| / ||h_{s-1}||
    cosine_distance   1 - cos(h_s, h_{s-1})

Features are compared in float64 as they are produced (a hook keeps only the previous step's
output), so a 250-step chain costs no more memory than one step.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import numpy as np
import torch
import xarray as xr

from .. import chain, hooks
from .._moved import moved_names
from ..diffusion import Diffusion, SamplerConfig
from ..models import Captions, caption_attrs

METRICS = {  # name: long name
    "rel_l2": "relative L2 change of the block output from the previous sampler step",
    "cosine_distance": "1 - cosine similarity of the block output with the previous sampler step",
}


@dataclass(frozen=True)
class DynamicsConfig:
    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(num_steps=250, clip_denoised=True))
    seeds: tuple[int, ...] = (0,)   # one chain per seed: x_T and sampler noise
    class_label: int = 0            # ignored by unconditional models
    sites: str = "blocks.*"         # which outputs; any site pattern of smoothness.hooks
    caption_embeds: Captions | None = None   # text-to-video models: the one caption every chain is conditioned on (a path is loaded)

    def __post_init__(self):
        object.__setattr__(self, "caption_embeds", Captions.of(self.caption_embeds))
        chain.check_seeds(self.seeds)
        if self.sampler.num_steps < 2:
            raise ValueError(f"num_steps={self.sampler.num_steps} leaves no consecutive steps; allowed: 2 or more")

    def to_json(self) -> str:
        return chain.config_json(self)


class _Tracker:
    """Observes block outputs; compares each with the same site's output at the previous step."""

    def __init__(self):
        self.prev: dict[str, torch.Tensor] = {}
        self.values: dict[tuple[str, int], tuple[float, float]] = {}   # (site, step) -> (rel_l2, 1 - cos)

    def __call__(self, h, ctx: hooks.HookContext):
        if ctx.cond_rows is not None:                                  # [cond; uncond]: keep the cond half
            h = h[: h.shape[0] // 2]
        v = h.detach().double().reshape(-1)                            # batch 1: the whole sample, flattened
        prev = self.prev.get(ctx.site)
        if prev is not None:
            d = torch.linalg.vector_norm(v - prev)
            rel = float(d / torch.linalg.vector_norm(prev).clamp_min(1e-300))
            cos = float(torch.nn.functional.cosine_similarity(v, prev, dim=0))
            self.values[(ctx.site, ctx.step)] = (rel, 1.0 - cos)
        self.prev[ctx.site] = v
        return None


def _site_index(site: str) -> int:
    m = re.fullmatch(r"blocks\.(\d+)", site)
    if not m:
        raise ValueError(f"site {site!r} is not a block output; allowed: blocks.{{i}} patterns")
    return int(m.group(1))


def compute(models, cfg: DynamicsConfig = DynamicsConfig(), log=None) -> xr.Dataset:
    """``change`` with dims (model, metric, block, step, seed); ``step`` starts at 2 and carries
    ``timestep`` and ``timestep_prev``. ``models``: {label: model} or a list of entries."""
    entries = chain.as_entries(models)
    diffusion = Diffusion.for_config(cfg.sampler)
    sites, captions = {}, cfg.caption_embeds
    for e in entries:                                                  # validate before any work
        sites[e.label] = hooks.resolve_sites(e.model, cfg.sites)
        [_site_index(s) for s in sites[e.label]]
        chain.labels(e.model, cfg.class_label, who=e.label, captions=captions)
    blocks = sorted({_site_index(s) for v in sites.values() for s in v})
    steps = list(range(2, cfg.sampler.num_steps + 1))
    data = np.full((len(entries), len(METRICS), len(blocks), len(steps), len(cfg.seeds)), np.nan)
    units = np.full((len(entries), len(blocks)), -1)
    for m, e in enumerate(entries):
        model = e.model.eval()
        for u in range(model.num_units):
            for i in model.unit_blocks(u):
                if i in blocks:
                    units[m, blocks.index(i)] = u
        for j, seed in enumerate(cfg.seeds):
            track = _Tracker()
            with torch.inference_mode(), hooks.inject(model, {s: track for s in sites[e.label]}):
                for _ in chain.reference_chain(model, diffusion, cfg.sampler, seed, cfg.class_label, captions=captions):
                    pass
            for (site, step), vals in track.values.items():
                data[m, :, blocks.index(_site_index(site)), step - 2, j] = vals
            if log:
                log(f"{e.label} seed {seed}: {len(track.values)} block changes")
    chain_t = diffusion.chain
    kinds = [[e.model.block_kind(i) if i < len(e.model.blocks) else "" for i in blocks] for e in entries]
    ds = xr.Dataset(
        {"change": (("model", "metric", "block", "step", "seed"), data,
                    {"long_name": "change of the block output between consecutive sampler steps", "units": "1"})},
        coords={"model": [e.label for e in entries], "metric": list(METRICS),
                "metric_long_name": ("metric", list(METRICS.values())),
                "block": ("block", blocks, {"long_name": "index into model.blocks"}),
                "unit": (("model", "block"), units, {"long_name": "unit holding the block (-1: none)"}),
                "kind": (("model", "block"), np.array(kinds, dtype=str)),
                "step": ("step", steps, {"long_name": "sampler iteration (1-based); compared with step - 1"}),
                "timestep": ("step", [chain_t[s - 1] for s in steps],
                             {"long_name": "DDPM timestep t on the 1000-step scale"}),
                "timestep_prev": ("step", [chain_t[s - 2] for s in steps],
                                  {"long_name": "timestep of the previous step"}),
                "seed": list(cfg.seeds)})
    ds.attrs.update(title="feature dynamics", config=cfg.to_json(), sites=cfg.sites, seeds=json.dumps(list(cfg.seeds)),
                    class_label=cfg.class_label, flatten="sample (all non-batch dims), conditional half",
                    **chain.sampler_attrs(cfg.sampler), **chain.provenance(entries),
                    **caption_attrs(cfg.caption_embeds))
    return ds


__getattr__ = moved_names(__name__, {"heatmap": "smoothness.plots.analysis:dynamics_heatmap"})
