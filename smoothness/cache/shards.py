"""Join the shard files of one cache sweep (``--shard i/n`` or torchrun ranks) into its result.

Each shard holds the (model, method, setting, seed) cells of its block (``sweep.cells``) and the
reference chains those cells needed. The merged result equals a one-process sweep bit for bit, but
for the wall-time variables (``sweep.WALL``, ``reference_seconds``) and the run's wall-time attributes.
"""
from __future__ import annotations

import numpy as np
import xarray as xr

from .. import ranks
from .sweep import DIMS

RUN_ATTRS = ("grid", "models", "sha256", "fingerprint", "methods")   # what makes two files one sweep


def is_sweep(ds: xr.Dataset) -> bool:
    return "done" in ds and "grid" in ds.attrs and tuple(ds["done"].dims) == DIMS


def _cells(ds: xr.Dataset) -> np.ndarray:
    """True where a setting exists (the cells a sweep runs), as a (model, method, setting, seed) array."""
    real = (ds["config"] != "").values
    return np.broadcast_to(real[None, :, :, None], ds["done"].shape)


def merge(parts: list[xr.Dataset], names: list[str] | None = None) -> xr.Dataset:
    """One sweep from the shard files of one run: the same grid, models and checkpoints, shards
    0..n-1 of one n-way split each once, and every cell done in exactly one of them."""
    names = names or [f"shard file {k}" for k in range(len(parts))]
    if not parts:
        raise ValueError("no shard files to merge")
    first = parts[0]
    for ds, name in zip(parts, names):
        if not is_sweep(ds):
            raise ValueError(f"{name} is not a cache sweep result (no 'done' cells or 'grid' attribute)")
        for key in RUN_ATTRS:
            if ds.attrs.get(key) != first.attrs.get(key):
                raise ValueError(f"{name} belongs to a different sweep than {names[0]} ({key} differs); "
                                 "merge only the shards of one run")
        for dim in DIMS:
            if not np.array_equal(ds[dim].values, first[dim].values):
                raise ValueError(f"{name} has different {dim} coordinates than {names[0]}")
    ranks.check_shard_set([ranks.shard_attr(ds.attrs.get("shard"), name) for ds, name in zip(parts, names)])
    real = _cells(first)
    done = np.stack([ds["done"].values & real for ds in parts])
    if (done.sum(0) > 1).any():
        raise ValueError(f"{int((done.sum(0) > 1).sum())} cells are done in more than one shard; the shards overlap")
    if (done.sum(0) == 0)[real].any():
        raise ValueError(f"{int((done.sum(0) == 0)[real].sum())} cells are done in no shard; a shard is "
                         "unfinished: resume it with --resume before merging")
    out = first.copy(deep=True)
    for k, ds in enumerate(parts[1:], start=1):
        for v in out.data_vars:
            dims = out[v].dims
            if dims[:len(DIMS)] == DIMS:
                mask = done[k].reshape(done[k].shape + (1,) * (len(dims) - len(DIMS)))
                out[v].values = np.where(mask, ds[v].values, out[v].values)
            elif dims == ("model", "seed"):                 # reference chains: any shard that ran them
                out[v].values = np.where(np.isnan(out[v].values), ds[v].values, out[v].values)
    out["done"].values = done.any(0) | ~real
    out.attrs = {**{a: x for a, x in out.attrs.items() if not a.startswith("calibration_") and a != "shard"},
                 **dict(sorted((a, x) for p in parts for a, x in p.attrs.items() if a.startswith("calibration_"))),
                 "shards": len(parts)}
    return out
