"""Regenerate every paper figure into ``figures/`` from the bundled models, each with its data.

    python -m smoothness.figures                       # all of them, default resolution (~17 min, 2 cores)
    python -m smoothness.figures --only a,e            # some of them
    python -m smoothness.figures --resolution paper    # finer grids, more seeds and settings (slow)
    torchrun --nproc-per-node 2 -m smoothness.figures  # figures dealt to ranks, longest first (also --shard i/n)

Every figure is written as ``<stem>.png`` with ``<stem>.nc`` (xarray, netCDF) beside it, and
``figures/README.md`` gets one line per figure naming the command and the paper figure it answers.
Every figure is drawn from the bundled pixel-space models, so ``--vae`` (decoding latents) does not
apply here and is refused; latent checkpoints are decoded by ``sample``, ``cache`` and ``correlate``.

    a  Fig. 2: surfaces of DiT against Skip-DiT at DDPM steps 10 and 250
    b  teaser (a): cosine similarity of cached and uncached outputs against the timestep
       (Skip-Cache on Skip-DiT; FORA and deep-reuse on DiT)
    c  quality against speedup across N and k for every method (both models)
    d  v1 Fig. 4: feature dynamics, blocks x timesteps
    e  smoothness against caching error, with Spearman / Pearson rho
    f  Jacobian spectral norms per unit and end to end
    g  Fig. 2 as drawn: Latte against Latte-skip, unconditional video, DDPM steps 10 and 250
    h  samples of the bundled video pair: frame strips and an animated GIF
    i  planned cache schedules against the best uniform one, the measured-error oracle and the dynamic
       caches (MagCache, TeaCache, dbcache, FirstBlockCache) tuned to the same budget
"""
from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
import xarray as xr

from . import data, metrics
from .analysis import correlate
from .analysis import dynamics as dyn
from .analysis import spectral as spec
from .cache.sweep import FORECAST_SPECS, SWEEP_METHODS, SweepConfig, sweep
from . import ranks
from .cli import add_vae_args, check_out_folder, check_positive, check_vae_args, parser, path_arg, run_cli
from .data.sample import generate
from .diffusion import SamplerConfig
from .io_utils import atomic_path, check_writable
from .models import bundled, load_entries
from .plots import surfaces as plotting
from .plots.analysis import correlation_scatter, dynamics_heatmap, spectral_norms
from .plan.evaluate import EvaluateConfig, evaluate
from .plots.cache import figure as quality_speedup
from .plots.cache import teaser as teaser_figure
from .plots.plan import figure as plan_figure
from .plots.samples import strip_figure, write_gif
from .surface import SurfaceConfig, compute
from .surface.perturb import Axis

PAPER = {
    "a": "Fig. 2 (v1): feature-smoothness surfaces, DiT vs Skip-DiT, DDPM steps 10 and 250",
    "b": "Teaser (a) (v4/v5): cached-vs-uncached output similarity against the timestep",
    "c": "Tab. 1-4 / App. Tab. 7-8 in miniature: fidelity against speedup for every cache and setting",
    "d": "Fig. 4 (v1): feature dynamics heat map, blocks x timesteps",
    "e": "the paper's thesis, measured: smoothness against caching error (rho)",
    "f": "v4/v5 spectral-norm argument: largest Jacobian singular value per unit and end to end",
    "g": "Fig. 2 (v1) as drawn: Latte vs Latte-skip, unconditional video, DDPM steps 10 and 250",
    "h": "samples of the bundled video pair (Latte, Latte-skip): frame strips, and one GIF per model beside them",
    "i": "beyond the paper: a cache schedule planned from smoothness alone against uniform schedules, the oracle "
         "and the dynamic caches tuned to the same budget",
}
STEMS = {"a": "fig_a_surfaces", "b": "fig_b_cache_similarity", "c": "fig_c_quality_speedup",
         "d": "fig_d_feature_dynamics", "e": "fig_e_smoothness_vs_caching", "f": "fig_f_spectral_norms",
         "g": "fig_g_video_surfaces", "h": "fig_h_video_samples",
         "i": "fig_i_planned_schedules"}


