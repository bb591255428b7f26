"""Sweep caching methods on DiT models: quality against speed.

    python -m smoothness.cache                                  # bundled pair, default sweep (< 10 min, 2 cores)
    python -m smoothness.cache --methods skip-cache --intervals 2,3,4,5,6 --k 1,2,4
    python -m smoothness.cache --ckpt DiT-XL-2-skip.pt --num-sampling-steps 250 --cfg-scale 1.5

For every model and seed the uncached chain is the reference; every (method, interval, k, window) run
starts from the same seed and is compared with it: PSNR / SSIM / MSE of the final samples, per-step
cosine similarity of the model outputs, classifier accuracy and Frechet distance (digits models),
steps computed and reused, theoretical speedup (MACs) and realized speedup (wall time). Writes
``<out>/<name>.nc`` (xarray, netCDF), ``<name>.png`` and ``<name>.html`` (quality against speedup)
and prints a table. Flags follow DiT's ``sample.py`` where they overlap. Skip-Cache on a model
without skip branches is left empty (NaN): use deep-reuse there.
"""
from __future__ import annotations

import itertools
import re
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch
import xarray as xr

from .. import chain
from ..chain import config_json
from ..cli import (add_model_args, add_sampler_args, check_name, check_out_folder, check_positive, check_sampler_flags,
                   model_names, official_sampler, parse_int_list, parser, path_arg, sampler_flags)
from ..diffusion import SAMPLERS, SamplerConfig
from ..io_utils import (atomic_path, check_writable, fingerprint, guard_results, remove_stale_temporaries,
                        run_name)
from ..models import Captions, bundled, family_of, sha256
from ..plots.cache import figure, figure_plotly
from .base import CacheConfig
from .schedule import preset
from .sweep import SWEEP_METHODS, SweepConfig, sweep, table

__all__ = ["main", "parse_windows", "sweep", "table", "write"]


def parse_windows(text: str) -> list[tuple[int, int]]:
    """``"20-1000,50-700"`` -> [(20, 1000), (50, 700)]: cache while stop < t < start."""
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        try:
            stop, start = (int(v) for v in part.split("-"))
        except ValueError:
            raise ValueError(f"--windows entry {part!r} is not STOP-START, e.g. 20-1000") from None
        out.append((stop, start))
    if not out:
        raise ValueError("--windows is empty")
    return out


def _parser():
    d = SweepConfig()
    p = parser("python -m smoothness.cache", __doc__)
    a = p.add_argument
    add_model_args(p)
    a("--methods", default=",".join(SWEEP_METHODS),
      help=f"comma-separated, from {', '.join(SWEEP_METHODS)} (default: all four; none is the reference)")
    a("--intervals", "--cache-interval", dest="intervals", default=",".join(map(str, d.intervals)),
      help=f"N values (default: {','.join(map(str, d.intervals))})")
    a("--k", default=None,
      help=f"units recomputed on each side, comma-separated (default: {','.join(map(str, d.ks))})")
    a("--windows", default=None, help="STOP-START pairs: cache while STOP < t < START, comma-separated "
      "(default: 20-1000, the official DiT rule)")
    a("--stop-rule", choices=["le", "lt"], default=None, help="reset after t <= STOP (le, DiT) or t < STOP "
      "(lt, Latte c2v) (default: le)")
    a("--preset", default=None, help="official settings: dit-c2i (k=4, 20-1000, le), latte-c2v (k=1, 50-900, lt), "
      "latte-t2v (k=1, 50-700, le), hunyuan (k=1, 50-700, le) or N<interval>-<start>-<stop>, e.g. N2-700-50; "
      "replaces --k, --windows, "
      "--stop-rule (and --intervals for the N spelling) (default: none)")
    a("--num-sampling-steps", type=int, default=d.sampler.num_steps, help=f"(default: {d.sampler.num_steps})")
    a("--sampler", choices=list(SAMPLERS), default=d.sampler.sampler, help=f"(default: {d.sampler.sampler})")
    a("--cfg-scale", type=float, default=None, help="guidance >= 1 (default: 3.0, the digits setting, for "
      "class-conditional models; for caption-conditioned ones their authors' (Latte 7.5, HunYuan-DiT 6); 1 for "
      "unconditional ones)")
    a("--seed", default="0", help="seeds, comma-separated (default: 0)")
    a("--classes", default=None, help="class labels (default: 0..9; not allowed for unconditional models)")
    a("--per-class", type=int, default=d.per_class, help="samples per class; unconditional models draw 10 x this "
      f"many, text-to-video models this many per caption (default: {d.per_class})")
    a("--caption-embeds", type=path_arg, default=None, metavar="FILE",
      help="text-to-video checkpoints: caption embeddings (L, C) or (N, L, C), .pt or .safetensors; their "
           "sha256 goes into the attributes (default: none)")
    a("--threads", type=int, default=1, help="torch CPU threads (default: 1; the digits models are small, and "
      "one thread is robust on a shared CPU)")
    a("--out", type=path_arg, default=Path("results"), help="output folder (default: results/)")
    a("--name", default=None, help="file stem inside --out (default: describes the run, e.g. "
      "cache_sweep_digits-dit_digits-skip-dit_DDPM-50)")
    a("--overwrite", action="store_true", help="replace a finished result of a different configuration "
      "(default: refuse)")
    add_sampler_args(p)
    return p


