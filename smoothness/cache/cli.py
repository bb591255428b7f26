"""Sweep caching methods on DiT models: quality against speed; or write a calibration file.

    python -m smoothness.cache                                  # bundled pair, every method (< 15 min, 2 cores)
    python -m smoothness.cache --methods skip-cache --intervals 2,3,4,5,6 --k 1,2,4
    python -m smoothness.cache --methods dbcache,magcache,skip-cache+taylor1 --resume
    python -m smoothness.cache --ckpt DiT-XL-2-skip.pt --num-sampling-steps 250 --cfg-scale 1.5
    python -m smoothness.cache --ckpt DiT-XL-2-skip.pt --vae path/to/sd-vae-ft-ema --preset dit-c2i   # pixel PSNR
    python -m smoothness.cache --ckpt DiT-XL-2-skip.pt --vae path/to/sd-vae-ft-ema --lpips lpips_alex.pth   # + LPIPS
    python -m smoothness.cache calibrate --model digits-skip-dit --out calibration.json

For every model and seed the uncached chain is the reference; every method and setting (static
methods: each interval, k and window; dynamic ones: their thresholds) starts from the same seed and
is compared with it: PSNR / SSIM / MSE of the final samples, per-step cosine similarity of the model
outputs, classifier accuracy and Frechet distance (digits models), calls computed and reused,
theoretical speedup (MACs of the calls made) and realized speedup (wall time). Calibrated methods
(magcache, teacache) get one calibration run per model and seed, recorded in the attributes. Writes
``<out>/<name>.nc`` (xarray, netCDF), ``<name>.png`` and ``<name>.html`` (quality against speedup,
Pareto front per model) and prints a table (``*``: on the Pareto front); ``<name>.partial.nc`` holds
the finished cells while it runs (``--resume`` continues from it). Flags follow DiT's ``sample.py``
where they overlap. Skip-Cache on a model without skip branches is left empty (NaN).
"""
from __future__ import annotations

import itertools
import re
import time
from dataclasses import replace
from pathlib import Path

import matplotlib.pyplot as plt
import torch
import xarray as xr

from .. import chain, devices, ranks
from ..chain import config_json
from ..cli import (add_model_args, add_sampler_args, check_name, check_out_folder, check_positive, check_sampler_flags,
                   model_names, official_sampler, parse_int_list, parser, path_arg, sampler_flags)
from ..cli import add_vae_args, check_vae_args, load_lpips, load_vae
from ..diffusion import SAMPLERS, Diffusion, SamplerConfig
from ..io_utils import (atomic_path, check_writable, fingerprint, guard_results, read_netcdf,
                        remove_stale_temporaries, run_name)
from ..models import Captions, bundled, family_of, sha256
from ..plots.cache import figure, figure_plotly
from .base import REGISTRY, CacheConfig
from .calibrate import BUDGETS, calibrate, load_calibration
from . import shards
from .schedule import preset
from .report import table
from .sweep import FORECAST_SPECS, SWEEP_METHODS, SweepConfig, parse_spec, sweep

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


def _threshold_help() -> str:
    """``dbcache 0.08, 0.16, 0.32; ...``: the dynamic methods' default thresholds, from the registry."""
    return "; ".join(f"{n} " + ", ".join(f"{d['threshold']:g}" for d in c.sweep)
                     for n, c in REGISTRY.items() if c.dynamic)


def _parser():
    d = SweepConfig()
    p = parser("python -m smoothness.cache", __doc__)
    a = p.add_argument
    add_model_args(p)
    a("--methods", default="all",
      help=f"comma-separated, from {', '.join(SWEEP_METHODS)}, or METHOD+FORECAST with FORECAST one of taylor1, "
           f"taylor2, foca (e.g. skip-cache+taylor1); 'all' is every method plus {', '.join(FORECAST_SPECS)} "
           "(default: all; none is the reference)")
    a("--thresholds", default=None, help="thresholds of the dynamic methods, comma-separated (default: each "
      f"method's own: {_threshold_help()})")
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
      "replaces --k, --windows, --stop-rule (and --intervals for the N spelling) (default: none)")
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
    a("--resume", action="store_true", help="skip the (model, method, setting, seed) cells already in "
      "<out>/<name>.partial.nc, which the sweep rewrites after every cell (default: start afresh)")
    a("--calibration", type=Path, default=None, metavar="FILE", help="a calibration file (python -m "
      "smoothness.cache calibrate) for the calibrated methods instead of a calibration run; one model only "
      "(default: calibrate once per model and seed)")
    ranks.add_args(p, "the (model, method, setting, seed) cells")
    devices.add_args(p, "bfloat16 runs every chain under bf16 autocast")
    add_sampler_args(p)
    add_vae_args(p, lpips=True)
    return p


def _grid(args):
    """(methods, intervals, ks, windows, stop_inclusive) from the flags, the preset applied."""
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise ValueError(f"--methods {args.methods!r} is empty; allowed: all, {', '.join(SWEEP_METHODS)}")
    if methods == ["all"]:
        methods = list(SWEEP_METHODS) + list(FORECAST_SPECS)
    for m in methods:
        try:
            parse_spec(m)
        except ValueError as e:
            raise ValueError(f"{e} (in --methods)") from None
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
    argv = list(argv) if argv is not None else None
    if argv and argv[0] == "calibrate":
        return calibrate_main(argv[1:])
    args = _parser().parse_args(argv)
    methods, intervals, ks, windows, stop_inclusive = _grid(args)
    thresholds = _floats(args.thresholds, "--thresholds") if args.thresholds is not None else []
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
    check_vae_args(args)
    torch.set_num_threads(args.threads)
    device = ranks.local_device(devices.check(args.device))
    out = check_writable(args.out)
    captions = Captions.of(args.caption_embeds)
    models = _load_models(names, args, captions, ks)
    vae = load_vae(args, models, device)
    lpips = load_lpips(args, models, vae, device)
    sampler = _sampler(args, models, captions)
    check_sampler_flags(given, sampler.cfg_scale)
    sampler = official_sampler(sampler, models.values(), given)
    cfg = SweepConfig(sampler=sampler, methods=methods, intervals=intervals, ks=ks,
                      windows=windows, seeds=seeds, classes=classes, per_class=args.per_class,
                      stop_inclusive=stop_inclusive, captions=captions, thresholds=thresholds, vae=vae,
                      lpips=lpips, dtype=args.dtype)
    if args.calibration is not None:
        cfg = replace(cfg, calibration=_checked_calibration(args.calibration, models, cfg))
    _run(args, names, models, cfg, out, _placed(models, args, device))


def _placed(models: dict, args, device: str) -> dict:
    """Put the models on ``device`` (the run's precision switches set), compiled with --compile;
    returns the device attributes of the result."""
    attrs = {**devices.setup(device, args.tf32), "compiled": int(args.compile)}
    for model in models.values():
        model.to(device)
        if args.compile:
            devices.compile_blocks(model)
    return attrs


def _run(args, names, models: dict, cfg: SweepConfig, out: Path, device_attrs: dict):
    """Name the result, refuse to replace another configuration's, sweep (resumably; this process's
    shard of the cells under --shard or torchrun, rank 0 merging), write."""
    shard, launched = ranks.from_args(args)
    sums = [sha256(bundled.weight_path(n) if n in bundled.BUNDLED else Path(n)) for n in names]
    name = args.name or run_name("cache_sweep", list(models), cfg.sampler.label)
    fp = fingerprint(config_json(cfg), names, sums)
    t0, cpu0 = time.time(), time.process_time()

    def part():
        stem = ranks.stem(name, shard)
        guard_results([out / f"{stem}.nc"], fp, args.overwrite)
        for stale in remove_stale_temporaries(out / f"{stem}{ext}" for ext in (".nc", ".partial.nc", ".png", ".html")):
            print(f"removed {stale}, left by an interrupted write")
        print(f"writing {out / stem}.nc" + (", .png and .html" if shard[1] == 1 else ""))
        with devices.out_of_memory(args.device, f"sampling {cfg.samples} samples per chain",
                                   "lower --per-class (or give fewer --classes / captions)"):
            ds = sweep(models, cfg, partial=out / f"{stem}.partial.nc", resume=args.resume, shard=shard)
        ds.attrs.update(device_attrs)
        ds.attrs.update(models=",".join(str(n) for n in names), sha256=",".join(sums), fingerprint=fp,
                        preset=args.preset or "", methods=",".join(cfg.methods), seconds_total=time.time() - t0,
                        cpu_seconds_total=time.process_time() - cpu0, **chain.sampler_attrs(cfg.sampler))
        captions = cfg.captions
        if captions is not None:
            ds.attrs.update(**captions.attrs(), captions=len(captions.embeds), caption_tokens=captions.embeds.shape[1])
            del ds.attrs["classes"]
        if shard[1] > 1:                                       # a whole run's partial goes once it is written
            save(ds, out / f"{stem}.nc")
            (out / f"{stem}.partial.nc").unlink(missing_ok=True)
        return ds

    ds = ranks.run(shard, launched, out=out, name=name, device=args.device, timeout_s=args.barrier_timeout,
                   before=lambda: guard_results([out / f"{name}.nc"], fp, args.overwrite), part=part,
                   merge=lambda files: shards.merge([read_netcdf(f, "shard file") for f in files],
                                                    [str(f) for f in files]))
    if ds is None:
        return
    paths = write(ds, out, name)
    (out / f"{name}.partial.nc").unlink(missing_ok=True)
    print(table(ds))
    print(f"{time.time() - t0:.0f}s; wrote " + ", ".join(str(p) for p in paths))