@dataclass(frozen=True)
class Resolution:
    grid: Axis                     # alpha and beta of (a)
    video_grid: Axis               # alpha and beta of (g)
    seeds: tuple[int, ...]         # chains of (a), (d), (f), (g)
    cache_steps: int               # chain of (b), (c): DDPM with this many steps, cfg 3
    intervals: tuple[int, ...]     # N of (b), (c)
    ks: tuple[int, ...]            # k of (b), (c)
    per_class: int                 # samples per digit class in (b), (c)
    corr_grid: Axis                # surfaces of (e)
    corr_seeds: tuple[int, ...]    # seeds of (e): the bootstrap resamples them
    corr_steps: tuple[int, ...]    # DDPM-250 steps of (e)
    spectral_steps: tuple[int, ...]
    spectral_iterations: int
    video_samples: int


RESOLUTIONS = {
    "default": Resolution(grid=Axis(-0.25, 0.25, 21), video_grid=Axis(-0.25, 0.25, 11), seeds=(0,), cache_steps=50,
                          intervals=(2, 3, 4), ks=(1, 2), per_class=1, corr_grid=Axis(-0.25, 0.25, 7),
                          corr_seeds=(0, 1, 2), corr_steps=(10, 50, 100, 150, 200, 250),
                          spectral_steps=(10, 100, 250), spectral_iterations=30, video_samples=6),
    "paper": Resolution(grid=Axis(-0.25, 0.25, 41), video_grid=Axis(-0.25, 0.25, 21), seeds=(0, 1, 2), cache_steps=50,
                        intervals=(2, 3, 4, 5, 6), ks=(1, 2, 3, 4), per_class=4, corr_grid=Axis(-0.25, 0.25, 11),
                        corr_seeds=tuple(range(8)), corr_steps=(10, 25, 50, 75, 100, 150, 200, 250),
                        spectral_steps=(10, 50, 100, 150, 200, 250), spectral_iterations=100, video_samples=10),
}
DIGITS = SamplerConfig(num_steps=250, clip_denoised=True)      # the surfaces' chain (DDPM-250)
GUESS_S = 60.0                                                 # seconds assumed for a figure the README has no time for
TEASER = dict(skip=("skip-cache",), plain=("fora", "deep-reuse"))


def _save(ds: xr.Dataset, fig, out: Path, stem: str) -> list[Path]:
    nc, png = out / f"{stem}.nc", out / f"{stem}.png"
    with atomic_path(nc) as tmp:
        ds.to_netcdf(tmp, engine="h5netcdf")
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return [nc, png]


# ------------------------------------------------------------------ figures
def surfaces(names, res: Resolution, grid: Axis, log):
    cfg = SurfaceConfig(steps=(10, 250), sampler=DIGITS, alpha=grid, beta=grid, seeds=res.seeds)
    ds = compute(load_entries(list(names)), cfg, progress=False, log=log)
    return ds, plotting.surfaces(ds, kind="3d")


def cache_sweep(models, res: Resolution, log):
    sampler = SamplerConfig(num_steps=res.cache_steps, cfg_scale=3.0, clip_denoised=True)
    cfg = SweepConfig(sampler=sampler, methods=SWEEP_METHODS + FORECAST_SPECS, intervals=res.intervals,
                      ks=res.ks, windows=((20, 1000),), seeds=(0,), classes=tuple(range(10)), per_class=res.per_class)
    return sweep(models, cfg, log=log)


def teaser(ds: xr.Dataset, skip_label: str, plain_label: str, interval: int = 2, k: int | None = None):
    """Cosine similarity to the uncached outputs against the timestep, one curve per (model, method)."""
    series = [(skip_label, m) for m in TEASER["skip"]] + [(plain_label, m) for m in TEASER["plain"]]
    return teaser_figure(ds, series, interval, k)


def dynamics(models, res: Resolution, log):
    ds = dyn.compute(models, dyn.DynamicsConfig(sampler=DIGITS, seeds=res.seeds), log=log)
    return ds, dynamics_heatmap(ds, "rel_l2")


def correlation(names, res: Resolution, log):
    surf = SurfaceConfig(steps=res.corr_steps, sampler=DIGITS, alpha=res.corr_grid, beta=res.corr_grid,
                         seeds=res.corr_seeds)
    ds = correlate.compute(load_entries(list(names)), correlate.CorrelateConfig(surface=surf), log=log)
    return ds, correlation_scatter(ds)


def spectral(models, res: Resolution, log):
    cfg = spec.SpectralConfig(steps=res.spectral_steps, sampler=DIGITS, seeds=res.seeds,
                              iterations=res.spectral_iterations)
    ds = spec.compute(models, cfg, log=log)
    return ds, spectral_norms(ds)


