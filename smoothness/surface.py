"""Feature-smoothness surfaces (Skip-DiT, arXiv 2411.17616, Fig. 2) for any DiT.

    python -m smoothness.surface --step 250                 # bundled DiT vs Skip-DiT -> results/
    python -m smoothness.surface --steps 10,250 --grid=-0.2:0.2:21 --readout output,blocks.5
    python -m smoothness.surface --ckpt DiT-XL-2-256x256.pt --ckpt DiT-XL-2-skip.pt --dtype bfloat16

The model is perturbed along two random directions d1, d2 with strengths alpha and beta
(theta' = theta + alpha*d1 + beta*d2 in the default ``weights`` mode, with d1, d2 filter-normalized
so that alpha = 0.1 moves every weight row by 10 % of its norm). At each requested sampler step the
perturbed model's output (and any recorded site) is compared with the original's; the surface is
that similarity over the (alpha, beta) grid. ``local`` mode evaluates on the unperturbed chain's
x_t at that step; ``trajectory`` mode runs the perturbed model along the whole chain to the step.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from . import chain, hooks, similarity
from .diffusion import Diffusion, SamplerConfig
from .engine import GridEngine, Perturbation
from .evaluation import EVALUATIONS, chain_inputs, local, readout_sites, trajectory
from .perturb import Axis



@dataclass(frozen=True)
class SurfaceConfig:
    steps: tuple[int, ...] = (10, 250)       # sampler iterations, 1-based (the paper's DDPM steps 10 and 250)
    sampler: SamplerConfig = SamplerConfig(num_steps=250, clip_denoised=True)   # the unperturbed chain
    alpha: str = "-0.25:0.25:21"             # min:max:count; 0 is always added to the grid
    beta: str = "-0.25:0.25:21"
    perturbation: Perturbation = Perturbation()
    evaluation: str = "local"                # local | trajectory
    readouts: tuple[str, ...] = ("output",)  # "output" (the eps prediction, the paper's) and/or sites
    metric: str = "cosine"                   # cosine | rel_l2 | rel_l1
    flatten: str = "sample"                  # sample | token (see smoothness.similarity)
    seeds: tuple[int, ...] = (0,)            # one chain per seed; x_T and sampler noise from it
    class_label: int = 0                     # the class every chain is conditioned on
    caption_embeds: str = ""                 # text-to-video models: file with one caption's embeddings
    batch_size: int = 64                     # grid points per batched forward
    dtype: str = "float32"                   # float32 | bfloat16 (never float16 on CPU: ~300x slower)
    device: str = "cpu"

    def __post_init__(self):
        if self.evaluation not in EVALUATIONS:
            raise ValueError(f"unknown evaluation {self.evaluation!r}; allowed: {', '.join(EVALUATIONS)}")
        similarity.check(self.metric, self.flatten)
        Axis.parse(self.alpha, "alpha grid"), Axis.parse(self.beta, "beta grid")
        if not self.steps:
            raise ValueError("no steps requested")
        for s in self.steps:
            if not 1 <= s <= self.sampler.num_steps:
                raise ValueError(f"step {s} is outside the chain; allowed: 1..{self.sampler.num_steps} "
                                 f"(a {self.sampler.num_steps}-step {self.sampler.sampler.upper()} chain)")
        if not self.seeds:
            raise ValueError("no seeds requested")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} is not allowed; use a positive integer")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not allowed; use one of {', '.join(DTYPES)}")

    @property
    def alphas(self) -> np.ndarray:
        return Axis.parse(self.alpha, "alpha grid").values()

    @property
    def betas(self) -> np.ndarray:
        return Axis.parse(self.beta, "beta grid").values()

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class ModelEntry:
    label: str                  # coordinate on the "model" dim
    model: torch.nn.Module
    source: str = ""            # bundled name or checkpoint path
    sha256: str = ""


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
    from .io import surface_attrs
    diffusion = Diffusion.for_config(cfg.sampler)
    steps = sorted(cfg.steps)
    shape = (len(entries), len(steps), len(cfg.readouts), len(cfg.seeds), len(cfg.alphas), len(cfg.betas))
    long_name, units, _ = similarity.METRICS[cfg.metric]
    ds = xr.Dataset(
        {"surface": (("model", "step", "readout", "seed", "alpha", "beta"), np.full(shape, np.nan),
                     {"long_name": long_name, "units": units, "metric": cfg.metric})},
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
    ds.attrs.update(surface_attrs(entries, cfg))
    return ds


def compute(entries: list[ModelEntry], cfg: SurfaceConfig, *, partial: Path | None = None,
            resume_from: xr.Dataset | None = None, progress: bool = True, log=print) -> xr.Dataset:
    """Fill a surface Dataset, one chunk of grid points at a time, every step of a chunk together.
    After each chunk the partial result is saved to ``partial`` (atomically); ``resume_from`` skips
    the chunks already complete there. The chunk holding the origin always runs (it is the
    reference), and a chunk always runs whole, so a resumed result is bit-identical."""
    from tqdm.auto import tqdm

    from .io import save
    log = log or (lambda *_: None)
    ds = resume_from.copy(deep=True) if resume_from is not None else empty_dataset(entries, cfg)
    diffusion = Diffusion.for_config(cfg.sampler)
    points = _grid_points(cfg)
    chunks = _chunks(points, cfg.batch_size)
    steps = sorted(cfg.steps)
    values = np.ascontiguousarray(ds["surface"].values)     # (model, step, readout, seed, alpha, beta)
    ds["surface"].values = values
    cells = values.reshape(*values.shape[:4], -1)            # a view: grid points flattened, as ``points``
    done = lambda m, chunk: not np.isnan(cells[m][..., chunk]).any()
    bar = tqdm(total=len(entries) * len(chunks), disable=not progress, desc="surface", unit="chunk")
    captions = chain.load_captions(cfg.caption_embeds)
    for m, e in enumerate(entries):
        if all(done(m, chunk) for chunk in chunks):
            bar.update(len(chunks))
            continue
        c = e.model.config
        device, dtype = torch.device(cfg.device), DTYPES[cfg.dtype]
        e.model.to(device=device, dtype=dtype).eval()
        if not (c.num_classes or chain.is_text(e.model)) and cfg.sampler.cfg_scale != 1.0:
            raise ValueError(f"cfg_scale={cfg.sampler.cfg_scale:g} needs a conditional model; {e.label} is "
                             "unconditional (use a guidance scale of 1)")
        engine = GridEngine(e.model, cfg.perturbation)
        for r in readout_sites(cfg.readouts):
            hooks.resolve_sites(e.model, r)
        shape = (1, *e.model.sample_shape())
        y1 = chain.labels(e.model, cfg.class_label, 1, device, who=e.label, captions=captions,
                          dtype=dtype)                                   # None if unconditional
        with torch.inference_mode():
            if cfg.evaluation == "local":
                inputs = [chain_inputs(e, cfg, diffusion, seed, y1, shape, dtype) for seed in cfg.seeds]
            ref = {}
            for c_i, chunk in enumerate(chunks):
                if c_i > 0 and done(m, chunk):                          # chunk 0 holds the origin
                    bar.update(1)
                    continue
                coef = (torch.tensor(points[chunk, 0]), torch.tensor(points[chunk, 1]))
                if cfg.evaluation == "local":
                    data = local(e, cfg, diffusion, inputs, y1, coef, engine)
                else:
                    per_seed = [trajectory(e, cfg, diffusion, seed, y1, coef, engine, shape, dtype) for seed in cfg.seeds]
                    data = {k: torch.cat([d[k] for d in per_seed], dim=1) for k in per_seed[0]}
                origin = np.flatnonzero((points[chunk] == 0).all(axis=1))
                for s_i, step in enumerate(steps):
                    for r_i, r in enumerate(cfg.readouts):
                        feats = data[(r, step)]                          # (G, N, ...)
                        if not torch.isfinite(feats).all():
                            bad = chunk[int(torch.nonzero(~torch.isfinite(feats.flatten(1)).all(1))[0])]
                            raise ValueError(f"{e.label}: the perturbed model gave non-finite {r} at step {step} "
                                             f"(alpha={points[bad, 0]:g}, beta={points[bad, 1]:g}); "
                                             "use a smaller grid range")
                        if (r, step) not in ref:
                            ref[r, step] = feats[int(origin[0])]
                        cells[m, s_i, r_i][:, chunk] = similarity.compare(feats, ref[r, step], cfg.metric,
                                                                          cfg.flatten).numpy().T
                if partial is not None:
                    save(ds, partial)
                bar.update(1)
        for s_i in range(len(steps)):
            _summary(ds, m, s_i, log)
    bar.close()
    return ds


def _summary(ds: xr.Dataset, m: int, s: int, log):
    from .scores import smoothness_scores
    sub = ds.isel(model=[m], step=[s])
    sc = smoothness_scores(sub).isel(model=0, step=0).mean("seed")
    for r in ds.readout.values:
        v = sub["surface"].sel(readout=r).isel(model=0, step=0)
        log(f"{ds.model.values[m]} step {int(ds.step[s])} (t={int(ds.timestep[s])}) {r}: "
            f"{ds.attrs['metric']} min {float(v.min()):.4f} mean {float(v.mean()):.4f}; "
            f"mean deviation {float(sc['mean_deviation'].sel(readout=r)):.3g}, "
            f"total variation {float(sc['total_variation'].sel(readout=r)):.3g}, "
            f"curvature at origin {float(sc['curvature'].sel(readout=r)):.3g}")


# ----------------------------------------------------------------------------- CLI

def _parser():
    import argparse

    from .cli import add_model_args
    d = SurfaceConfig()
    p = argparse.ArgumentParser(prog="python -m smoothness.surface", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    add_model_args(p)
    a("--steps", "--step", dest="steps", default=None,
      help="sampler steps, 1-based, comma-separated (default: 10 and the last step, as the paper's "
           "DDPM steps 10 and 250)")
    a("--num-steps", type=int, default=d.sampler.num_steps, help=f"chain length (default: {d.sampler.num_steps})")
    a("--sampler", choices=["ddpm", "ddim"], default=d.sampler.sampler, help=f"(default: {d.sampler.sampler})")
    a("--grid", default=None, help=f"min:max:count for both alpha and beta (default: {d.alpha})")
    a("--alpha", default=None, help="alpha range min:max:count (default: --grid)")
    a("--beta", default=None, help="beta range min:max:count (default: --grid)")
    a("--mode", choices=["weights", "features", "latent"], default=d.perturbation.mode,
      help=f"where the perturbation goes (default: {d.perturbation.mode})")
    a("--site", default=None, help="site perturbed in --mode features, e.g. blocks.5 (default: none)")
    a("--params", default=d.perturbation.directions.params,
      help=f"parameters perturbed in --mode weights: blocks.*, blocks.0-6, skips.*, all, comma-separated "
           f"(default: {d.perturbation.directions.params})")
    a("--include-1d", action="store_true", help="also perturb biases and norm scales (default: off)")
    a("--norm", choices=["filter", "layer", "none"], default=d.perturbation.directions.norm,
      help=f"direction normalization (default: {d.perturbation.directions.norm})")
    a("--direction-seed", type=int, default=d.perturbation.directions.seed,
      help=f"seed of d1, d2 (default: {d.perturbation.directions.seed})")
    a("--readout", default=",".join(d.readouts), help="what is compared: output and/or sites such as blocks.5, "
      f"comma-separated (default: {','.join(d.readouts)})")
    a("--metric", choices=list(similarity.METRICS), default=d.metric, help=f"(default: {d.metric})")
    a("--flatten", choices=list(similarity.FLATTENS), default=d.flatten,
      help=f"compare whole samples or per token (default: {d.flatten})")
    a("--evaluation", choices=list(EVALUATIONS), default=d.evaluation,
      help=f"local: at the chain's x_t; trajectory: perturbed chain up to the step (default: {d.evaluation})")
    a("--seeds", "--seed", dest="seeds", default=",".join(map(str, d.seeds)),
      help=f"chain seeds (x_T and sampler noise), comma-separated (default: {','.join(map(str, d.seeds))})")
    a("--class-label", type=int, default=d.class_label, help=f"(default: {d.class_label})")
    a("--caption-embeds", default=d.caption_embeds, metavar="FILE",
      help="text-to-video checkpoints: one caption's embeddings (L, C) or (1, L, C), .pt or .safetensors, "
           "conditioning every chain (default: none)")
    a("--cfg-scale", type=float, default=d.sampler.cfg_scale, help=f"guidance >= 1 (default: {d.sampler.cfg_scale})")
    a("--device", default=d.device, help=f"(default: {d.device})")
    a("--dtype", choices=list(DTYPES), default=d.dtype, help=f"(default: {d.dtype})")
    a("--batch-size", type=int, default=d.batch_size,
      help=f"grid points per forward; in local mode each point carries every step's and seed's x_t "
           f"(x2 with CFG) as rows (default: {d.batch_size})")
    a("--out", type=Path, default=Path("results"), help="output folder (default: results/)")
    a("--name", default="surface", help="file stem inside --out (default: surface)")
    a("--resume", action="store_true", help="continue from <out>/<name>.partial.nc")
    return p


def config_from_args(args) -> SurfaceConfig:
    from .cli import parse_int_list
    from .perturb import DirectionSpec
    d = SurfaceConfig()
    grid = args.grid or d.alpha
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device!r} is not available here; allowed: cpu"
                         + (", cuda" if torch.cuda.is_available() else ""))
    pert = Perturbation(mode=args.mode, site=args.site,
                        directions=DirectionSpec(seed=args.direction_seed, norm=args.norm, params=args.params,
                                                 include_1d=args.include_1d))
    sampler = replace(d.sampler, num_steps=args.num_steps, sampler=args.sampler, cfg_scale=args.cfg_scale)
    steps = parse_int_list(args.steps, "--steps") if args.steps else [min(10, args.num_steps), args.num_steps]
    return SurfaceConfig(steps=tuple(sorted(set(steps))), sampler=sampler,
                         alpha=args.alpha or grid, beta=args.beta or grid, perturbation=pert,
                         evaluation=args.evaluation, readouts=tuple(r.strip() for r in args.readout.split(",") if r.strip()),
                         metric=args.metric, flatten=args.flatten,
                         seeds=tuple(parse_int_list(args.seeds, "--seeds")), class_label=args.class_label,
                         caption_embeds=args.caption_embeds,
                         batch_size=args.batch_size, dtype=args.dtype, device=args.device)


def load_entries(names: list[str], num_heads: int | None = None) -> list[ModelEntry]:
    from .models import bundled, sha256
    entries = []
    for n in names:
        model = bundled.load(n, num_heads=num_heads)
        path = bundled.weight_path(n) if n in bundled.BUNDLED else Path(n)
        entries.append(ModelEntry(bundled.label(n), model, str(n), sha256(path)))
    labels = [e.label for e in entries]
    if len(set(labels)) != len(labels):
        raise ValueError(f"model labels must be distinct, got {labels}")
    return entries


def write_figures(ds: xr.Dataset, out: Path, name: str) -> list[Path]:
    from . import plotting
    from .io_utils import atomic_path
    written = []
    for kind, suffix in (("3d", ""), ("contour", "_contour")):
        fig = plotting.surfaces(ds, kind=kind)
        path = out / f"{name}{suffix}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
        written.append(path)
    fig = plotting.heatmap(ds)
    path = out / f"{name}_heatmap.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    written.append(path)
    path = out / f"{name}.html"
    with atomic_path(path) as tmp:
        plotting.surfaces_plotly(ds).write_html(tmp, include_plotlyjs=True)
    written.append(path)
    return written


def main(argv=None):
    import time

    from . import io
    from .io_utils import check_writable
    from .models import bundled
    args = _parser().parse_args(argv)
    cfg = config_from_args(args)
    out = check_writable(args.out)
    names = (args.model or []) + (args.ckpt or []) or list(bundled.DEFAULT_PAIR)
    entries = load_entries(names, args.num_heads)
    captions = chain.load_captions(cfg.caption_embeds)
    for e in entries:                                   # validate every condition and site before any work
        chain.labels(e.model, cfg.class_label, 1, who=e.label, captions=captions)
        if cfg.perturbation.mode == "weights":
            GridEngine(e.model, cfg.perturbation)
        elif cfg.perturbation.site:
            hooks.resolve_sites(e.model, cfg.perturbation.site)
        for r in readout_sites(cfg.readouts):
            hooks.resolve_sites(e.model, r)
    partial, final = out / f"{args.name}.partial.nc", out / f"{args.name}.nc"
    resume_from = io.resumable(partial, empty_dataset(entries, cfg)) if args.resume else None
    if resume_from is not None:
        print(f"resuming from {partial}")
    t0 = time.time()
    ds = compute(entries, cfg, partial=partial, resume_from=resume_from)
    io.save(ds, final)
    partial.unlink(missing_ok=True)
    paths = [final] + write_figures(ds, out, args.name)
    print(f"done in {time.time() - t0:.0f}s: " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    import sys

    from .cli import run_cli
    sys.exit(run_cli(main))
