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

import argparse
import itertools
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from .. import chain, metrics
from ..cli import add_model_args, parse_int_list, run_cli
from ..diffusion import Diffusion, SamplerConfig
from ..io_utils import atomic_path, check_writable, versions
from . import flops
from .schedule import preset
from .skip_cache import METHODS, CacheConfig, apply_cache

SCORES = {  # variable: (long name, units)
    "psnr": ("PSNR against the uncached run, mean over samples", "dB"),
    "ssim": ("SSIM against the uncached run, mean over samples", "1"),
    "mse": ("MSE against the uncached run, mean over samples", "(data units)^2"),
    "accuracy": ("digits-classifier accuracy on the requested classes", "1"),
    "frechet": ("Frechet distance to real digits in classifier features", "1"),
    "full_steps": ("model calls computed in full", "1"),
    "cached_steps": ("model calls served from the cache", "1"),
    "theoretical_speedup": ("uncached MACs / cached MACs over the chain", "1"),
    "realized_speedup": ("uncached wall time / cached wall time", "1"),
    "call_speedup": ("steps x median full-call time / total call time, within the cached run "
                     "(insensitive to load drift between runs)", "1"),
    "seconds": ("wall time of the chain", "s"),
    "temporal_change_ratio": ("videos: frame-to-frame change of the cached run / of the uncached run, "
                              "mean over samples", "1"),
}


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


def run_chain(model, diffusion, shape, y, sampler, seed, config: CacheConfig | None):
    """(final samples (N, C, [F,] H, W), model outputs per step (S, N, C_out, [F,] H, W), seconds, state)."""
    outs, state = [], None
    start = time.perf_counter()
    with torch.inference_mode():
        if config is None:
            steps = list(diffusion.sample_steps(model, shape, y, sampler, seed=seed))
        else:
            with apply_cache(model, config) as state:
                steps = list(diffusion.sample_steps(model, shape, y, sampler, seed=seed))
    seconds = time.perf_counter() - start
    outs = torch.stack([s.model_output for s in steps])
    return steps[-1].x_next, outs, seconds, state


def sweep(models: dict, sampler: SamplerConfig, methods, intervals, ks, windows, seeds, classes, per_class,
          stop_inclusive=True, log=print, captions: torch.Tensor | None = None) -> xr.Dataset:
    """Run the grid on ``models`` ({label: model}); returns the labelled Dataset. Unconditional
    models (no class table, e.g. the video pair) draw ``len(classes) * per_class`` unlabelled samples;
    text-to-video models draw ``per_class`` videos for each of ``captions`` (N, L, C)."""
    diffusion = Diffusion.for_config(sampler)
    labels = torch.tensor([c for c in classes for _ in range(per_class)])
    wnames = [CacheConfig(t_stop=s, t_start=e, stop_inclusive=stop_inclusive).rule.window for s, e in windows]
    dims = ("model", "method", "interval", "k", "window", "seed")
    coords = {"model": list(models), "method": list(methods), "interval": list(intervals), "k": list(ks),
              "window": wnames, "seed": list(seeds)}
    size = [len(coords[d]) for d in dims]
    data = {v: np.full(size, np.nan) for v in SCORES}
    cos = np.full(size + [sampler.num_steps], np.nan)
    ref_vars = {v: np.full((len(models), len(seeds)), np.nan) for v in ("accuracy", "frechet", "seconds")}
    masks = np.full(size, "", dtype=object)
    clf = _classifier_or_none(models)
    for mi, (label, model) in enumerate(models.items()):
        tokens = None                                             # caption length, text-to-video only
        if chain.is_text(model):
            if captions is None:
                raise ValueError(f"{label} is a text-to-video model: give caption embeddings (--caption-embeds)")
            model.check_captions(captions)
            y, tokens = captions.repeat_interleave(per_class, dim=0), captions.shape[1]   # (N*per, L, C)
        else:
            y = labels if model.config.num_classes else None
        shape = (len(labels) if y is None else len(y), *model.sample_shape())
        rows = shape[0] * (2 if sampler.cfg_scale > 1 and y is not None else 1)
        with torch.inference_mode():                                  # warm-up: 3 real steps, untimed
            for i, _ in enumerate(diffusion.sample_steps(model, shape, y, sampler, seed=seeds[0])):
                if i == 2:
                    break
        skipped = set()
        for si, seed in enumerate(seeds):
            ref, ref_out, ref_sec, _ = run_chain(model, diffusion, shape, y, sampler, seed, None)
            ref_vars["seconds"][mi, si] = ref_sec
            if clf is not None and _is_digits(model):
                ref_vars["accuracy"][mi, si] = metrics.classifier_accuracy(ref, y, clf).item()
                ref_vars["frechet"][mi, si] = metrics.frechet_distance(ref, classifier=clf).item()
            log(f"{label} seed {seed}: uncached {sampler.num_steps} steps in {ref_sec:.1f}s")
            for (ai, method), (ni, n), (ki, k), (wi, (stop, start)) in itertools.product(
                    enumerate(methods), enumerate(intervals), enumerate(ks), enumerate(windows)):
                cfg = CacheConfig(method=method, interval=n, k=k, t_stop=stop, t_start=start,
                                  stop_inclusive=stop_inclusive)
                try:
                    cfg.check(model)
                except ValueError as e:
                    if method not in skipped:
                        log(f"  {label} {method}: skipped ({e})")
                        skipped.add(method)
                    continue
                at = (mi, ai, ni, ki, wi, si)
                if method == "fora" and ki > 0:                      # FORA does not use k: same run
                    for v in data:
                        data[v][at] = data[v][(mi, ai, ni, 0, wi, si)]
                    cos[at], masks[at] = cos[(mi, ai, ni, 0, wi, si)], masks[(mi, ai, ni, 0, wi, si)]
                    continue
                x, out, sec, state = run_chain(model, diffusion, shape, y, sampler, seed, cfg)
                data["psnr"][at] = metrics.psnr(x, ref, data_range=2.0).mean().item()
                side = min(x.shape[-2:])                              # 11-tap Gaussian window, or smaller
                win = min(11, side if side % 2 else side - 1)
                data["ssim"][at] = metrics.ssim(x, ref, data_range=2.0, win_size=win).mean().item()
                data["mse"][at] = metrics.mse(x, ref).mean().item()
                if x.dim() == 5:
                    data["temporal_change_ratio"][at] = (metrics.temporal_change(x)
                                                         / metrics.temporal_change(ref)).mean().item()
                cos[at] = torch.nn.functional.cosine_similarity(out.flatten(2).double(), ref_out.flatten(2).double(),
                                                                dim=2).mean(1).numpy()
                if clf is not None and _is_digits(model):
                    data["accuracy"][at] = metrics.classifier_accuracy(x, y, clf).item()
                    data["frechet"][at] = metrics.frechet_distance(x, classifier=clf).item()
                data["full_steps"][at], data["cached_steps"][at] = state.num_full, state.num_cached
                cost = flops.schedule_cost(model, cfg, diffusion.chain, batch=rows, caption_tokens=tokens)
                data["theoretical_speedup"][at] = cost.attrs["theoretical_speedup"]
                data["realized_speedup"][at] = ref_sec / sec
                full_calls = [c.seconds for c in state.calls if c.full]
                data["call_speedup"][at] = len(state.calls) * float(np.median(full_calls)) / sum(
                    c.seconds for c in state.calls)
                data["seconds"][at] = sec
                masks[at] = state.schedule.mask
                log(f"  {label} {cfg.name}: {state.num_full} full / {state.num_cached} cached, "
                    f"speedup {cost.attrs['theoretical_speedup']:.2f}x theoretical, {ref_sec / sec:.2f}x realized, "
                    f"PSNR {data['psnr'][at]:.2f} dB")
    ds = xr.Dataset({v: (dims, data[v], {"long_name": ln, "units": u}) for v, (ln, u) in SCORES.items()},
                    coords={**coords, "step": np.arange(1, sampler.num_steps + 1),
                            "timestep": ("step", diffusion.chain)})
    ds["step_cosine"] = (dims + ("step",), cos, {"long_name": "cosine similarity of model outputs to the "
                                                 "uncached run, mean over samples", "units": "1"})
    ds["realized_over_theoretical"] = (ds.realized_speedup / ds.theoretical_speedup).assign_attrs(
        long_name="realized speedup / theoretical speedup", units="1")
    ds["mask"] = (dims, masks.astype(str), {"long_name": "schedule actually run (F full, c cached)"})
    for v, arr in ref_vars.items():
        ds[f"reference_{v}"] = (("model", "seed"), arr, {"long_name": f"uncached run: {SCORES[v][0]}",
                                                         "units": SCORES[v][1]})
    ds.attrs.update(sampler=sampler.sampler, num_sampling_steps=sampler.num_steps, cfg_scale=sampler.cfg_scale,
                    clip_denoised=int(sampler.clip_denoised), classes=list(classes), per_class=per_class,
                    seeds=list(seeds), stop_inclusive=int(stop_inclusive), data_range=2.0,
                    torch_threads=torch.get_num_threads(), **{f"version_{k}": str(v) for k, v in versions().items()})
    return ds


