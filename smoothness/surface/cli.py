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
import time
from dataclasses import replace
from pathlib import Path

import matplotlib.pyplot as plt
import xarray as xr

from .. import chain, devices, hooks, ranks
from ..cli import (add_model_args, add_sampler_args, check_device, check_name, check_out_folder, check_sampler_flags,
                   model_names, official_sampler, parse_int_list, parser, path_arg, sampler_flags)
from ..diffusion import SAMPLERS
from ..io_utils import (atomic_path, check_writable, fingerprint, guard_results, remove_stale_temporaries,
                        run_name)
from ..models import Captions, load_entries
from ..plots import surfaces as plotting
from . import io, similarity
from .config import SurfaceConfig
from .dataset import chunk_plan, compute, empty_dataset, owned_chunks, sized_batch
from .engine import MODES, GridEngine, Perturbation
from .evaluation import EVALUATIONS, readout_sites
from .perturb import NORMS, Axis, DirectionSpec


def _parser():
    d = SurfaceConfig()
    p = parser("python -m smoothness.surface", __doc__)
    a = p.add_argument
    add_model_args(p)
    a("--steps", "--step", dest="steps", default=None,
      help="sampler steps, 1-based, comma-separated (default: 10 and the last step, as the paper's "
           "DDPM steps 10 and 250)")
    a("--num-steps", type=int, default=d.sampler.num_steps, help=f"chain length (default: {d.sampler.num_steps})")
    a("--sampler", choices=list(SAMPLERS), default=d.sampler.sampler, help=f"(default: {d.sampler.sampler})")
    a("--grid", default=None, help=f"min:max:count for both alpha and beta (default: {d.alpha})")
    a("--alpha", default=None, help="alpha range min:max:count (default: --grid)")
    a("--beta", default=None, help="beta range min:max:count (default: --grid)")
    a("--mode", choices=list(MODES), default=d.perturbation.mode,
      help=f"where the perturbation goes (default: {d.perturbation.mode})")
    a("--site", default=None, help="site perturbed in --mode features, e.g. blocks.5 (default: none)")
    a("--params", default=None,
      help=f"parameters perturbed in --mode weights: blocks.*, blocks.0-6, skips.*, all, comma-separated "
           f"(default: {d.perturbation.directions.params})")
    a("--include-1d", action="store_true", help="also perturb biases and norm scales (default: off)")
    a("--norm", choices=list(NORMS), default=None,
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
    a("--caption-embeds", default="", metavar="FILE",
      help="text-to-video checkpoints: one caption's embeddings (L, C) or (1, L, C), .pt or .safetensors, "
           "conditioning every chain (default: none)")
    a("--cfg-scale", type=float, default=d.sampler.cfg_scale, help=f"guidance >= 1 (default: {d.sampler.cfg_scale})")
    devices.add_args(p, "bfloat16 casts the model's weights (the perturbation is added in bf16)")
    a("--batch-size", type=int, default=None,
      help=f"grid points per forward; in local mode each point carries every step's and seed's x_t "
           f"(x2 with CFG) as rows (default: on cpu {d.batch_size}; on cuda as many as fit the free memory, "
           "measured on chunks of 1 and 2 points)")
    a("--max-memory", type=float, default=None, metavar="GIB",
      help="cuda: the memory budget that sizes --batch-size (default: the device's free memory, less 10%%)")
    a("--out", type=path_arg, default=Path("results"), help="output folder (default: results/)")
    a("--name", default=None, help="file stem inside --out (default: describes the run, e.g. "
      "surface_digits-dit_digits-skip-dit_step250)")
    a("--resume", action="store_true", help="continue from <out>/<name>.partial.nc")
    a("--overwrite", action="store_true", help="replace a finished result of a different configuration "
      "(default: refuse)")
    ranks.add_args(p, "the grid's chunks")
    add_sampler_args(p)
    return p


def config_from_args(args) -> SurfaceConfig:
    """The flags as a SurfaceConfig: grids parsed, the caption file loaded, once."""
    d = SurfaceConfig()
    grid = args.grid if args.grid is not None else str(d.alpha)
    check_device(args.device)
    weights_only = {"--norm": args.norm, "--params": args.params, "--include-1d": args.include_1d or None}
    for flag, value in weights_only.items():
        if value is not None and args.mode != "weights":
            raise ValueError(f"{flag} is a --mode weights setting; --mode {args.mode} does not use it")
    if args.site is not None and args.mode != "features":
        raise ValueError(f"--site {args.site!r} is only used by --mode features; --mode {args.mode} perturbs no site")
    dirs = d.perturbation.directions
    pert = Perturbation(mode=args.mode, site=args.site,
                        directions=DirectionSpec(seed=args.direction_seed, norm=args.norm or dirs.norm,
                                                 params=args.params or dirs.params, include_1d=args.include_1d))
    given = sampler_flags(args)
    check_sampler_flags(given, args.cfg_scale)
    sampler = replace(d.sampler, num_steps=args.num_steps, sampler=args.sampler, cfg_scale=args.cfg_scale, **given)
    steps = (parse_int_list(args.steps, "--steps") if args.steps is not None
             else [min(10, args.num_steps), args.num_steps])
    alpha = Axis.parse(args.alpha if args.alpha is not None else grid, "alpha grid")
    beta = Axis.parse(args.beta if args.beta is not None else grid, "beta grid")
    readouts = tuple(r.strip() for r in args.readout.split(",") if r.strip())
    if not readouts:
        raise ValueError(f"--readout {args.readout!r} is empty; give output and/or sites such as blocks.5")
    return SurfaceConfig(steps=tuple(sorted(set(steps))), sampler=sampler, alpha=alpha, beta=beta, perturbation=pert,
                         evaluation=args.evaluation,
                         readouts=readouts,
                         metric=args.metric, flatten=args.flatten,
                         seeds=tuple(parse_int_list(args.seeds, "--seeds", unique=True)), class_label=args.class_label,
                         caption_embeds=Captions.of(args.caption_embeds),
                         batch_size=d.batch_size if args.batch_size is None else args.batch_size, dtype=args.dtype,
                         device=ranks.local_device(args.device))


FIGURE_SUFFIXES = ("", "_contour", "_heatmap")


def output_paths(out: Path, name: str) -> list[Path]:
    """Every file a run named ``name`` writes into ``out``: the result, its partial file, the figures."""
    return [out / f"{name}.nc", out / f"{name}.partial.nc", out / f"{name}.html"] + [
        out / f"{name}{suffix}.png" for suffix in FIGURE_SUFFIXES]


def write_figures(ds: xr.Dataset, out: Path, name: str) -> list[Path]:
    """The 3D, contour and heatmap PNGs and the interactive HTML of a surface dataset."""
    written = []
    for suffix, fig in (("", plotting.surfaces(ds, kind="3d")), ("_contour", plotting.surfaces(ds, kind="contour")),
                        ("_heatmap", plotting.heatmap(ds))):
        path = out / f"{name}{suffix}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)
        written.append(path)
    path = out / f"{name}.html"
    with atomic_path(path) as tmp:
        plotting.surfaces_plotly(ds).write_html(tmp, include_plotlyjs=True)
    return written + [path]


def _validate(entries, cfg: SurfaceConfig):
    """Every condition, perturbed site and readout, for every model, before any work."""
    for e in entries:
        chain.labels(e.model, cfg.class_label, 1, who=e.label, captions=cfg.captions)
        if cfg.perturbation.mode == "weights":
            GridEngine(e.model, cfg.perturbation)
        elif cfg.perturbation.site:
            hooks.resolve_sites(e.model, cfg.perturbation.site)
        for r in readout_sites(cfg.readouts):
            hooks.resolve_sites(e.model, r)


def _check_memory_flags(args, device: str, shard):
    if args.compile and args.mode == "weights":
        raise ValueError("--compile is not allowed with --mode weights: the engine's per-point weights make every "
                         "compiled block recompile (torch falls back to eager after 8); use it with --mode features "
                         "or latent")
    if args.max_memory is not None:
        if args.batch_size is not None:
            raise ValueError("--max-memory sizes --batch-size; give one or the other")
        if not args.max_memory > 0:
            raise ValueError(f"--max-memory={args.max_memory:g} is not allowed; use a positive number of GiB")
        if not device.startswith("cuda"):
            raise ValueError("--max-memory sizes chunks from measured CUDA memory; on cpu give --batch-size")
    if shard[1] > 1 and args.batch_size is None and device.startswith("cuda"):
        raise ValueError("with --shard or torchrun on cuda give --batch-size: every shard must deal the same "
                         "chunks, and free memory differs between GPUs")


def _placed(entries, cfg: SurfaceConfig, args, partial: Path) -> tuple[SurfaceConfig, dict]:
    """Set the device's precision switches, compile with --compile, and size the chunks on cuda (a
    resumed run keeps the size its partial file was made with); (config, the result's device attributes)."""
    attrs = {**devices.setup(cfg.device, args.tf32), "compiled": int(args.compile)}
    if args.compile:
        for e in entries:
            devices.compile_blocks(e.model)
    if args.batch_size is None and cfg.device.startswith("cuda") and args.resume and partial.is_file():
        with xr.open_dataset(partial, engine="h5netcdf") as made:          # its attributes, not its cells
            cfg = replace(cfg, batch_size=int(json.loads(made.attrs["config"])["batch_size"]))
        print(f"{cfg.batch_size} grid points per chunk, as {partial} was made")
    elif args.batch_size is None and cfg.device.startswith("cuda"):
        budget = int(args.max_memory * 2 ** 30) if args.max_memory else int(0.9 * devices.free_bytes(cfg.device))
        cfg = replace(cfg, batch_size=sized_batch(entries, cfg, budget))
        print(f"{cfg.batch_size} grid points per chunk fit {budget / 2 ** 30:.1f} GiB on {cfg.device}")
    return cfg, attrs


def _no_folders(*paths):
    for path in paths:
        if path.exists() and not path.is_file():
            raise ValueError(f"{str(path)!r} is a folder, not a surface file; remove it or use another --name")


def _check_paths(args):
    """The output folder and name, before any work: a folder, a plain stem, files not folders (for a
    default name, once the models that name it are known)."""
    check_out_folder(args.out)
    if args.name is not None:
        check_name(args.name)
        _no_folders(args.out / f"{args.name}.partial.nc", args.out / f"{args.name}.nc")


def _run(entries, cfg: SurfaceConfig, args, out: Path, stem: str, fp: str, shard, device_attrs: dict) -> xr.Dataset:
    """Compute this process's part (resuming from its partial file) and save it as ``<stem>.nc``."""
    partial, final = out / f"{stem}.partial.nc", out / f"{stem}.nc"
    _no_folders(partial, final)
    guard_results([final], fp, args.overwrite)
    for stale in remove_stale_temporaries(output_paths(out, stem)):
        print(f"removed {stale}, left by an interrupted write")
    resume_from = io.resumable(partial, empty_dataset(entries, cfg)) if args.resume else None
    if resume_from is not None:
        if io.shard_of(resume_from, str(partial)) != shard:
            raise ValueError(f"{str(partial)!r} is shard {resume_from.attrs.get('shard', '0/1')}, not "
                             f"{shard[0]}/{shard[1]}; resume each shard with its own --shard")
        print(f"resuming from {partial}")
    if shard[1] > 1:
        owned = owned_chunks(len(chunk_plan(cfg)[1]), shard)
        print(f"shard {shard[0]}/{shard[1]}: {len(owned)} of {len(chunk_plan(cfg)[1])} chunks"
              + ("; nothing to do for this grid, waiting for the others" if not owned else ""))
    print(f"writing {final}" + (" and its figures" if shard[1] == 1 else ""))
    with devices.out_of_memory(cfg.device, f"evaluating {cfg.batch_size} grid points per chunk",
                               "lower --batch-size (or --max-memory)"):
        ds = compute(entries, cfg, partial=partial, resume_from=resume_from, shard=shard)
    ds.attrs.update(fingerprint=fp, **device_attrs)
    io.save(ds, final)
    partial.unlink(missing_ok=True)
    return ds


def main(argv=None):
    args = _parser().parse_args(argv)
    cfg = config_from_args(args)
    shard, launched = ranks.from_args(args)
    _check_memory_flags(args, cfg.device, shard)
    _check_paths(args)
    names = model_names(args)
    out = check_writable(args.out)
    entries = load_entries(names, args.num_heads)
    cfg = replace(cfg, sampler=official_sampler(cfg.sampler, [e.model for e in entries], sampler_flags(args)))
    cfg.check_size(len(entries))
    _validate(entries, cfg)
    name = args.name or run_name("surface", [e.label for e in entries], "step" + "-".join(map(str, cfg.steps)))
    cfg, device_attrs = _placed(entries, cfg, args, out / f"{ranks.stem(name, shard)}.partial.nc")
    fp = fingerprint(cfg.to_json(), [(e.source, e.sha256) for e in entries])
    t0 = time.time()

    def merged(files):
        ds = io.merge([io.load(f) for f in files], [str(f) for f in files])
        ds.attrs["fingerprint"] = fp
        io.save(ds, out / f"{name}.nc")
        return ds

    ds = ranks.run(shard, launched, out=out, name=name, device=cfg.device, timeout_s=args.barrier_timeout,
                   before=lambda: guard_results([out / f"{name}.nc"], fp, args.overwrite),
                   part=lambda: _run(entries, cfg, args, out, ranks.stem(name, shard), fp, shard, device_attrs),
                   merge=merged)
    if ds is None:
        return
    paths = [out / f"{name}.nc"] + write_figures(ds, out, name)
    print(f"done in {time.time() - t0:.0f}s: " + ", ".join(str(p) for p in paths))
