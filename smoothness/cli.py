"""Shared CLI plumbing: user errors print one line and exit 2, never a traceback; the flags every
command shares. Core layer (it names the bundled models); only the commands import it."""
from __future__ import annotations

import sys

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