def _is_digits(model) -> bool:
    from ..models.bundled import is_pixel_digits
    return is_pixel_digits(model)


def _classifier_or_none(models):
    if not any(_is_digits(m) for m in models.values()):
        return None
    from .. import classifier
    return classifier.load()


# ---------------------------------------------------------------- reporting
def table(ds: xr.Dataset) -> str:
    head = (f"{'model':<18}{'method':<12}{'N':>3}{'k':>3}  {'window':<14}{'full':>5}{'cached':>7}"
            f"{'theo x':>8}{'real x':>8}{'call x':>8}{'PSNR':>7}{'SSIM':>7}{'acc':>6}{'FD':>8}")
    lines = [head, "-" * len(head)]
    for m in ds.model.values:
        acc, fd = ds.reference_accuracy.sel(model=m).mean().item(), ds.reference_frechet.sel(model=m).mean().item()
        lines.append(f"{m:<18}{'none':<12}{'':>3}{'':>3}  {'':<14}{ds.sizes['step']:>5}{0:>7}{1:>8.2f}{1:>8.2f}{1:>8.2f}"
                     f"{'inf':>7}{1:>7.3f}{acc:>6.2f}{fd:>8.2f}")
        mean = ds.sel(model=m).mean("seed")
        for a, n, k, w in itertools.product(ds.method.values, ds.interval.values, ds.k.values, ds.window.values):
            r = mean.sel({"method": a, "interval": n, "k": k, "window": w})
            if np.isnan(r.psnr.item()):
                continue
            lines.append(f"{'':<18}{a:<12}{n:>3}{k:>3}  {w:<14}{r.full_steps.item():>5.0f}{r.cached_steps.item():>7.0f}"
                         f"{r.theoretical_speedup.item():>8.2f}{r.realized_speedup.item():>8.2f}"
                         f"{r.call_speedup.item():>8.2f}{r.psnr.item():>7.2f}"
                         f"{r.ssim.item():>7.3f}{r.accuracy.item():>6.2f}{r.frechet.item():>8.2f}")
    return "\n".join(lines)


def _points(ds: xr.Dataset):
    """(model, method, [(theoretical speedup, realized, psnr, label)]) for each series."""
    mean = ds.mean("seed")
    for m, a in itertools.product(ds.model.values, ds.method.values):
        sub = mean.sel({"model": m, "method": a})
        pts = []
        for n, k, w in itertools.product(ds.interval.values, ds.k.values, ds.window.values):
            r = sub.sel({"interval": n, "k": k, "window": w})
            if not np.isnan(r.psnr.item()):
                pts.append((r.theoretical_speedup.item(), r.realized_speedup.item(), r.psnr.item(),
                            f"N={n} k={k} {w}"))
        if pts:
            yield str(m), str(a), sorted(pts)


def chain_title(ds: xr.Dataset) -> str:
    """``DDPM-50, cfg 3.0``: the sweep's chain, from its attrs."""
    return f"{ds.attrs['sampler'].upper()}-{ds.attrs['num_sampling_steps']}, cfg {ds.attrs['cfg_scale']}"


