"""The surface dataset's schema, atomic save/load, and resume checks.

A surface file is netCDF (h5netcdf) holding one variable ``surface`` with dims
(model, step, readout, seed, alpha, beta), a ``timestep`` coordinate on ``step``, and in ``attrs``
everything needed to redo the run (``config`` is the full SurfaceConfig as JSON).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import xarray as xr

from .. import ranks
from ..io_utils import atomic_path, read_netcdf, versions
from ..models import caption_attrs
from ..models.protocol import family_of

DIMS = ("model", "step", "readout", "seed", "alpha", "beta")
REQUIRED_ATTRS = ("config", "metric", "mode", "direction_seed", "norm", "params", "grid_alpha", "grid_beta",
                  "chain", "models", "model_sha256", "versions")


def surface_attrs(entries, cfg) -> dict:
    p = cfg.perturbation
    weights = p.mode == "weights"                   # norm, params and include_1d are weights-mode settings
    return {
        "title": "feature-smoothness surface",
        "config": cfg.to_json(),
        "metric": cfg.metric,
        "flatten": cfg.flatten,
        "mode": p.mode,
        "site": p.site or "",
        "evaluation": cfg.evaluation,
        "direction_seed": p.directions.seed,
        "norm": p.directions.norm if weights else "",
        "params": p.directions.params if weights else "",
        "include_1d": int(p.directions.include_1d) if weights else -1,
        "grid_alpha": str(cfg.alpha),
        "grid_beta": str(cfg.beta),
        "chain": cfg.sampler.label,
        "cfg_scale": cfg.sampler.cfg_scale,
        "cfg_channels": -1 if cfg.sampler.cfg_channels is None else cfg.sampler.cfg_channels,
        "spacing": cfg.sampler.spacing,
        "steps_offset": cfg.sampler.steps_offset,
        "class_label": cfg.class_label,
        **caption_attrs(cfg.caption_embeds),
        "seeds": json.dumps(list(cfg.seeds)),
        "dtype": cfg.dtype,
        "models": json.dumps({e.label: e.source for e in entries}),
        "model_sha256": json.dumps({e.label: e.sha256 for e in entries}),
        "model_family": json.dumps({e.label: family_of(e.model).name for e in entries}),
        "diffusion_process": json.dumps({e.label: "{0.schedule} betas, {0.prediction} prediction".format(
            family_of(e.model)) for e in entries}),
        "versions": json.dumps(versions()),
    }


def check_schema(ds: xr.Dataset, where: str = "dataset") -> xr.Dataset:
    if "surface" not in ds:
        raise ValueError(f"{where} has no 'surface' variable; not a smoothness surface file")
    if tuple(ds["surface"].dims) != DIMS:
        raise ValueError(f"{where}: surface dims {tuple(ds['surface'].dims)} != expected {DIMS}")
    missing = [a for a in REQUIRED_ATTRS if a not in ds.attrs]
    if missing:
        raise ValueError(f"{where} lacks attributes {', '.join(missing)}")
    if "timestep" not in ds.coords:
        raise ValueError(f"{where} lacks the timestep coordinate")
    return ds


def save(ds: xr.Dataset, path: str | Path) -> Path:
    check_schema(ds)
    path = Path(path)
    with atomic_path(path) as tmp:
        ds.to_netcdf(tmp, engine="h5netcdf")
    return path


def load(path: str | Path) -> xr.Dataset:
    return check_schema(read_netcdf(path, "surface file"), str(path))


def resumable(path: Path, expected: xr.Dataset) -> xr.Dataset | None:
    """The partial dataset at ``path`` if it belongs to the same run (same config and models)."""
    if not path.is_file():
        return None
    ds = load(path)
    kind, what = _difference(ds, expected)
    if kind == "attr":
        raise ValueError(f"{str(path)!r} is a partial surface of a different run ({what} differs); "
                         "delete it or use another --out")
    if kind == "dim":
        raise ValueError(f"{str(path)!r} has different {what} coordinates; delete it or use another --out")
    return ds


def _difference(ds: xr.Dataset, ref: xr.Dataset) -> tuple[str | None, str | None]:
    """What makes ``ds`` part of another run than ``ref``: ("attr", key) for a run attribute, ("dim",
    name) for coordinates, (None, None) when they are the same run."""
    for key in ("config", "models", "model_sha256"):
        if ds.attrs.get(key) != ref.attrs.get(key):
            return "attr", key
    for dim in DIMS:
        if not np.array_equal(ds[dim].values, ref[dim].values):
            return "dim", dim
    return None, None


def shard_of(ds: xr.Dataset, where: str = "dataset") -> tuple[int, int]:
    """(i, n) of a shard file (``attrs["shard"] = "i/n"``); (0, 1) for a whole result."""
    return ranks.shard_attr(ds.attrs.get("shard"), where)


def merge(parts: list[xr.Dataset], names: list[str] | None = None) -> xr.Dataset:
    """One surface from the shard files of one run: same configuration and models, shards 0..n-1 of
    the same n each once, and every cell filled by exactly one of them."""
    names = names or [f"shard file {k}" for k in range(len(parts))]
    if not parts:
        raise ValueError("no shard files to merge")
    first = parts[0]
    for ds, name in zip(parts, names):
        check_schema(ds, name)
        kind, what = _difference(ds, first)
        if kind == "attr":
            raise ValueError(f"{name} belongs to a different run than {names[0]} ({what} differs); "
                             "merge only the shards of one run")
        if kind == "dim":
            raise ValueError(f"{name} has different {what} coordinates than {names[0]}")
    ranks.check_shard_set([shard_of(ds, name) for ds, name in zip(parts, names)])
    filled = np.stack([~np.isnan(ds["surface"].values) for ds in parts])
    if (filled.sum(0) > 1).any():
        raise ValueError(f"{int((filled.sum(0) > 1).sum())} cells are filled in more than one shard; "
                         "the shards overlap (were they made with different --batch-size?)")
    if (filled.sum(0) == 0).any():
        raise ValueError(f"{int((filled.sum(0) == 0).sum())} cells are filled in no shard; a shard is "
                         "unfinished: resume it with --resume before merging")
    out = first.copy(deep=True)
    values = out["surface"].values
    for ds in parts[1:]:
        np.copyto(values, ds["surface"].values, where=~np.isnan(ds["surface"].values))
    out["surface"].values = values
    out.attrs.pop("shard", None)
    return out
