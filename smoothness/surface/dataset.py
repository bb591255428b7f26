"""Surfaces as labelled datasets: the grid plan, the empty dataset, and ``compute`` filling it one
chunk of grid points at a time (every requested step and seed of a chunk together), resumably."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import xarray as xr
from tqdm.auto import tqdm

from .. import chain, devices, hooks
from ..diffusion import Diffusion
from ..models import ModelEntry
from . import io, similarity
from .config import DTYPES, SurfaceConfig
from .engine import GridEngine
from .evaluation import chain_inputs, local, readout_sites, trajectory
from .scores import smoothness_scores

DIMS = io.DIMS


def _grid_points(cfg: SurfaceConfig) -> np.ndarray:
    """(P, 2) alpha-major points; the chunk holding the origin is evaluated first."""
    a, b = np.meshgrid(cfg.alphas, cfg.betas, indexing="ij")
    return np.stack([a.ravel(), b.ravel()], axis=1)


def _chunks(points: np.ndarray, size: int) -> list[np.ndarray]:
    idx = np.arange(len(points))
    chunks = [idx[i:i + size] for i in range(0, len(points), size)]
    origin = int(np.flatnonzero((points == 0).all(axis=1))[0])
    first = next(i for i, c in enumerate(chunks) if origin in c)
    return [chunks[first]] + chunks[:first] + chunks[first + 1:]


def empty_dataset(entries: list[ModelEntry], cfg: SurfaceConfig) -> xr.Dataset:
    cfg.check_size(len(entries))
    diffusion = Diffusion.for_config(cfg.sampler)
    steps = sorted(cfg.steps)
    shape = (len(entries), len(steps), len(cfg.readouts), len(cfg.seeds), len(cfg.alphas), len(cfg.betas))
    long_name, units, _ = similarity.METRICS[cfg.metric]
    ds = xr.Dataset(
        {"surface": (DIMS, np.full(shape, np.nan), {"long_name": long_name, "units": units, "metric": cfg.metric})},
        coords={
            "model": [e.label for e in entries],
            "step": ("step", steps, {"long_name": "sampler iteration (1-based)"}),
            "timestep": ("step", [diffusion.timestep_of(s) for s in steps],
                         {"long_name": "DDPM timestep t on the 1000-step scale"}),
            "readout": list(cfg.readouts),
            "seed": list(cfg.seeds),
            "alpha": ("alpha", cfg.alphas, {"long_name": "coefficient alpha (direction d1)", "units": "1"}),
            "beta": ("beta", cfg.betas, {"long_name": "coefficient beta (direction d2)", "units": "1"}),
        },
    )
    ds.attrs.update(io.surface_attrs(entries, cfg))
    return ds


def chunk_plan(cfg: SurfaceConfig) -> tuple[np.ndarray, list[np.ndarray]]:
    """(points (P, 2) alpha-major, chunks of point indices): the chunk holding the origin comes first."""
    points = _grid_points(cfg)
    return points, _chunks(points, cfg.batch_size)


def owned_chunks(n_chunks: int, shard: tuple[int, int] = (0, 1)) -> list[int]:
    """The chunks shard i of n fills: chunk c goes to shard c mod n (the deal depends on nothing else,
    so the merged shards equal one run bit for bit). Every shard also evaluates chunk 0, the reference."""
    i, n = shard
    return [c for c in range(n_chunks) if c % n == i]


def compute(entries: list[ModelEntry], cfg: SurfaceConfig, *, partial: Path | None = None,
            resume_from: xr.Dataset | None = None, progress: bool = True, log=print,
            shard: tuple[int, int] = (0, 1)) -> xr.Dataset:
    """Fill a surface Dataset, one chunk of grid points at a time, every step of a chunk together.
    After each chunk the partial result is saved to ``partial`` (atomically); ``resume_from`` skips
    the chunks already complete there. The chunk holding the origin always runs (it is the
    reference), and a chunk always runs whole, so a resumed result is bit-identical. ``shard``
    (i, n) fills only the chunks of ``owned_chunks`` and leaves the others NaN (see ``io.merge``)."""
    log = log or (lambda *_: None)
    ds = resume_from.copy(deep=True) if resume_from is not None else empty_dataset(entries, cfg)
    if shard[1] > 1:
        ds.attrs["shard"] = f"{shard[0]}/{shard[1]}"          # the partial file says which shard it is
    points, chunks = chunk_plan(cfg)
    owned = owned_chunks(len(chunks), shard)
    values = np.ascontiguousarray(ds["surface"].values)     # (model, step, readout, seed, alpha, beta)
    ds["surface"].values = values
    cells = values.reshape(*values.shape[:4], -1)            # a view: grid points flattened, as ``points``
    bar = tqdm(total=len(entries) * len(owned), disable=not progress, desc="surface", unit="chunk")
    for m, e in enumerate(entries):
        pending = [c for c in owned if np.isnan(cells[m][..., chunks[c]]).any()]
        if not pending:
            bar.update(len(owned))                           # every chunk of this shard done
            continue
        todo = [0] + [c for c in pending if c != 0]          # chunk 0 first: the reference
        _fill_model(e, cfg, points, [(c, chunks[c], c in owned) for c in todo], cells[m],
                    save=(lambda: io.save(ds, partial)) if partial is not None else None,
                    advance=bar.update, skipped=len(owned) - len(pending))
        if shard[1] == 1:
            for s_i in range(len(cfg.steps)):
                _summary(ds, m, s_i, log)
    bar.close()
    return ds


def _evaluator(e: ModelEntry, cfg: SurfaceConfig):
    """A function (alphas, betas) -> readouts {(readout, step): (G, N, ...)} of ``e`` at those grid
    points, with the model placed, checked and its unperturbed chains run once."""
    diffusion = Diffusion.for_config(cfg.sampler)
    device, dtype = torch.device(cfg.device), DTYPES[cfg.dtype]
    e.model.to(device=device, dtype=dtype).eval()
    if not (e.model.config.num_classes or chain.is_text(e.model)) and cfg.sampler.cfg_scale != 1.0:
        raise ValueError(f"cfg_scale={cfg.sampler.cfg_scale:g} needs a conditional model; {e.label} is "
                         "unconditional (use a guidance scale of 1)")
    engine, spec = GridEngine(e.model, cfg.perturbation), cfg.eval_spec
    for r in readout_sites(cfg.readouts):
        hooks.resolve_sites(e.model, r)
    shape = (1, *e.model.sample_shape())
    y1 = chain.labels(e.model, cfg.class_label, 1, device, who=e.label, captions=cfg.captions,
                      dtype=dtype)                                       # None if unconditional
    inputs = None
    if cfg.evaluation == "local":
        with torch.inference_mode():
            inputs = [chain_inputs(e.model, spec, diffusion, seed, y1, shape, dtype, e.label) for seed in cfg.seeds]

    def evaluate(alphas, betas):
        coef = (torch.as_tensor(alphas), torch.as_tensor(betas))
        with torch.inference_mode():
            if inputs is not None:
                return local(e.model, spec, diffusion, inputs, y1, coef, engine)
            per_seed = [trajectory(e.model, spec, diffusion, seed, y1, coef, engine, shape, dtype)
                        for seed in cfg.seeds]
            return {k: torch.cat([d[k] for d in per_seed], dim=1) for k in per_seed[0]}
    return evaluate


def _fill_model(e: ModelEntry, cfg: SurfaceConfig, points: np.ndarray, todo, cells: np.ndarray, save, advance,
                skipped: int):
    """Evaluate the chunks ``todo`` [(index, point indices, kept)] of one model into ``cells`` (step,
    readout, seed, point), saving after each kept one; chunk 0 (the origin's, the reference) is
    always the first of them, kept or not."""
    evaluate = _evaluator(e, cfg)
    advance(skipped)
    ref = {}
    for _, chunk, kept in todo:
        data = evaluate(points[chunk, 0], points[chunk, 1])
        _compare(e.label, cfg, data, ref, points, chunk, cells if kept else None)
        if kept:
            if save is not None:
                save()
            advance(1)


def sized_batch(entries: list[ModelEntry], cfg: SurfaceConfig, budget: int, measure=devices.peak_bytes) -> int:
    """Grid points per chunk that fit ``budget`` bytes: the peak memory of a chunk of 1 and of 2
    points of the real evaluation (``measure(device, fn)``), extrapolated linearly; the least over
    the models. Costs each model's unperturbed chains once more."""
    limit = len(_grid_points(cfg))
    sizes = []
    for e in entries:
        evaluate = _evaluator(e, cfg)
        peaks = [measure(cfg.device, lambda g=g: evaluate(np.zeros(g), np.zeros(g))) for g in (1, 2)]
        sizes.append(devices.fit_chunk(peaks[0], peaks[1], budget, limit))
    return min(sizes)


def _compare(label: str, cfg: SurfaceConfig, data, ref: dict, points: np.ndarray, chunk: np.ndarray,
             cells: np.ndarray | None):
    """Similarity of a chunk's readouts to the origin's (the first chunk sets ``ref``) into ``cells``
    (None: the chunk only gives the reference)."""
    origin = np.flatnonzero((points[chunk] == 0).all(axis=1))
    for s_i, step in enumerate(sorted(cfg.steps)):
        for r_i, r in enumerate(cfg.readouts):
            feats = data[(r, step)]                                      # (G, N, ...)
            if (r, step) not in ref and not torch.isfinite(feats[int(origin[0])]).all():
                raise ValueError(f"{label}: the unperturbed model gave non-finite {r} at step {step}; check the "
                                 "checkpoint's weights")
            if not torch.isfinite(feats).all():
                bad = chunk[int(torch.nonzero(~torch.isfinite(feats.flatten(1)).all(1))[0])]
                raise ValueError(f"{label}: the perturbed model gave non-finite {r} at step {step} "
                                 f"(alpha={points[bad, 0]:g}, beta={points[bad, 1]:g}); use a smaller grid range")
            if (r, step) not in ref:
                ref[r, step] = feats[int(origin[0])]
            if cells is None:
                continue
            cells[s_i, r_i][:, chunk] = similarity.compare(feats, ref[r, step], cfg.metric, cfg.flatten).numpy().T


def _summary(ds: xr.Dataset, m: int, s: int, log):
    sub = ds.isel(model=[m], step=[s])
    sc = smoothness_scores(sub).isel(model=0, step=0).mean("seed")
    for r in ds.readout.values:
        v = sub["surface"].sel(readout=r).isel(model=0, step=0)
        log(f"{ds.model.values[m]} step {int(ds.step[s])} (t={int(ds.timestep[s])}) {r}: "
            f"{ds.attrs['metric']} min {float(v.min()):.4f} mean {float(v.mean()):.4f}; "
            f"mean deviation {float(sc['mean_deviation'].sel(readout=r)):.3g}, "
            f"total variation {float(sc['total_variation'].sel(readout=r)):.3g}, "
            f"curvature at origin {float(sc['curvature'].sel(readout=r)):.3g}")