def figure(ds: xr.Dataset):
    """Matplotlib: PSNR (y) against theoretical speedup (x), one line per model and method."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    colors = dict(zip(METHODS, ["C0", "C1", "C2", "C3", "C7"]))              # one colour per method
    lines = dict(zip([str(m) for m in ds.model.values], ["o-", "s--", "^:", "D-."]))   # one style per model
    for m, a, pts in _points(ds):
        ax.plot([p[0] for p in pts], [p[2] for p in pts], lines.get(m, "o-"), color=colors.get(a),
                label=f"{m} / {a}")
    ax.set_xlabel("theoretical speedup (MACs, x)")
    ax.set_ylabel("PSNR against uncached run (dB)")
    ax.set_title(f"{chain_title(ds)}, seeds {ds.attrs['seeds']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def figure_plotly(ds: xr.Dataset):
    import plotly.graph_objects as go
    fig = go.Figure()
    for m, a, pts in _points(ds):
        fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[2] for p in pts], mode="lines+markers",
                                 name=f"{m} / {a}", text=[f"{p[3]}<br>realized {p[1]:.2f}x" for p in pts]))
    fig.update_layout(xaxis_title="theoretical speedup (MACs, x)", yaxis_title="PSNR against uncached run (dB)",
                      title=f"quality vs speedup, {ds.attrs['sampler'].upper()}-{ds.attrs['num_sampling_steps']}")
    return fig


# ---------------------------------------------------------------------- CLI
def _parser():
    p = argparse.ArgumentParser(prog="python -m smoothness.cache", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    add_model_args(p)
    a("--methods", default="skip-cache,deep-reuse,delta,fora",
      help="comma-separated, from skip-cache, deep-reuse, delta, fora (default: all four; none is the reference)")
    a("--intervals", "--cache-interval", dest="intervals", default="2,3,4", help="N values (default: 2,3,4)")
    a("--k", default="2", help="units recomputed on each side, comma-separated (default: 2)")
    a("--windows", default="20-1000", help="STOP-START pairs: cache while STOP < t < START, comma-separated "
      "(default: 20-1000, the official DiT rule)")
    a("--stop-rule", choices=["le", "lt"], default="le", help="reset after t <= STOP (le, DiT) or t < STOP "
      "(lt, Latte c2v) (default: le)")
    a("--preset", default=None, help="official settings: dit-c2i (k=4, 20-1000, le), latte-c2v (k=1, 50-900, lt), "
      "latte-t2v (k=1, 50-700, le) or N<interval>-<start>-<stop>, e.g. N2-700-50; replaces --k, --windows, "
      "--stop-rule (and --intervals for the N spelling) (default: none)")
    a("--num-sampling-steps", type=int, default=50, help="(default: 50)")
    a("--sampler", choices=["ddpm", "ddim"], default="ddpm", help="(default: ddpm)")
    a("--cfg-scale", type=float, default=None, help="guidance >= 1 (default: 3.0, the digits setting, for "
      "class-conditional models; 7.5, the Latte pipeline's, for text-to-video; 1 for unconditional ones)")
    a("--seed", default="0", help="seeds, comma-separated (default: 0)")
    a("--classes", default=None, help="class labels (default: 0..9; not allowed for unconditional models)")
    a("--per-class", type=int, default=2, help="samples per class; unconditional models draw 10 x this many, "
      "text-to-video models this many per caption (default: 2)")
    a("--caption-embeds", type=Path, default=None, metavar="FILE",
      help="text-to-video checkpoints: caption embeddings (L, C) or (N, L, C), .pt or .safetensors; their "
           "sha256 goes into the attributes (default: none)")
    a("--threads", type=int, default=1, help="torch CPU threads (default: 1; the digits models are small, and "
      "one thread is robust on a shared CPU)")
    a("--out", type=Path, default=Path("results"), help="output folder (default: results/)")
    a("--name", default="cache_sweep", help="file stem inside --out (default: cache_sweep)")
    return p


def main(argv=None):
    from ..models import bundled
    args = _parser().parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS or m == "none":
            raise ValueError(f"unknown method {m!r} in --methods; allowed: skip-cache, deep-reuse, delta, fora")
    intervals, ks = parse_int_list(args.intervals, "--intervals"), parse_int_list(args.k, "--k")
    windows, seeds = parse_windows(args.windows), parse_int_list(args.seed, "--seed")
    if args.preset:
        k, rule = preset(args.preset, intervals[0])
        ks, windows, args.stop_rule = [k], [(rule.t_stop, rule.t_start)], "le" if rule.stop_inclusive else "lt"
        if re.match(r"N\d", args.preset):
            intervals = [rule.interval]
    classes = parse_int_list(args.classes or "0,1,2,3,4,5,6,7,8,9", "--classes")
    if args.per_class < 1:
        raise ValueError(f"--per-class={args.per_class} is not allowed; use a positive integer")
    if args.threads < 1:
        raise ValueError(f"--threads={args.threads} is not allowed; use a positive integer")
    torch.set_num_threads(args.threads)
    for n, k, (stop, start) in itertools.product(intervals, ks, windows):   # validate before any work
        CacheConfig(interval=n, k=k, t_stop=stop, t_start=start)
    out = check_writable(args.out)
    names = (args.model or []) + (args.ckpt or []) or list(bundled.DEFAULT_PAIR)
    captions = chain.load_captions(args.caption_embeds)
    models = {}
    for n in names:
        model = bundled.load(n, num_heads=args.num_heads).eval()
        chain.check_captions_for(model, captions, n)
        if captions is not None:
            if args.classes is not None:
                raise ValueError(f"--classes {args.classes} given, but {n} is conditioned on captions, not classes")
            models[bundled.label(n)] = model
            continue
        if not model.config.num_classes:
            if args.classes is not None:
                raise ValueError(f"--classes {args.classes} given, but {n} is unconditional (no class labels)")
            if args.cfg_scale not in (None, 1.0):
                raise ValueError(f"--cfg-scale {args.cfg_scale:g} needs a class-conditional model; {n} is "
                                 "unconditional (use 1)")
            models[bundled.label(n)] = model
            continue
        for y in classes:
            if not 0 <= y < model.config.num_classes:
                raise ValueError(f"class label {y} is not allowed; {n} has classes 0..{model.config.num_classes - 1}")
        models[bundled.label(n)] = model
    for model in models.values():
        for k in ks:
            CacheConfig(method="delta", k=k).check(model)        # k within half the depth, for every model
    if len(models) != len(names):
        raise ValueError(f"model labels must be distinct, got {names}")
    conditional = {bool(m.config.num_classes) for m in models.values()}
    if len(conditional) > 1:
        raise ValueError("mixing class-conditional and unconditional models in one sweep is not supported")
    default_cfg = 7.5 if captions is not None else 3.0 if conditional == {True} else 1.0
    cfg_scale = args.cfg_scale if args.cfg_scale is not None else default_cfg
    sampler = SamplerConfig(num_steps=args.num_sampling_steps, sampler=args.sampler, cfg_scale=cfg_scale)
    if any(bundled.is_pixel(m) for m in models.values()) and not all(
            bundled.is_pixel(m) for m in models.values()):
        raise ValueError("mixing pixel digits models with latent checkpoints in one sweep is not supported")
    if all(bundled.is_pixel(m) for m in models.values()):
        sampler = SamplerConfig(num_steps=sampler.num_steps, sampler=sampler.sampler, cfg_scale=sampler.cfg_scale,
                                clip_denoised=True)
    t0 = time.time()
    ds = sweep(models, sampler, methods, intervals, ks, windows, seeds, classes, args.per_class,
               stop_inclusive=args.stop_rule == "le", captions=captions)
    from ..models import sha256
    paths_ = [bundled.weight_path(n) if n in bundled.BUNDLED else Path(n) for n in names]
    ds.attrs.update(models=",".join(str(n) for n in names), sha256=",".join(sha256(p) for p in paths_),
                    preset=args.preset or "", methods=",".join(methods), seconds_total=time.time() - t0)
    if captions is not None:
        ds.attrs.update(**chain.caption_attrs(args.caption_embeds), captions=len(captions),
                        caption_tokens=captions.shape[1])
        del ds.attrs["classes"]
    paths = write(ds, out, args.name)
    print(table(ds))
    print(f"{time.time() - t0:.0f}s; wrote " + ", ".join(str(p) for p in paths))


def write(ds: xr.Dataset, out: Path, name: str) -> list[Path]:
    nc, png, html = out / f"{name}.nc", out / f"{name}.png", out / f"{name}.html"
    with atomic_path(nc) as tmp:
        ds.to_netcdf(tmp, engine="h5netcdf")
    fig = figure(ds)
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    with atomic_path(html) as tmp:
        figure_plotly(ds).write_html(tmp, include_plotlyjs=True)
    return [nc, png, html]


if __name__ == "__main__":
    sys.exit(run_cli(main))
