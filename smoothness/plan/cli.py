"""Plan a cache schedule from smoothness alone, and judge it against the references.

    python -m smoothness.plan --model digits-skip-dit --budget 2.0          # profile, calibrate, plan
    python -m smoothness.plan --ckpt my.pt --budget 2.0 --profile results/profile_my.nc
    python -m smoothness.plan profile --model digits-dit                    # the profile alone (cost printed)
    python -m smoothness.plan evaluate                                      # planner vs references, bundled pair

The planner writes ``<out>/plan_<model>.json`` (SmoothCache-style JSON: one 1/0 list, 1 = compute),
and prints the schedule as a mask string (F full, c cached), cache-dit's ``steps_computation_mask``,
k and the theoretical speedup. A profile is computed (and saved as ``<out>/profile_<model>.nc``)
unless ``--profile`` gives one; ``--calibration-from`` fits the smoothness-to-error map on another
model's profile. ``evaluate`` writes ``plan_evaluation_<pair>.nc``, ``.md`` (the table) and ``.png``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import torch
import xarray as xr

from .. import devices
from ..cli import add_model_args, parse_int_list
from ..diffusion import SAMPLERS, SamplerConfig
from ..io_utils import atomic_path, check_writable
from ..models import bundled, load_entries
from ..plots.plan import figure
from .evaluate import EvaluateConfig, evaluate, table
from .planner import METHODS, Calibration, PlanConfig, check_budget, plan
from .profile import ProfileConfig, check_profile, cost_line, profile

PAIRS = {"image": bundled.DEFAULT_PAIR, "video": bundled.VIDEO_PAIR}


def _chain_args(p, cfg_scale: float | None = 3.0):
    d = ProfileConfig()
    p.add_argument("--num-sampling-steps", type=int, default=d.sampler.num_steps,
                   help=f"sampler steps of the chain the schedule is for (default: {d.sampler.num_steps})")
    p.add_argument("--sampler", choices=SAMPLERS, default=d.sampler.sampler, help="(default: ddpm)")
    p.add_argument("--cfg-scale", type=float, default=cfg_scale,
                   help="classifier-free guidance (default: 3 for class-conditional models, 1 otherwise)")
    p.add_argument("--probes", type=int, default=d.probes, help=f"probe steps of the profile (default: {d.probes})")
    p.add_argument("--seeds", default=",".join(map(str, d.seeds)), help="profile chains (default: 0)")
    p.add_argument("--class-label", type=int, default=d.class_label, help=f"class of the profile chains "
                   f"(default: {d.class_label})")
    p.add_argument("--radius", type=float, default=d.radius, help=f"probe perturbation +-radius (default: {d.radius})")
    p.add_argument("--direction-seed", type=int, default=d.direction_seed, help="(default: 0)")
    p.add_argument("--calib-ks", default=",".join(map(str, d.calib_ks)), help="k of the calibration measurements "
                   "(default: 1,2)")
    p.add_argument("--calib-gaps", type=int, default=d.calib_gaps,
                   help=f"cached calls after each calibration fill (default: {d.calib_gaps})")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads, 0 = torch's default (default: 0)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--out", type=Path, default=Path("results"), help="output folder (default: results/)")


def _profile_config(args, conditional: bool) -> ProfileConfig:
    cfg = args.cfg_scale if args.cfg_scale is not None else (3.0 if conditional else 1.0)
    sampler = SamplerConfig(num_steps=args.num_sampling_steps, sampler=args.sampler, cfg_scale=cfg,
                            clip_denoised=True)
    return ProfileConfig(sampler=sampler, probes=args.probes, seeds=tuple(parse_int_list(args.seeds, "--seeds")),
                         class_label=args.class_label, radius=args.radius, direction_seed=args.direction_seed,
                         calib_ks=tuple(parse_int_list(args.calib_ks, "--calib-ks")), calib_gaps=args.calib_gaps)


def _threads(n: int, device: str = "cpu"):
    """Threads and device, checked before any model is loaded."""
    if n < 0:
        raise ValueError(f"--threads={n} is not allowed; use 0 or a positive integer")
    devices.check(device)
    if n:
        torch.set_num_threads(n)


def _placed(entries: list, device: str) -> list:
    """The entries' models on ``device`` (TF32 on for CUDA, as everywhere)."""
    devices.setup(device)
    for e in entries:
        e.model.to(device)
    return entries


def _one_model(args):
    names = (args.model or []) + (args.ckpt or [])
    if len(names) != 1:
        raise ValueError(f"give exactly one model (--model or --ckpt); got {len(names)}")
    return _placed(load_entries(names, num_heads=args.num_heads), args.device)[0]


def _save_profile(ds: xr.Dataset, out: Path, label: str) -> Path:
    path = out / f"profile_{label}.nc"
    with atomic_path(path) as tmp:
        ds.to_netcdf(tmp, engine="h5netcdf")
    return path


