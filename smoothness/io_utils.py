"""Small I/O helpers shared by every writer: atomic writes, version stamps, and the result files' names,
fingerprints, overwrite guard and stale-temporary cleanup."""
from __future__ import annotations

import contextlib
import hashlib
import json
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


# ----------------------------------------------------------------- result files
def fingerprint(*parts) -> str:
    """A short checksum of a run's configuration (anything JSON can write), stored in its results."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_name(prefix: str, labels, *tags: str) -> str:
    """A default file stem that describes the run: ``surface_digits-dit_digits-skip-dit_step250``."""
    return "_".join([prefix, *[str(v) for v in labels], *[t for t in tags if t]])


def read_netcdf(path: str | Path, what: str = "file") -> xarray.Dataset:
    """A netCDF result read whole; one line when it is missing or unreadable (``what`` names it)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    try:
        with xarray.open_dataset(path, engine="h5netcdf") as f:
            return f.load()
    except Exception as e:
        raise ValueError(f"{str(path)!r} is not a readable netCDF file: {e}") from None


def stored_fingerprint(path: Path) -> str | None:
    """The fingerprint a result file was written with (netCDF attribute or PNG text), or None."""
    try:
        if path.suffix == ".nc":
            with xarray.open_dataset(path, engine="h5netcdf") as ds:
                return ds.attrs.get("fingerprint")
        if path.suffix == ".png":
            from PIL import Image
            with Image.open(path) as img:
                return img.info.get("fingerprint")
    except Exception:                                   # unreadable: treat as a different result
        return ""
    return None


def guard_results(paths, fp: str, overwrite: bool):
    """Refuse to replace a finished result that another configuration wrote, unless ``overwrite``.
    A result of the same configuration (same fingerprint) is simply written again."""
    if overwrite:
        return
    for path in map(Path, paths):
        if path.is_file() and stored_fingerprint(path) != fp:
            raise ValueError(f"{str(path)!r} holds a result of a different configuration; pass --overwrite to "
                             "replace it, or choose another --name or --out")


def remove_stale_temporaries(paths) -> list[Path]:
    """Delete the temporary files that a killed ``atomic_path`` write of any of ``paths`` left behind
    (``.<file name>.<random>.tmp`` beside it); returns what was removed."""
    removed = []
    for path in map(Path, paths):
        for tmp in path.parent.glob(f".{path.name}.*.tmp"):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed
