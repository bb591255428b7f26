"""Shared CLI plumbing: user errors print one line and exit 2, never a traceback; the flags every
command shares. Core layer (it names the bundled models); only the commands import it."""
from __future__ import annotations

import sys

from .diffusion import OFFICIAL, SPACINGS, SamplerConfig, official_sampling
from .models import bundled

USER_ERRORS = (ValueError, FileNotFoundError, PermissionError)


def run_cli(main, argv=None) -> int:
    """Run a CLI ``main``; figures render off-screen (the library leaves the backend to the user, so
    notebooks keep their inline plots)."""
    import matplotlib
    matplotlib.use("Agg")
    try:
        main(argv)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:                       # argparse: usage errors (2) and --help (0)
        return e.code if isinstance(e.code, int) else 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def parse_int_list(text: str, what: str) -> list[int]:
    """``"10,250"`` -> [10, 250]; a clear error otherwise."""
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{what} {text!r} is not a comma-separated list of integers") from None
    if not vals:
        raise ValueError(f"{what} is empty")
    return vals


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