def main_plan(argv):
    d = PlanConfig()
    p = argparse.ArgumentParser(prog="python -m smoothness.plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--budget", type=float, required=True, help="theoretical speedup to reach (MACs), >= 1")
    p.add_argument("--method", choices=METHODS, default=d.method,
                   help="auto: skip-cache on a model with skips, fora without (default: auto)")
    p.add_argument("--max-run", type=int, default=d.max_run, help=f"cached steps in a row at most (default: {d.max_run})")
    p.add_argument("--profile", type=Path, help="a profile of this model (default: compute one)")
    p.add_argument("--calibration-from", type=Path, help="fit the error map on this profile (default: the model's own)")
    _chain_args(p, cfg_scale=None)
    args = p.parse_args(argv)
    if not args.budget >= 1:
        raise ValueError(f"--budget={args.budget!r} is not allowed; use a speedup >= 1")
    for f in (args.profile, args.calibration_from):
        if f is not None and not f.is_file():
            raise FileNotFoundError(f"profile {str(f)!r} does not exist")
    pcfg = PlanConfig(method=args.method, max_run=args.max_run)
    _threads(args.threads, args.device)
    out = check_writable(args.out)
    entry = _one_model(args)
    model, prof_cfg = entry.model.eval(), _profile_config(args, bool(entry.model.config.num_classes))
    method = pcfg.method_for(model)
    check_budget(model, args.budget, method, pcfg.ks_for(model), prof_cfg.sampler.num_steps, pcfg.max_run)
    if args.profile is not None:
        prof = xr.load_dataset(args.profile, engine="h5netcdf")
    else:
        prof = profile(entry, prof_cfg, log=print)
        print(f"  -> {_save_profile(prof, out, entry.label)}")
    check_profile(prof, entry, prof_cfg.sampler)
    print(cost_line(prof))
    calib = prof if args.calibration_from is None else xr.load_dataset(args.calibration_from, engine="h5netcdf")
    result = plan(model, prof, args.budget, Calibration.fit(calib), pcfg)
    print(result.summary())
    print(f"  cache-dit steps_computation_mask: {result.schedule.to_cache_dit()}")
    path = out / f"plan_{entry.label}.json"
    with atomic_path(path) as tmp:
        tmp.write_text(result.schedule.to_json() + "\n")
    print(f"  SmoothCache JSON -> {path}")


def main_profile(argv):
    p = argparse.ArgumentParser(prog="python -m smoothness.plan profile", description="Profile one model: "
                                "per-step, per-unit smoothness and feature dynamics, cost in forward passes.")
    add_model_args(p)
    _chain_args(p, cfg_scale=None)
    args = p.parse_args(argv)
    _threads(args.threads, args.device)
    out = check_writable(args.out)
    entry = _one_model(args)
    ds = profile(entry, _profile_config(args, bool(entry.model.config.num_classes)), log=print)
    print(cost_line(ds))
    print(f"  -> {_save_profile(ds, out, entry.label)}")


def main_evaluate(argv):
    d = EvaluateConfig()
    p = argparse.ArgumentParser(prog="python -m smoothness.plan evaluate",
                                description="The planner against the references on a bundled pair.")
    p.add_argument("--pair", choices=sorted(PAIRS), default="image", help="bundled pair (default: image)")
    p.add_argument("--budgets", default=",".join(f"{b:g}" for b in d.budgets), help="(default: 1.5,2,2.5)")
    p.add_argument("--eval-seeds", default=",".join(map(str, d.seeds)), help="(default: 1,2,3)")
    p.add_argument("--per-class", type=int, default=d.per_class, help=f"samples per class (default: {d.per_class})")
    p.add_argument("--references", default=",".join(d.references),
                   help=f"reference rows, from {', '.join(d.references)} (default: all)")
    p.add_argument("--max-run", type=int, default=PlanConfig().max_run, help="cached steps in a row at most "
                   f"(default: {PlanConfig().max_run})")
    _chain_args(p, cfg_scale=None)
    args = p.parse_args(argv)
    try:
        budgets = tuple(float(b) for b in args.budgets.split(","))
    except ValueError:
        raise ValueError(f"--budgets {args.budgets!r} is not a comma-separated list of numbers") from None
    prof = _profile_config(args, args.pair == "image")
    cfg = EvaluateConfig(budgets=budgets, seeds=tuple(parse_int_list(args.eval_seeds, "--eval-seeds")),
                         per_class=args.per_class, profile=prof, plan=PlanConfig(max_run=args.max_run),
                         references=tuple(r.strip() for r in args.references.split(",") if r.strip()))
    _threads(args.threads, args.device)
    out = check_writable(args.out)
    ds = evaluate(_placed(load_entries(list(PAIRS[args.pair])), args.device), cfg)
    write_evaluation(ds, out, f"plan_evaluation_{args.pair}")


def write_evaluation(ds: xr.Dataset, out: Path, name: str) -> list[Path]:
    paths = [out / f"{name}.nc", out / f"{name}.md", out / f"{name}.png"]
    with atomic_path(paths[0]) as tmp:
        ds.to_netcdf(tmp, engine="h5netcdf")
    text = table(ds)
    with atomic_path(paths[1]) as tmp:
        tmp.write_text(text + "\n")
    fig = figure(ds)
    with atomic_path(paths[2]) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    print(text)
    print("  -> " + ", ".join(map(str, paths)))
    return paths


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "profile":
        return main_profile(argv[1:])
    if argv and argv[0] == "evaluate":
        return main_evaluate(argv[1:])
    return main_plan(argv)


__all__ = ["main", "main_evaluate", "main_plan", "main_profile", "write_evaluation"]
