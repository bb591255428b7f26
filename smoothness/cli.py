"""Shared CLI plumbing: user errors print one line and exit 2, never a traceback; the flags every
command shares. Core layer (it names the bundled models); only the commands import it."""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from .devices import check as check_device  # noqa: F401  (the commands' name for it)
from .diffusion import OFFICIAL, SPACINGS, SamplerConfig, official_sampling
from .models import Lpips, Vae, bundled
from .models.lpips import check_file as check_lpips_file
from .models.vae import DEFAULT_CHUNK, check_folder, check_latent

USER_ERRORS = (ValueError, FileNotFoundError, PermissionError)


def run_cli(main, argv=None) -> int:
    """Run a CLI ``main``; figures render off-screen (the library leaves the backend to the user, so
    notebooks keep their inline plots)."""
    import matplotlib
    matplotlib.use("Agg")
    try:
        main(argv)
    except USER_ERRORS as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)       # one line, always
        return 2
    except SystemExit as e:                       # argparse: usage errors (2) and --help (0)
        return e.code if isinstance(e.code, int) else 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """A usage error is one line naming the value, exit status 2 (argparse prints the usage too)."""
        print(f"error: {' '.join(message.split())} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """Every command's parser: no prefix abbreviations (``--interval`` is not ``--intervals``) and
    usage errors in one line."""
    return _Parser(prog=prog, description=doc, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter)


def parse_int_list(text: str, what: str, unique: bool = False) -> list[int]:
    """``"10,250"`` -> [10, 250]; a clear error otherwise (an empty list too: it never means the default)."""
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{what} {text!r} is not a comma-separated list of integers") from None
    if not vals:
        raise ValueError(f"{what} {text!r} is empty; give at least one integer")
    if unique and len(set(vals)) != len(vals):
        raise ValueError(f"{what} {text!r} repeats a value; give each once")
    return vals


def path_arg(text: str) -> Path:
    """argparse ``type`` of path flags: an empty value is an error, not the current folder
    (``Path("")`` is ``.``)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is empty; give a path")
    return Path(text)


def check_name(name: str, flag: str = "--name") -> str:
    """A file stem inside --out: not empty, no folder part (no escape from --out)."""
    if not name or not name.strip() or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ValueError(f"{flag} {name!r} is not allowed; use a plain file stem without folders, e.g. surface")
    return name


def check_out_folder(out: Path, flag: str = "--out") -> Path:
    """An output folder: not empty text and not an existing file (writability is checked by
    io_utils.check_writable just before any work)."""
    if not str(out).strip():
        raise ValueError(f"{flag} {str(out)!r} is empty; give a folder")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{flag} {str(out)!r} is an existing file, not a folder")
    return out


def check_positive(value, flag: str, zero: bool = False):
    """An integer >= 1 (>= 0 with ``zero``)."""
    if value < (0 if zero else 1):
        raise ValueError(f"{flag}={value} is not allowed; use {'0 or ' if zero else ''}a positive integer")
    return value


def check_finite(value: float, flag: str, positive: bool = True) -> float:
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{flag}={value} is not allowed; use a finite number{' > 0' if positive else ''}")
    return value


def add_model_args(parser):
    """The model-selection flags every CLI shares: --model, --ckpt, --num-heads."""
    parser.add_argument("--model", action="append", metavar="NAME",
                        help=f"bundled model, repeatable, one of {', '.join(bundled.diffusion_models())} "
                             f"(default: {' and '.join(bundled.DEFAULT_PAIR)})")
    parser.add_argument("--ckpt", action="append", metavar="PATH",
                        help="checkpoint path, repeatable; its model is built from its keys and shapes")
    parser.add_argument("--num-heads", type=int, default=None,
                        help="attention heads for --ckpt when the width is not an official size's "
                             "(default: from the official size of that width)")


def add_sampler_args(parser):
    """The chain flags every sampler-building CLI shares: --spacing, --steps-offset, --cfg-channels.
    Left out, each takes the official value of the models' family (``diffusion.OFFICIAL``)."""
    fam = "; ".join(f"{f}: {o['spacing']}" for f, o in OFFICIAL.items())
    parser.add_argument("--spacing", choices=list(SPACINGS), default=None,
                        help=f"timesteps the chain visits: even (IDDPM's create_diffusion), leading or trailing "
                             f"(diffusers) (default: the family's official one; {fam})")
    parser.add_argument("--steps-offset", type=int, default=None,
                        help="diffusers' steps_offset added to the leading chain; needs --spacing leading (default: 0)")
    chans = "; ".join(f"{f}: {o['cfg_channels'] or 'all'}" for f, o in OFFICIAL.items())
    parser.add_argument("--cfg-channels", default=None, metavar="N|all",
                        help=f"eps channels guided (at most the model's; the variance is never guided) (default: "
                             f"the family's official choice; {chans})")


def sampler_flags(args) -> dict:
    """The chain flags given on the command line, checked: {field: value} for SamplerConfig."""
    given = {}
    if args.spacing is not None:
        given["spacing"] = args.spacing
    if args.steps_offset is not None:
        if args.spacing != "leading":
            raise ValueError(f"--steps-offset {args.steps_offset} only applies with --spacing leading")
        given["steps_offset"] = args.steps_offset
    if args.cfg_channels is not None:
        text = args.cfg_channels.strip()
        if text == "all":
            given["cfg_channels"] = None
        else:
            try:
                given["cfg_channels"] = int(text)
            except ValueError:
                raise ValueError(f"--cfg-channels {args.cfg_channels!r} is not allowed; use a positive integer "
                                 "or all") from None
            if given["cfg_channels"] < 1:
                raise ValueError(f"--cfg-channels {args.cfg_channels!r} is not allowed; use a positive integer "
                                 "or all")
    return given


def check_sampler_flags(given: dict, cfg_scale: float):
    """--cfg-channels does nothing without guidance: refuse it rather than record it."""
    if "cfg_channels" in given and cfg_scale == 1.0:
        raise ValueError("--cfg-channels is for guided sampling; --cfg-scale is 1 (no guidance)")


def official_sampler(sampler: SamplerConfig, models, given: dict | None = None) -> SamplerConfig:
    """``sampler`` with the fields in ``given`` as given, and spacing, steps_offset and (when guided)
    cfg_channels from the official sampling of the models' family. Models of families that disagree
    need the setting given explicitly."""
    given = dict(given or {})
    families = sorted({m.family for m in models})
    fields = ("spacing", "steps_offset") + (("cfg_channels",) if sampler.cfg_scale != 1.0 else ())
    out = {}
    for key in fields:
        if key in given:
            out[key] = given[key]
            continue
        values = {f: official_sampling(f)[key] for f in families}
        if len(set(values.values())) > 1:
            flag = "--" + key.replace("_", "-")
            raise ValueError(f"the models' families sample with different {key} "
                             f"({', '.join(f'{f}: {v}' for f, v in values.items())}); choose one with {flag}")
        out[key] = next(iter(values.values()))
    if sampler.cfg_scale == 1.0:
        out["cfg_channels"] = None
    return SamplerConfig(**{**sampler.__dict__, **out})


def model_names(args) -> list[str]:
    """The models named by --model / --ckpt (default: the bundled pair), --num-heads checked: a
    positive count, and only with --ckpt (bundled models carry their own)."""
    if args.num_heads is not None:
        if args.num_heads < 1:
            raise ValueError(f"--num-heads={args.num_heads} is not allowed; use a positive integer")
        if not args.ckpt:
            raise ValueError(f"--num-heads {args.num_heads} is for --ckpt checkpoints; bundled models carry their own")
    for n in args.model or []:
        if n not in bundled.diffusion_models():
            raise ValueError(f"unknown model {n!r} for --model; allowed: {', '.join(bundled.diffusion_models())} "
                             "(checkpoint files go to --ckpt)")
    for c in args.ckpt or []:
        if not str(c).strip():
            raise ValueError(f"--ckpt {str(c)!r} is empty; give a checkpoint file")
    return list(args.model or []) + [str(c) for c in args.ckpt or []] or list(bundled.DEFAULT_PAIR)


def add_vae_args(parser, lpips: bool = False):
    """--vae, --vae-scale, --vae-chunk (and --lpips on commands that score fidelity): decode latent
    checkpoints' samples with a local diffusers AutoencoderKL (``models.vae``)."""
    parser.add_argument("--vae", type=path_arg, default=None, metavar="FOLDER",
                        help="a local diffusers AutoencoderKL folder (config.json + "
                             "diffusion_pytorch_model.safetensors), e.g. sd-vae-ft-ema: latent checkpoints' samples "
                             "are decoded to RGB and scored in pixel space (default: none; latents as they are)")
    parser.add_argument("--vae-scale", type=float, default=None, metavar="X",
                        help="latent scaling factor (default: the VAE config's scaling_factor: 0.18215 for the SD "
                             "VAEs, 0.13025 for SDXL's)")
    parser.add_argument("--vae-chunk", type=int, default=None, metavar="N",
                        help=f"frames (or images) per VAE decoder call: bounds memory (default: {DEFAULT_CHUNK})")
    if lpips:
        parser.add_argument("--lpips", type=path_arg, default=None, metavar="FILE",
                            help="with --vae: an LPIPS (AlexNet, v0.1) weights file, the full state dict of "
                                 "lpips.LPIPS(net='alex') (see models.lpips); adds the variable lpips, on decoded "
                                 "pixels against the uncached run (default: none)")


def check_vae_args(args):
    """The VAE flags on their own, before any model is loaded (the folder's files, not its weights)."""
    if getattr(args, "lpips", None) is not None:
        if args.vae is None:
            raise ValueError(f"--lpips {args.lpips} given without --vae; LPIPS compares RGB images, which only a VAE's "
                             "decoded pixels are; allowed: add --vae FOLDER, or leave out --lpips")
        check_lpips_file(args.lpips)
    if args.vae is None:
        for flag, value in (("--vae-scale", args.vae_scale), ("--vae-chunk", args.vae_chunk)):
            if value is not None:
                raise ValueError(f"{flag} {value} given without --vae; it only applies to decoding with a VAE")
        return
    if args.vae_scale is not None:
        check_finite(args.vae_scale, "--vae-scale")
    if args.vae_chunk is not None:
        check_positive(args.vae_chunk, "--vae-chunk")
    check_folder(args.vae)


def load_vae(args, models: dict, device: str = "cpu") -> Vae | None:
    """The VAE of ``--vae`` (None without it) on ``device``, checked against every model ({label:
    model}): latent models only, with the VAE's latent channel count."""
    if args.vae is None:
        return None
    for label, model in models.items():
        check_latent(model, label)                                     # before the VAE's weights are read
    vae = Vae.load(args.vae, args.vae_scale, args.vae_chunk or DEFAULT_CHUNK, device=device)
    for label, model in models.items():
        vae.check_model(model, label)
    return vae


def load_lpips(args, models: dict, vae: Vae | None, device: str = "cpu") -> Lpips | None:
    """The LPIPS of ``--lpips`` (None without it) on ``device``, after checking that every model's
    decoded samples ({label: model}) are large enough for its AlexNet trunk."""
    if getattr(args, "lpips", None) is None:
        return None
    if vae is None:                                                    # check_vae_args refuses this first
        raise ValueError(f"--lpips {args.lpips} given without --vae; allowed: add --vae FOLDER")
    for label, model in models.items():
        h, w = (s * vae.upscale for s in model.sample_shape()[-2:])
        Lpips.check_size(h, w, f"{label}'s decoded samples")
    return Lpips.load(args.lpips, device=device)