def video_samples(names, res: Resolution, out: Path, log):
    config = SamplerConfig(num_steps=250, clip_denoised=True)
    videos, paths = [], []
    for n in names:
        v = generate(bundled.load(n), [0], res.video_samples, config, seed=0)      # (S, 1, F, 16, 16)
        write_gif(v, out / f"{STEMS['h']}_{n}.gif", columns=min(5, res.video_samples))
        paths.append(out / f"{STEMS['h']}_{n}.gif")
        videos.append(v)
    stack = torch.stack(videos)                                                   # (M, S, 1, F, H, W)
    scores = [metrics.video_digit_scores(v) for v in videos]
    real = metrics.video_digit_scores(data.load_videos(res.video_samples, seed=0))
    per_model = lambda key, long_name: (("model",), [sc[key] for sc in scores], {"long_name": long_name, "units": "1",
                                                                                "real_test_videos": real[key]})
    ds = xr.Dataset({"video": (("model", "sample", "channel", "frame", "y", "x"), stack.numpy(),
                               {"long_name": "generated video", "units": "pixel value in [-1, 1]"}),
                     "digit": (("model", "sample", "frame"), torch.stack([sc["labels"] for sc in scores]).numpy(),
                               {"long_name": "digits classifier's label of the frame's 12x12 ink box"}),
                     "confidence": per_model("confidence", "mean top softmax probability per frame"),
                     "label_consistency": per_model("label_consistency",
                                                    "share of frames agreeing with their video's majority label")},
                    coords={"model": list(names), "sample": np.arange(stack.shape[1])},
                    attrs={"sampler": config.label, "clip_denoised": 1, "seed": 0, "unconditional": 1,
                           "scores": "smoothness.metrics.video_digit_scores; attribute real_test_videos: the "
                                     "same score of as many real test videos (data.load_videos seed 0)"})
    both = torch.cat([v for v in videos])
    fig = strip_figure(both, f"{' (top) / '.join(names)} (bottom): {config.label}, unconditional, seed 0")
    log(f"h: {len(names)} x {res.video_samples} videos; label consistency "
        + ", ".join(f"{n} {sc['label_consistency']:.2f}" for n, sc in zip(names, scores))
        + f" (real videos {real['label_consistency']:.2f})")
    return ds, fig, paths


# ------------------------------------------------------------------ README
def readme(done: dict[str, float], resolution: str) -> str:
    lines = ["# Figures", "",
             "Regenerated by `python -m smoothness.figures` (all) or `python -m smoothness.figures --only <letter>`",
             f"from the bundled models; this set at `--resolution {resolution}`. Each PNG has its data beside it as",
             "`.nc` (xarray/netCDF, every setting in the attributes). Times are wall seconds on the machine that",
             "made them.", "",
             "| | figure | data | answers | command | s |", "|---|---|---|---|---|---|"]
    for key in sorted(PAPER):
        stem = STEMS[key]
        t = f"{done[key]:.0f}" if key in done else "not run"
        lines.append(f"| {key} | [{stem}.png]({stem}.png) | [{stem}.nc]({stem}.nc) | {PAPER[key]} | "
                     f"`python -m smoothness.figures --only {key}` | {t} |")
    return "\n".join(lines) + "\n"


def _times(path: Path) -> dict[str, float]:
    """Times of figures already listed in an existing README (so --only keeps the others' lines)."""
    out = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            cells = [c.strip() for c in line.split("|")]
            if len(cells) > 6 and cells[1] in PAPER:
                try:
                    out[cells[1]] = float(cells[6])
                except ValueError:
                    pass
    return out


def deal(only: list[str], times: dict[str, float], n: int) -> list[list[str]]:
    """The letters each of n ranks / shards makes: b and c share one sweep, so they stay together;
    the groups go longest first (times from the README, else ``GUESS_S``) to the least-loaded rank,
    ties to the lowest rank. Every rank computes the same deal from the same README."""
    groups = [[k for k in ("b", "c") if k in only]] + [[k] for k in sorted(only) if k not in ("b", "c")]
    groups = [g for g in groups if g]
    cost = lambda g: sum(times.get(k, GUESS_S) for k in g)
    load, out = [0.0] * n, [[] for _ in range(n)]
    for g in sorted(groups, key=lambda g: (-cost(g), g)):
        r = min(range(n), key=lambda i: (load[i], i))
        load[r] += cost(g)
        out[r] += g
    return [sorted(letters) for letters in out]


