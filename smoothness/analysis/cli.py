"""``python -m smoothness.correlate``: smoothness against caching quality, from the command line.

    python -m smoothness.correlate                         # bundled DiT and Skip-DiT -> results/ (~2.5 CPU-min)
    python -m smoothness.correlate --seeds 0,1,2,3,4 --grid=-0.25:0.25:11 --window 4
    python -m smoothness.correlate --ckpt DiT-XL-2-skip.pt --vae sd-vae-ft-ema   # window PSNR on decoded pixels

The CLI computes each model in its own process (``--jobs``, default 2: the bundled pair on two
cores), writes ``<name>.nc`` (this Dataset), ``<name>_surface.nc`` (the surfaces) and
``<name>.png`` (the scatter plot), and prints the table.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import matplotlib.pyplot as plt
import torch
import xarray as xr

from .. import chain, devices, ranks
from ..cache import CacheConfig
from ..cli import (add_model_args, add_sampler_args, add_vae_args, check_name, check_out_folder, check_positive,
                   check_sampler_flags, check_vae_args, load_vae, model_names, official_sampler, parse_int_list, parser,
                   path_arg, sampler_flags)
from ..diffusion import SAMPLERS, SamplerConfig
from ..io_utils import (atomic_path, check_writable, fingerprint, guard_results, remove_stale_temporaries,
                        run_name, stored_fingerprint)
from ..models import Captions, load_entries
from ..plots.analysis import correlation_scatter
from ..surface import SurfaceConfig, io
from ..surface import dataset as surface_dataset
from ..surface.perturb import Axis, DirectionSpec
from .caching_error import ERRORS, METHODS_OR_AUTO, caching_errors
from . import correlate
from .correlate import SCORES, CorrelateConfig, compute, table


def _parser():
    d = CorrelateConfig()
    s = d.surface
    about = correlate.__doc__.split("\n\n", 2)[2]            # the measurement, without the Python example
    p = parser("python -m smoothness.correlate", f"{__doc__}\n{about}")
    a = p.add_argument
    add_model_args(p)
    a("--steps", default=",".join(map(str, s.steps)), help=f"sampler steps, 1-based (default: {','.join(map(str, s.steps))})")
    a("--num-steps", type=int, default=s.sampler.num_steps, help=f"chain length (default: {s.sampler.num_steps})")
    a("--sampler", default=s.sampler.sampler, help=f"{' or '.join(SAMPLERS)} (default: {s.sampler.sampler})")
    a("--cfg-scale", type=float, default=s.sampler.cfg_scale, help=f"guidance >= 1 (default: {s.sampler.cfg_scale})")
    a("--seeds", default=",".join(map(str, s.seeds)), help=f"chain seeds (default: {','.join(map(str, s.seeds))})")
    a("--class-label", type=int, default=s.class_label, help=f"(default: {s.class_label})")
    a("--caption-embeds", default="", metavar="FILE",
      help="text-to-video checkpoints: one caption's embeddings (L, C) or (1, L, C), .pt or .safetensors, "
           "conditioning every chain (default: none)")
    a("--grid", default=str(s.alpha), help=f"min:max:count of alpha and beta (default: {s.alpha})")
    a("--direction-seed", type=int, default=s.perturbation.directions.seed,
      help=f"seed of the surface directions (default: {s.perturbation.directions.seed})")
    a("--method", default=d.method, help=f"{', '.join(METHODS_OR_AUTO)} (default: {d.method}: "
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
    a("--out", type=path_arg, default=Path("results"), help="output folder (default: results/)")
    a("--name", default=None, help="file stem inside --out (default: describes the run, e.g. "
      "correlate_digits-dit_digits-skip-dit)")
    a("--overwrite", action="store_true", help="replace a finished result of a different configuration "
      "(default: refuse)")
    add_sampler_args(p)
    ranks.add_args(p, "the models (dealt round-robin; run again without --shard to write the result)")
    devices.add_args(p, "bfloat16 casts the models' weights", compile_flag=False)
    add_vae_args(p)
    return p


def config_from_args(args) -> CorrelateConfig:
    """The flags as a CorrelateConfig: grid parsed, the caption file loaded, once."""
    d = CorrelateConfig()
    if args.score not in SCORES:
        raise ValueError(f"unknown --score {args.score!r}; allowed: {', '.join(SCORES)}")
    errors = list(ERRORS) + (["latent_psnr"] if args.vae is not None else [])
    if args.error not in errors:
        raise ValueError(f"unknown --error {args.error!r}; allowed: {', '.join(errors)}")
    check_vae_args(args)
    check_positive(args.threads, "--threads")
    check_positive(args.jobs, "--jobs")
    check_out_folder(args.out)
    if args.name is not None:
        check_name(args.name)
    given = sampler_flags(args)
    check_sampler_flags(given, args.cfg_scale)
    sampler = SamplerConfig(num_steps=args.num_steps, sampler=args.sampler, cfg_scale=args.cfg_scale,
                            clip_denoised=d.surface.sampler.clip_denoised, **given)
    pert = replace(d.surface.perturbation, directions=DirectionSpec(seed=args.direction_seed))
    grid = Axis.parse(args.grid, "alpha grid")
    surf = SurfaceConfig(steps=tuple(sorted(set(parse_int_list(args.steps, "--steps")))), sampler=sampler,
                         alpha=grid, beta=Axis.parse(args.grid, "beta grid"), perturbation=pert,
                         seeds=tuple(parse_int_list(args.seeds, "--seeds", unique=True)), class_label=args.class_label,
                         caption_embeds=Captions.of(args.caption_embeds), dtype=args.dtype,
                         device=ranks.local_device(devices.check(args.device)))
    return CorrelateConfig(surface=surf, method=args.method, k=args.k, lag=args.lag, window=args.window,
                           n_resamples=args.resamples, confidence=args.confidence, bootstrap_seed=args.bootstrap_seed)


def _one_model(name: str, num_heads, cfg: CorrelateConfig, threads: int):
    """Surfaces and caching errors of one model (a worker of ``main``; loads the model itself)."""
    torch.set_num_threads(threads)
    entries = load_entries([name], num_heads)
    for e in entries:
        e.model.to(cfg.surface.device)
    with devices.out_of_memory(cfg.surface.device, f"evaluating {cfg.surface.batch_size} grid points per chunk",
                               "lower --batch-size"):
        return (surface_dataset.compute(entries, cfg.surface, progress=False),
                caching_errors(entries, cfg.caching_error, log=print))


def part_path(out: Path, name: str, k: int) -> Path:
    """Model k's surfaces and caching errors (the work a rank or shard does; kept until the run is written)."""
    return out / f"{name}.model-{k}.nc"


def _save_part(path: Path, surfaces: xr.Dataset, errors: xr.DataArray, fp: str):
    with atomic_path(path) as tmp:
        surfaces.assign_attrs(fingerprint=fp).to_netcdf(tmp, engine="h5netcdf")
        errors.to_dataset(name="caching_error").to_netcdf(tmp, engine="h5netcdf", mode="a", group="caching_error")


def _load_part(path: Path, fp: str):
    """(surfaces, errors) of a part file made by this configuration, or None."""
    try:
        with xr.open_dataset(path, engine="h5netcdf") as f:
            surfaces = f.load()
        if surfaces.attrs.get("fingerprint") != fp:
            return None
        with xr.open_dataset(path, engine="h5netcdf", group="caching_error") as f:
            errors = f.load()["caching_error"]
    except FileNotFoundError:                      # not made yet, or removed by the shard that wrote the result
        return None
    del surfaces.attrs["fingerprint"]
    return surfaces, errors


def _run(names, num_heads, cfg: CorrelateConfig, args, out: Path, name: str, fp: str, mine):
    """Compute the models ``mine`` (indices into ``names``) whose part files are missing, in ``--jobs``
    processes (each model in its own), and save a part file per model."""
    todo = [k for k in mine if stored_fingerprint(part_path(out, name, k)) != fp]      # attributes only
    if len(todo) < len(mine):
        print(f"reusing {len(mine) - len(todo)} finished model(s) from {out}/{name}.model-*.nc")
    work = ([names[k] for k in todo], [num_heads] * len(todo), [cfg] * len(todo), [args.threads] * len(todo))
    if min(args.jobs, len(todo)) > 1:
        with ProcessPoolExecutor(min(args.jobs, len(todo)), mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(_one_model, *work))
    else:
        results = [_one_model(*w) for w in zip(*work)]
    for k, (surfaces, errors) in zip(todo, results):
        _save_part(part_path(out, name, k), surfaces, errors, fp)


