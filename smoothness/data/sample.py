"""Sample a labelled grid from DiT models: the bundled pair by default, or any checkpoint.

    python -m smoothness.sample                                   # both bundled models, DDIM-50 -> results/
    python -m smoothness.sample --ddpm-250                        # the paper's chain, as the grids in figures/
    python -m smoothness.sample --model digits-skip-dit --cfg-scale 1.5 --seed 3
    python -m smoothness.sample --ckpt path/to/DiT-XL-2-256x256.pt --num-sampling-steps 50
    python -m smoothness.sample --ckpt Latte-skip.pt --caption-embeds prompts.pt \
        --sampler ddim --num-sampling-steps 50 --cfg-scale 7.5        # text-to-video, as the Latte pipeline

Flags follow facebookresearch/DiT's ``sample.py``. One row per class, ``--per-class`` columns; each
model's grid is ``<out>/samples_<label>_<chain>.png`` (e.g. ``samples_digits-dit_DDIM-50.png``), and a
file of another configuration is not replaced without ``--overwrite``.
Text-to-video checkpoints take precomputed caption embeddings (no text encoder is needed): one row
per caption, ``--per-class`` videos each, drawn as frame strips; the latents are also saved as
``samples_<label>_<chain>.pt`` (N, C, F, H, W) for decoding elsewhere.
Latent checkpoints (4 channels) are shown as their first latent channel, or, with ``--vae FOLDER``
(a local diffusers AutoencoderKL: sd-vae-ft-ema for DiT and Latte, sdxl-vae-fp16-fix for HunYuan-DiT),
as the decoded RGB images; videos are decoded frame by frame (``--vae-chunk`` frames per call).

    python -m smoothness.sample --ckpt DiT-XL-2-256x256.pt --vae sd-vae-ft-ema --classes 207,360 --cfg-scale 4
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from tqdm.auto import tqdm

from .. import chain, devices, metrics
from ..chain import config_json
from ..cli import (add_sampler_args, add_vae_args, check_out_folder, check_positive, check_sampler_flags,
                   check_vae_args, load_vae, model_names, official_sampler, parse_int_list, parser, path_arg, run_cli,
                   sampler_flags)
from ..diffusion import SAMPLERS, Diffusion, SamplerConfig
from ..io_utils import (
    atomic_path,
    check_writable,
    fingerprint,
    guard_results,
    remove_stale_temporaries,
)
from ..models import Captions, bundled
from ..plots.samples import grid_figure, strip_figure, write_gif

QUICK = SamplerConfig(num_steps=50, sampler="ddim", cfg_scale=3.0, clip_denoised=True)   # the default: a first command
PAPER = SamplerConfig(num_steps=250, sampler="ddpm", cfg_scale=3.0, clip_denoised=True)  # --ddpm-250: the committed grids

__all__ = ["generate", "generate_text", "grid_figure", "main", "score", "strip_figure", "write_gif"]


def _sample(model, shape, y, config: SamplerConfig, seed: int, bar=None) -> torch.Tensor:
    """``Diffusion.sample``, advancing the progress ``bar`` (tqdm) by one per sampler step."""
    x = None
    with torch.inference_mode():
        for rec in Diffusion.for_config(config).sample_steps(model, shape, y, config, seed=seed):
            x = rec.x_next
            if bar is not None:
                bar.update(1)
    return x.float().cpu()                                            # pictures and scores are drawn on the CPU


def generate(model, classes: list[int], per_class: int, config: SamplerConfig, seed: int, bar=None) -> torch.Tensor:
    """(len(classes) * per_class, *model.sample_shape()) samples, class-major, deterministic from
    ``seed``. Unconditional models draw as many samples, unlabelled. ``bar``: a progress bar (tqdm)
    advanced once per sampler step."""
    c = model.config
    for y in classes:
        if c.num_classes and not 0 <= y < c.num_classes:
            raise ValueError(f"class label {y} is not allowed; this model has classes 0..{c.num_classes - 1}")
    y = torch.tensor([k for k in classes for _ in range(per_class)])
    n = len(y)
    if not c.num_classes:
        y = None
        config = SamplerConfig(**{**config.__dict__, "cfg_scale": 1.0})     # nothing to guide
    return _sample(model, (n, *model.sample_shape()), y, config, seed, bar)


def generate_text(model, captions: torch.Tensor, per_caption: int, config: SamplerConfig, seed: int,
                  bar=None) -> torch.Tensor:
    """(len(captions) * per_caption, *model.sample_shape()) videos (C, F, H, W) or images (C, H, W),
    caption-major, deterministic from ``seed``. captions: (N, L, caption_channels); CFG's unconditional
    input is ``model.null_condition``."""
    model.check_captions(captions)
    y = captions.repeat_interleave(per_caption, dim=0)                   # (N*per, L, C)
    return _sample(model, (len(y), *model.sample_shape()), y, config, seed, bar)


def _parser():
    d = QUICK
    p = parser("python -m smoothness.sample", __doc__)
    p.add_argument("--model", action="append", metavar="NAME",
                   help=f"bundled model, repeatable (default: {' and '.join(bundled.DEFAULT_PAIR)})")
    p.add_argument("--ckpt", action="append", type=path_arg, metavar="PATH",
                   help="checkpoint path, repeatable; its model is built by config inference")
    p.add_argument("--num-heads", type=int, default=None, help="override heads for --ckpt (default: by width)")
    p.add_argument("--num-sampling-steps", type=int, default=None, help=f"(default: {d.num_steps})")
    p.add_argument("--sampler", choices=list(SAMPLERS), default=None, help=f"(default: {d.sampler})")
    p.add_argument("--ddpm-250", action="store_true", help=f"the paper's chain, {PAPER.label}, as the committed "
                   f"grids in figures/ (about 5x slower than the default {d.label})")
    p.add_argument("--cfg-scale", type=float, default=d.cfg_scale, help=f"guidance scale >= 1 (default: {d.cfg_scale})")
    p.add_argument("--classes", default=None, help="class labels, one row each (default: 0..9; not allowed for "
                   "unconditional models, which draw 10 x --per-class samples)")
    p.add_argument("--per-class", type=int, default=8, help="samples per class (default: 8)")
    p.add_argument("--seed", type=int, default=0, help="(default: 0)")
    p.add_argument("--out", type=path_arg, default=Path("results"), help="output folder (default: results/)")
    p.add_argument("--overwrite", action="store_true", help="replace samples of a different configuration "
                   "(default: refuse)")
    p.add_argument("--score-samples", type=int, default=0, metavar="N",
                   help="also draw N samples per model (classes balanced) and print the digits classifier's "
                        "accuracy and the Frechet distance to held-out digits; for the moving-digits video "
                        "models, N videos and the classifier's confidence and label consistency per frame "
                        "(default: 0, off)")
    p.add_argument("--batch-size", type=int, default=250, help="samples per batch when scoring (default: 250)")
    p.add_argument("--caption-embeds", type=path_arg, metavar="FILE",
                   help="caption embeddings (L, C) or (N, L, C), .pt or .safetensors, for text-to-video checkpoints")
    p.add_argument("--negative-embeds", metavar="FILE|learned",
                   help="negative-prompt embedding (L, C), the CFG unconditional input, or 'learned': the "
                        "checkpoint's caption_projection.y_embedding (PixArt's null caption) (default: zeros)")
    add_sampler_args(p)
    add_vae_args(p)
    devices.add_args(p, "bfloat16 samples under bf16 autocast")
    return p


def _load_models(args, captions, negative) -> list:
    """[(name, model)], each checked against the flags before any sampling."""
    models = [(n, bundled.load(n, num_heads=args.num_heads)) for n in model_names(args)]   # fail before any work
    for n, model in models:
        if args.score_samples:
            _check_scorable(model, n)
        if not model.config.num_classes and args.classes is not None:
            raise ValueError(f"--classes {args.classes} given, but {n} is unconditional (no class labels)")
    for name, model in models:
        chain.check_captions_for(model, captions, name)
        if captions is not None:
            model.set_negative_embeds(negative if isinstance(negative, str) else chain.embeds(negative))
    return models


def _draw(model, label: str, classes, args, config: SamplerConfig, captions, out: Path, fp: str, bar, vae=None):
    """Sample one model's grid (or strips) and write its pictures, decoded by ``vae`` if given;
    returns (samples, written paths)."""
    guidance = f"cfg {config.cfg_scale}" if model.config.num_classes or captions is not None else "unconditional"
    title = f"{label}: {config.label}, {guidance}, seed {args.seed}"
    stem = out / f"samples_{label}_{config.label}"
    written = []
    if captions is not None:
        samples = generate_text(model, captions.embeds, args.per_class, config, args.seed, bar)
        shown = samples if vae is None else vae.decode(samples)            # (N, 3, [F,] H', W') in [0, 1]
        frames = shown if shown.dim() == 5 else shown.unsqueeze(2)         # images: one frame per row
        fig = strip_figure(frames, title, pixel_range=False, rgb=vae is not None)
        with atomic_path(stem.with_suffix(".pt")) as tmp:
            torch.save(samples, tmp)
        written.append(stem.with_suffix(".pt"))
    else:
        samples = generate(model, classes, args.per_class, config, args.seed, bar)
        shown, rgb = (samples, False) if vae is None else (vae.decode(samples), True)
        if samples.dim() == 5:
            fig = strip_figure(shown, title, pixel_range=bundled.is_pixel(model), rgb=rgb)
            write_gif(shown, stem.with_suffix(".gif"), rgb=rgb)
            written.append(stem.with_suffix(".gif"))
        else:
            fig = grid_figure(shown, classes, title, rgb=rgb)
    with atomic_path(stem.with_suffix(".png")) as tmp:
        fig.savefig(tmp, dpi=120, format="png", metadata={"fingerprint": fp})
    plt.close(fig)
    return samples, [stem.with_suffix(".png")] + written


def _chain(args, given: dict) -> SamplerConfig:
    """The sampler: the quick default, ``--ddpm-250``, or what --sampler / --num-sampling-steps say;
    ``given``: the spacing and guidance flags the user set."""
    if args.ddpm_250 and (args.sampler is not None or args.num_sampling_steps is not None):
        raise ValueError("--ddpm-250 sets the chain; give it without --sampler / --num-sampling-steps")
    base = PAPER if args.ddpm_250 else QUICK
    return SamplerConfig(num_steps=base.num_steps if args.num_sampling_steps is None else args.num_sampling_steps,
                         sampler=args.sampler or base.sampler, cfg_scale=args.cfg_scale, clip_denoised=True, **given)


def _check_args(args):
    """Every flag on its own, before any model is loaded."""
    model_names(args)
    check_positive(args.per_class, "--per-class")
    check_positive(args.score_samples, "--score-samples", zero=True)
    check_positive(args.batch_size, "--batch-size")
    check_out_folder(args.out)
    if args.negative_embeds is not None and args.caption_embeds is None:
        raise ValueError("--negative-embeds needs --caption-embeds")
    if args.negative_embeds is not None and not args.negative_embeds.strip():
        raise ValueError("--negative-embeds '' is empty; give a file or learned")
    check_vae_args(args)


def main(argv=None):
    args = _parser().parse_args(argv)
    classes = parse_int_list(args.classes if args.classes is not None else "0,1,2,3,4,5,6,7,8,9", "--classes")
    _check_args(args)
    given = sampler_flags(args)
    check_sampler_flags(given, args.cfg_scale)
    config = _chain(args, given)
    captions = Captions.of(args.caption_embeds)
    negative = "learned" if args.negative_embeds == "learned" else Captions.of(args.negative_embeds)
    device = devices.check(args.device)
    out = check_writable(args.out)
    models = _load_models(args, captions, negative)
    vae = load_vae(args, dict(models), device)
    devices.setup(device, args.tf32)
    for _, model in models:
        model.to(device)
        if args.compile:
            devices.compile_blocks(model)
    jobs = []
    for name, model in models:                                   # every output checked before any sampling
        model_config = official_sampler(SamplerConfig(**{**config.__dict__, "clip_denoised": bundled.is_pixel(model)}),
                                        [model], given)
        label = bundled.label(name)
        png = out / f"samples_{label}_{model_config.label}.png"
        fp = fingerprint(config_json(model_config), classes, args.per_class, args.seed, name,
                         captions.sha256 if captions is not None else "",
                         negative if isinstance(negative, str) or negative is None else negative.sha256,
                         *([config_json(vae)] if vae is not None else []),
                         *([args.dtype] if args.dtype != "float32" else []))
        guard_results([png], fp, args.overwrite)
        remove_stale_temporaries(png.with_suffix(ext) for ext in (".png", ".gif", ".pt"))
        jobs.append((name, model, label, model_config, fp))
    for name, model, label, model_config, fp in jobs:
        print(f"{label}: {model_config.label} -> {out}/samples_{label}_{model_config.label}.png")
        t0 = time.time()
        with tqdm(total=model_config.num_steps, desc=label, unit="step") as bar, devices.autocast(device, args.dtype), \
                devices.out_of_memory(device, f"sampling {args.per_class} per class", "lower --per-class"):
            samples, paths = _draw(model, label, classes, args, model_config, captions, out, fp, bar, vae)
        print(f"{label}: {len(samples)} samples in {time.time() - t0:.1f}s -> " + ", ".join(map(str, paths)))
        if args.score_samples:
            score(label, model, args.score_samples, args.batch_size, model_config, args.seed)


def _check_scorable(model, label: str):
    if not (bundled.is_pixel_digits(model) or (bundled.is_pixel(model) and model.family == "latte"
                                               and not model.config.num_classes)):
        raise ValueError(f"--score-samples needs a bundled-data model (16x16, one channel: class-conditional "
                         f"digits or unconditional moving digits); {label} is not one")


def score(label, model, n: int, batch_size: int, config: SamplerConfig, seed: int):
    """Digits models: classifier accuracy and Frechet distance of ``n`` class-balanced samples.
    Moving-digits video models: ``metrics.video_digit_scores`` of ``n`` unconditional videos."""
    _check_scorable(model, label)
    t0 = time.time()
    video = model.family == "latte"
    if video:
        config = SamplerConfig(**{**config.__dict__, "cfg_scale": 1.0})     # unconditional: nothing to guide
    labels = torch.arange(n) % 10
    parts = []
    batches = range(0, n, batch_size)
    with tqdm(total=len(batches) * config.num_steps, desc=f"{label} scoring", unit="step") as bar:
        for i, start in enumerate(batches):
            rows = min(batch_size, n - start)
            y = None if video else labels[start:start + rows]
            parts.append(_sample(model, (rows, *model.sample_shape()), y, config, seed + 1000 + i, bar))
    samples = torch.cat(parts)
    how = f"({config.label}, cfg {config.cfg_scale}, seed {seed}, {time.time() - t0:.0f}s)"
    if video:
        sc = metrics.video_digit_scores(samples)
        print(f"{label}: {n} videos, classifier confidence {sc['confidence']:.3f}, frames with confidence >= 0.9 "
              f"{sc['confident_frames']:.3f}, label consistency {sc['label_consistency']:.3f}, digits covered "
              f"{sc['digits_covered']:.1f} " + how)
        return sc
    acc = float(metrics.classifier_accuracy(samples, labels))
    fd = float(metrics.frechet_distance(samples))
    print(f"{label}: accuracy {acc:.4f} on {n} samples, Frechet distance {fd:.3f} " + how)
    return acc, fd


if __name__ == "__main__":
    sys.exit(run_cli(main))
