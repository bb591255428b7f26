"""smoothness: feature-smoothness surfaces and Skip-Cache for Diffusion Transformers.

Where things live (imports go downward only; ``tests/test_layers.py`` keeps it so):

    util      io_utils                                         atomic files, checksums, versions
    core      models/, diffusion, hooks, chain, data/, metrics, cli   models, sampling, sites, fidelity, flags
    engines   surface/, cache/                                 perturbation surfaces; cached inference
    analysis  analysis/                                        caching error, correlation, dynamics, spectra
    plots     plots/                                           drawing from data only
    apps      figures, */cli.py, */__main__.py, data/train.py, data/sample.py   the commands
"""
__version__ = "0.1.0"

from . import _moved  # noqa: E402  (after the version: io_utils reads it)

_moved.install()