def _grid(args):
    """(methods, intervals, ks, windows, stop_inclusive) from the flags, the preset applied."""
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise ValueError(f"--methods {args.methods!r} is empty; allowed: {', '.join(SWEEP_METHODS)}")
    for m in methods:
        if m not in SWEEP_METHODS:
            raise ValueError(f"unknown method {m!r} in --methods; allowed: {', '.join(SWEEP_METHODS)}")
    d = SweepConfig()
    intervals = parse_int_list(args.intervals, "--intervals", unique=True)
    ks = parse_int_list(args.k if args.k is not None else ",".join(map(str, d.ks)), "--k", unique=True)
    windows = parse_windows(args.windows if args.windows is not None else "20-1000")
    stop_rule = args.stop_rule or "le"
    if args.preset is not None:
        replaced = [f for f, v in (("--k", args.k), ("--windows", args.windows), ("--stop-rule", args.stop_rule))
                    if v is not None]
        if replaced:
            raise ValueError(f"--preset {args.preset!r} sets {', '.join(replaced)}; give one or the other")
        k, rule = preset(args.preset, intervals[0])
        ks, windows, stop_rule = [k], [(rule.t_stop, rule.t_start)], "le" if rule.stop_inclusive else "lt"
        if re.match(r"N\d", args.preset):
            intervals = [rule.interval]
    return methods, intervals, ks, windows, stop_rule == "le"


def _load_models(names, args, captions, ks) -> dict:
    """{label: model}, each checked against the captions, the classes, the guidance and every k."""
    models = {}
    for n in names:
        model = bundled.load(n, num_heads=args.num_heads).eval()
        chain.check_captions_for(model, captions, n)
        if captions is not None:
            if args.classes is not None:
                raise ValueError(f"--classes {args.classes} given, but {n} is conditioned on captions, not classes")
        elif not model.config.num_classes:
            if args.classes is not None:
                raise ValueError(f"--classes {args.classes} given, but {n} is unconditional (no class labels)")
            if args.cfg_scale not in (None, 1.0):
                raise ValueError(f"--cfg-scale {args.cfg_scale:g} needs a class-conditional model; {n} is "
                                 "unconditional (use 1)")
        else:
            for y in parse_int_list(args.classes or "0,1,2,3,4,5,6,7,8,9", "--classes"):
                if not 0 <= y < model.config.num_classes:
                    raise ValueError(f"class label {y} is not allowed; {n} has classes "
                                     f"0..{model.config.num_classes - 1}")
        models[bundled.label(n)] = model
    for model in models.values():
        for k in ks:
            CacheConfig(method="delta", k=k).check(model)        # k within half the depth, for every model
    if len(models) != len(names):
        raise ValueError(f"model labels must be distinct, got {names}")
    return models