def save(ds: xr.Dataset, path: Path):
    """Write a sweep result atomically."""
    with atomic_path(path) as tmp:
        ds.to_netcdf(tmp, engine="h5netcdf")


def write(ds: xr.Dataset, out: Path, name: str) -> list[Path]:
    nc, png, html = out / f"{name}.nc", out / f"{name}.png", out / f"{name}.html"
    save(ds, nc)
    fig = figure(ds)
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    with atomic_path(html) as tmp:
        figure_plotly(ds).write_html(tmp, include_plotlyjs=True)
    return [nc, png, html]


def _floats(text: str, what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{what} {text!r} is not a comma-separated list of numbers") from None
    for v in values:
        if not v >= 0:
            raise ValueError(f"{what}: threshold {v:g} is not allowed; use a number >= 0 (0 computes every step)")
    if not values:
        raise ValueError(f"{what} is empty")
    return values


def _checked_calibration(path: Path, models: dict, cfg: SweepConfig):
    """The file, checked against the one model and the sweep's chain before any work."""
    if len(models) != 1:
        raise ValueError(f"--calibration fits one model; {len(models)} were given")
    cal = load_calibration(path)
    cal.check_model(next(iter(models.values())))
    chain = list(Diffusion.for_config(cfg.sampler).chain)
    if list(cal.timesteps) != chain or cal.cfg_scale != cfg.sampler.cfg_scale:
        raise ValueError(f"calibration file made for chain {cal.chain} with cfg {cal.cfg_scale:g}, but the sweep "
                         f"runs {cfg.sampler.label} with cfg {cfg.sampler.cfg_scale:g}; calibrate with the sweep's "
                         "sampler flags")
    return cal


def _calibrate_parser():
    p = parser("python -m smoothness.cache calibrate", "Write TeaCache coefficients, MagCache ratios and "
               "SmoothCache / cache-dit masks of one model from one uncached run, as one JSON.")
    add_model_args(p)
    a = p.add_argument
    d = SweepConfig()
    a("--num-sampling-steps", type=int, default=d.sampler.num_steps, help=f"(default: {d.sampler.num_steps})")
    a("--sampler", choices=list(SAMPLERS), default=d.sampler.sampler, help=f"(default: {d.sampler.sampler})")
    a("--cfg-scale", type=float, default=None, help="guidance (default: 3.0 for class-conditional models, else 1)")
    a("--seed", type=int, default=0, help="seed of the calibration run (default: 0)")
    a("--classes", default=None, help="class labels (default: 0..9 for class-conditional models)")
    a("--per-class", type=int, default=d.per_class, help=f"samples per class (default: {d.per_class})")
    a("--budgets", default=",".join(f"{b:g}" for b in BUDGETS),
      help="mask budgets: fractions of the steps computed, comma-separated (default: %(default)s)")
    a("--out", type=Path, default=Path("calibration.json"), help="the JSON file (default: calibration.json)")
    return p


def calibrate_main(argv=None):
    args = _calibrate_parser().parse_args(argv)
    budgets = _floats(args.budgets, "--budgets")
    for b in budgets:
        if not 0 < b <= 1:
            raise ValueError(f"--budgets: budget {b:g} is not allowed; use a fraction of the steps computed in (0, 1]")
    names = (args.model or []) + (args.ckpt or [])
    if len(names) != 1:
        raise ValueError(f"calibrate takes one model (--model or --ckpt), got {len(names)}")
    if args.per_class < 1:
        raise ValueError(f"--per-class={args.per_class} is not allowed; use a positive integer")
    check_writable(args.out.parent if str(args.out.parent) else Path("."))
    models = _load_models(names, args, None, [1])
    (label, model), = models.items()
    sampler = _sampler(args, models, None)
    y = None
    if model.config.num_classes:
        y = torch.tensor([c for c in parse_int_list(args.classes or "0,1,2,3,4,5,6,7,8,9", "--classes")
                          for _ in range(args.per_class)])
    shape = (len(y) if y is not None else 10 * args.per_class, *model.sample_shape())
    path = bundled.weight_path(names[0]) if names[0] in bundled.BUNDLED else Path(names[0])
    cal = calibrate(model, Diffusion.for_config(sampler), shape, y, sampler, seed=args.seed, budgets=budgets,
                    label=label, file_sha256=sha256(path))
    cal.save(args.out)
    print(f"wrote {args.out}: teacache {len(cal.teacache)} coefficients, magcache {len(cal.timesteps)} ratios per "
          f"half ({', '.join(cal.magcache)}), masks for budgets {', '.join(cal.masks)}")
