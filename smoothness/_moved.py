"""Old import paths of modules that moved into subpackages, kept working for this release.

``import smoothness.scores`` (say) still works: it warns once with a ``DeprecationWarning`` naming the
new path and gives the very module that now lives at ``smoothness.surface.scores`` (the same object,
so monkeypatching through either name patches both). The commands users type
(``python -m smoothness.correlate``, ``.sample``, ``.train``) are real modules and never warn.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {  # old path -> new path, both under ``smoothness.``
    "caching_error": "analysis.caching_error",
    "classifier": "data.classifier",
    "dynamics": "analysis.dynamics",
    "engine": "surface.engine",
    "evaluation": "surface.evaluation",
    "io": "surface.io",
    "perturb": "surface.perturb",
    "plots_analysis": "plots.analysis",
    "plotting": "plots.surfaces",
    "scores": "surface.scores",
    "similarity": "surface.similarity",
    "spectral": "analysis.spectral",
    "stats": "analysis.stats",
}
COMMANDS = {  # modules that are commands (``python -m``) and old library paths at once
    "correlate": "analysis.correlate",
    "sample": "data.sample",
    "train": "data.train",
}


def warn(old: str, new: str, stacklevel: int = 3):
    warnings.warn(f"smoothness.{old} moved to smoothness.{new}; the old import path works in this release only",
                  DeprecationWarning, stacklevel=stacklevel)


def replace_with(old_name: str, new: str):
    """Make the module being imported as ``old_name`` (``smoothness.X``) the module ``smoothness.<new>``."""
    old = old_name.removeprefix("smoothness.")
    warn(old, new, stacklevel=4)
    sys.modules[old_name] = importlib.import_module(f"smoothness.{new}")


class _Loader(importlib.abc.Loader):
    def __init__(self, old: str):
        self.old = old

    def create_module(self, spec):
        return importlib.import_module(f"smoothness.{MOVED[self.old]}")

    def exec_module(self, module):
        warn(self.old, MOVED[self.old], stacklevel=5)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        old = fullname.removeprefix("smoothness.")
        if fullname.startswith("smoothness.") and old in MOVED:
            return importlib.util.spec_from_loader(fullname, _Loader(old))
        return None


def install():
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


def moved_names(module: str, names: dict[str, str]):
    """A module ``__getattr__`` for functions that moved up to a higher layer (e.g. a plot helper
    that now lives in ``plots``): ``names`` maps the old name to ``"smoothness.<module>:<name>"``. The
    target is imported on first use (a lazy lookup, not an import of the layer above), with a warning."""
    def __getattr__(name):
        if name not in names:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        target, attr = names[name].split(":")
        warnings.warn(f"{module}.{name} moved to {target}.{attr}; the old name works in this release only",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(target), attr)
    return __getattr__