def _sampler(args, models: dict, captions) -> SamplerConfig:
    """The chain: guidance by kind of model unless given, x0 clipped for the bundled pixel models."""
    conditional = {bool(m.config.num_classes) for m in models.values()}
    if len(conditional) > 1:
        raise ValueError("mixing class-conditional and unconditional models in one sweep is not supported")
    text_cfg = {family_of(m).cfg_scale for m in models.values()}        # its authors' guidance (HunYuan-DiT: 6)
    default_cfg = (text_cfg.pop() if len(text_cfg) == 1 else 7.5) if captions is not None else \
        3.0 if conditional == {True} else 1.0
    cfg_scale = args.cfg_scale if args.cfg_scale is not None else default_cfg
    pixel = [bundled.is_pixel(m) for m in models.values()]
    if any(pixel) and not all(pixel):
        raise ValueError("mixing pixel digits models with latent checkpoints in one sweep is not supported")
    return SamplerConfig(num_steps=args.num_sampling_steps, sampler=args.sampler, cfg_scale=cfg_scale,
                         clip_denoised=all(pixel))


def main(argv=None):
    args = _parser().parse_args(argv)
    methods, intervals, ks, windows, stop_inclusive = _grid(args)
    classes = parse_int_list(args.classes if args.classes is not None else "0,1,2,3,4,5,6,7,8,9", "--classes",
                             unique=True)
    seeds = parse_int_list(args.seed, "--seed", unique=True)
    check_positive(args.per_class, "--per-class")
    check_positive(args.threads, "--threads")
    check_out_folder(args.out)
    if args.name is not None:
        check_name(args.name)
    names = model_names(args)
    given = sampler_flags(args)
    SamplerConfig(num_steps=args.num_sampling_steps, sampler=args.sampler,      # the chain flags, checked early
                  cfg_scale=1.0 if args.cfg_scale is None else args.cfg_scale, **given)
    for n, k, (stop, start) in itertools.product(intervals, ks, windows):   # validate before any work
        CacheConfig(interval=n, k=k, t_stop=stop, t_start=start)
    torch.set_num_threads(args.threads)
    out = check_writable(args.out)
    captions = Captions.of(args.caption_embeds)
    models = _load_models(names, args, captions, ks)
    sampler = _sampler(args, models, captions)
    check_sampler_flags(given, sampler.cfg_scale)
    sampler = official_sampler(sampler, models.values(), given)
    cfg = SweepConfig(sampler=sampler, methods=methods, intervals=intervals, ks=ks,
                      windows=windows, seeds=seeds, classes=classes, per_class=args.per_class,
                      stop_inclusive=stop_inclusive, captions=captions)
    sums = [sha256(bundled.weight_path(n) if n in bundled.BUNDLED else Path(n)) for n in names]
    name = args.name or run_name("cache_sweep", list(models), cfg.sampler.label)
    fp = fingerprint(config_json(cfg), names, sums)
    guard_results([out / f"{name}.nc"], fp, args.overwrite)
    for stale in remove_stale_temporaries(out / f"{name}{ext}" for ext in (".nc", ".png", ".html")):
        print(f"removed {stale}, left by an interrupted write")
    print(f"writing {out / name}.nc, .png and .html")
    t0 = time.time()
    ds = sweep(models, cfg)
    ds.attrs.update(models=",".join(str(n) for n in names), sha256=",".join(sums), fingerprint=fp,
                    preset=args.preset or "", methods=",".join(methods), seconds_total=time.time() - t0,
                    **chain.sampler_attrs(sampler))
    if captions is not None:
        ds.attrs.update(**captions.attrs(), captions=len(captions.embeds), caption_tokens=captions.embeds.shape[1])
        del ds.attrs["classes"]
    paths = write(ds, out, name)
    print(table(ds))
    print(f"{time.time() - t0:.0f}s; wrote " + ", ".join(str(p) for p in paths))


def write(ds: xr.Dataset, out: Path, name: str) -> list[Path]:
    nc, png, html = out / f"{name}.nc", out / f"{name}.png", out / f"{name}.html"
    with atomic_path(nc) as tmp:
        ds.to_netcdf(tmp, engine="h5netcdf")
    fig = figure(ds)
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    with atomic_path(html) as tmp:
        figure_plotly(ds).write_html(tmp, include_plotlyjs=True)
    return [nc, png, html]