def _write_readme(out: Path, done: dict[str, float], resolution: str):
    """Merge this process's times into the README as it is now (other ranks or shards write theirs)."""
    with atomic_path(out / "README.md") as tmp:
        tmp.write_text(readme({**_times(out / "README.md"), **done}, resolution))


# ------------------------------------------------------------------ CLI
def _refuse_vae(args):
    """--vae is checked like everywhere, then refused: every figure is drawn from pixel-space models."""
    check_vae_args(args)
    if args.vae is not None:
        raise ValueError(f"--vae {str(args.vae)!r} given, but every figure is drawn from the bundled pixel-space "
                         "models: they have no latents to decode; allowed: leave out --vae (latent checkpoints are "
                         "decoded by python -m smoothness.sample / cache / correlate --ckpt ... --vae)")


def main(argv=None):
    p = parser("python -m smoothness.figures", __doc__)
    p.add_argument("--only", default=",".join(sorted(PAPER)),
                   help=f"figures to make, comma-separated letters (default: all, {','.join(sorted(PAPER))})")
    p.add_argument("--resolution", choices=sorted(RESOLUTIONS), default="default",
                   help="default (~17 min on 2 cores) or paper (finer grids, more seeds; hours) (default: default)")
    p.add_argument("--out", type=path_arg, default=Path("figures"), help="output folder (default: figures/)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads, 0 = torch's default (default: 0)")
    add_vae_args(p)
    ranks.add_args(p, "the figures (b and c together; longest first, by the README's times)")
    args = p.parse_args(argv)
    _refuse_vae(args)
    only = [c.strip() for c in args.only.split(",") if c.strip()]
    bad = [c for c in only if c not in PAPER]
    if bad or not only:
        raise ValueError(f"unknown figure {bad[0] if bad else args.only!r} in --only; allowed: {', '.join(sorted(PAPER))}")
    check_positive(args.threads, "--threads", zero=True)
    check_out_folder(args.out)
    shard, launched = ranks.from_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = check_writable(args.out)
    mine = deal(only, _times(out / "README.md"), shard[1])[shard[0]]
    if shard[1] > 1:
        print(f"shard {shard[0]}/{shard[1]}: figures {', '.join(mine) or 'none (more shards than figures)'}")
    with ranks.process_group("cpu", args.barrier_timeout) if launched else contextlib.nullcontext():
        _make(mine, RESOLUTIONS[args.resolution], args.resolution, out)
        if launched:
            ranks.barrier(args.barrier_timeout)


def _make(only: list[str], res: Resolution, resolution: str, out: Path):
    """Draw the figures ``only`` into ``out``, each with its data, updating the README after each."""
    pair, video = bundled.DEFAULT_PAIR, bundled.VIDEO_PAIR
    models = {n: bundled.load(n).eval() for n in pair}
    log = lambda msg: print(f"  {msg}")
    done, sweep_ds = {}, None
    for key in sorted(only):
        t0 = time.time()
        print(f"({key}) {PAPER[key]}")
        if key == "a":
            ds, fig = surfaces(pair, res, res.grid, log)
        elif key in ("b", "c"):
            if sweep_ds is None:
                sweep_ds = cache_sweep(models, res, log)
            ds = sweep_ds
            if key == "b":
                fig = teaser(ds, pair[1], pair[0])
            else:
                fig = quality_speedup(ds)
        elif key == "d":
            ds, fig = dynamics(models, res, log)
        elif key == "e":
            ds, fig = correlation(pair, res, log)
        elif key == "f":
            ds, fig = spectral(models, res, log)
        elif key == "g":
            ds, fig = surfaces(video, res, res.video_grid, log)
        elif key == "i":
            ds = evaluate(load_entries(list(pair)), EvaluateConfig(), log=log)
            fig = plan_figure(ds)
        else:
            ds, fig, _ = video_samples(video, res, out, log)
        ds.attrs.update(figure=key, answers=PAPER[key], resolution=resolution,
                        command=f"python -m smoothness.figures --only {key} --resolution {resolution}")
        paths = _save(ds, fig, out, STEMS[key])
        done[key] = time.time() - t0
        print(f"    {done[key]:.0f}s -> " + ", ".join(str(q) for q in paths))
        _write_readme(out, done, resolution)


if __name__ == "__main__":
    sys.exit(run_cli(main))