def main(argv=None):
    args = _parser().parse_args(argv)
    cfg = config_from_args(args)
    names = model_names(args)
    out = check_writable(args.out)
    torch.set_num_threads(args.threads)
    entries = load_entries(names, args.num_heads)
    sampler = official_sampler(cfg.surface.sampler, [e.model for e in entries], sampler_flags(args))
    cfg = replace(cfg, surface=replace(cfg.surface, sampler=sampler))
    cfg = replace(cfg, vae=load_vae(args, {e.label: e.model for e in entries}))
    for e in entries:                                                  # validate before any work
        CacheConfig(method=cfg.method_for(e.model), k=cfg.k).check(e.model)
        chain.labels(e.model, cfg.surface.class_label, who=e.label, captions=cfg.surface.captions)
    name = args.name or run_name("correlate", [e.label for e in entries])
    surf_path, nc, png = out / f"{name}_surface.nc", out / f"{name}.nc", out / f"{name}.png"
    fp = fingerprint(cfg.to_json(), [(e.source, e.sha256) for e in entries])
    guard_results([nc], fp, args.overwrite)
    devices.setup(cfg.surface.device, args.tf32)
    for stale in remove_stale_temporaries([surf_path, nc, png] + [part_path(out, name, k) for k in range(len(names))]):
        print(f"removed {stale}, left by an interrupted write")
    shard, launched = ranks.from_args(args)
    mine = [k for k in range(len(names)) if k % shard[1] == shard[0]]      # models dealt round-robin
    t0 = time.time()
    if shard[1] > 1:
        print(f"shard {shard[0]}/{shard[1]}: model(s) {', '.join(entries[k].label for k in mine) or 'none'}"
              + ("" if mine else "; nothing to do, more shards than models"))
    with ranks.process_group(cfg.surface.device, args.barrier_timeout) if launched else contextlib.nullcontext():
        _run(names, args.num_heads, cfg, args, out, name, fp, mine)
        if launched:
            ranks.barrier(args.barrier_timeout)
    parts = [_load_part(part_path(out, name, k), fp) for k in range(len(names))]
    if launched and shard[0] != 0:
        return
    if any(p is None for p in parts):
        if stored_fingerprint(nc) == fp:
            print(f"shard {shard[0]}/{shard[1]} done; {nc} is already written (another shard finished last)")
            return
        missing = [entries[k].label for k, p in enumerate(parts) if p is None]
        print(f"shard {shard[0]}/{shard[1]} done in {time.time() - t0:.0f}s; {', '.join(missing)} not yet: when every "
              "shard is done, run this command again without --shard to write the result")
        return
    print(f"writing {nc}, {surf_path} and {png}")
    surfaces = xr.concat([p[0] for p in parts], dim="model", combine_attrs="override")
    surfaces.attrs.update(io.surface_attrs(entries, cfg.surface))
    errors = xr.concat([p[1] for p in parts], dim="model", combine_attrs="override")
    surfaces.attrs["fingerprint"] = fp
    io.save(surfaces, surf_path)
    ds = compute(entries, cfg, surfaces=surfaces, errors=errors)
    ds.attrs.update(seconds=time.time() - t0, jobs=args.jobs, torch_threads=args.threads, fingerprint=fp)
    with atomic_path(nc) as tmp:
        ds.to_netcdf(tmp, engine="h5netcdf")
    fig = correlation_scatter(ds, args.score, args.error)
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    for k in range(len(names)):
        part_path(out, name, k).unlink(missing_ok=True)
    print(table(ds))
    print(f"done in {time.time() - t0:.0f}s: {nc}, {surf_path}, {png}")
