"""Small I/O helpers shared by every writer: atomic writes and version stamps."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import numpy
import torch
import xarray

from . import __version__


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)                 # mkstemp makes 0600; give the usual mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_writable(folder: str | Path) -> Path:
    """Create ``folder`` if needed and fail early with a clear message when it cannot be written."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ValueError(f"output folder {str(folder)!r} is not writable: {e.strerror or e}") from None
    return folder


def versions() -> dict[str, str]:
    return {"smoothness": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "xarray": xarray.__version__}
