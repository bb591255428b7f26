"""diffusers model folders and HunYuan-DiT checkpoints, loaded offline, weights-only, strictly.

A diffusers model folder is ``config.json`` (with ``_class_name``) plus
``diffusion_pytorch_model.safetensors`` (or ``.bin``), or shards listed in
``diffusion_pytorch_model.safetensors.index.json`` (``weight_map``: key -> shard file). The class is
built from its config and the weights are loaded with ``strict=True``; the result is the class's
adapter (``protocol.wrap``). Nothing is downloaded.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .hunyuan import build as build_hunyuan
from .hunyuan import infer_kwargs, is_tencent, to_diffusers
from .diffusers_adapter import import_diffusers
from .protocol import DIFFUSERS_CLASSES, wrap

WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


class FolderError(ValueError):
    """A diffusers folder lacks its config or weights, or does not fit its class."""


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a folder: the shards its index names (all must exist), else the single file."""
    for name in WEIGHT_NAMES:
        index = folder / f"{name}.index.json"
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, AttributeError) as e:
                raise FolderError(f"shard index {str(index)!r} is not a diffusers index with a weight_map: {e}") from None
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise FolderError(f"shard index {str(index)!r} points at missing file(s): {', '.join(missing)}")
            return [folder / s for s in shards]
        if (folder / name).is_file():
            return [folder / name]
    raise FolderError(f"diffusers model folder {str(folder)!r} has no weights; allowed: {', '.join(WEIGHT_NAMES)} "
                      "or a sharded index (diffusion_pytorch_model.safetensors.index.json)")


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        hint = ""
        if (folder / "model_index.json").is_file() and (folder / "transformer" / "config.json").is_file():
            hint = f"; it is a pipeline folder: pass its transformer, {str(folder / 'transformer')!r}"
        raise FolderError(f"diffusers model folder {str(folder)!r} has no config.json{hint}")
    try:
        config = json.loads(path.read_text())
    except ValueError as e:
        raise FolderError(f"{str(path)!r} is not valid JSON: {e}") from None
    name = config.get("_class_name") if isinstance(config, dict) else None
    if name not in DIFFUSERS_CLASSES:
        raise FolderError(f"diffusers class {name} (from {str(path)!r}) is not supported; supported: "
                          f"{', '.join(DIFFUSERS_CLASSES)}")
    return config


def diff_report(have: dict, expected: dict, limit: int = 5) -> str:
    """Missing, unexpected and mis-shaped keys of a state dict against a model's ("" when they agree)."""
    have = {k: tuple(v.shape) for k, v in have.items()}
    parts = []
    for label, items in (("missing", [k for k in expected if k not in have]),
                         ("unexpected", [k for k in have if k not in expected]),
                         ("mis-shaped", [f"{k} {have[k]} != {expected[k]}" for k in expected
                                         if k in have and have[k] != expected[k]])):
        if items:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            parts.append(f"{len(items)} {label}: {', '.join(items[:limit])}{more}")
    return "; ".join(parts)


def load_strict(inner: torch.nn.Module, sd: dict, source: str):
    """Load ``sd`` into ``inner`` with strict=True after a readable key/shape check."""
    expected = {k: tuple(v.shape) for k, v in inner.state_dict().items()}
    report = diff_report(sd, expected)
    if report:
        raise FolderError(f"{source} does not fit {type(inner).__name__} ({report})")
    inner.load_state_dict(sd, strict=True)


def load_folder(folder, read_state_dict, device="cpu", dtype=None):
    """The adapter of the diffusers model saved in ``folder``. ``read_state_dict(path)`` reads one
    weights file (the package's weights-only reader)."""
    folder = Path(folder)
    config = read_config(folder)
    files = weight_files(folder)
    diffusers = import_diffusers()
    cls = getattr(diffusers, config["_class_name"])
    sd = {}
    for f in files:
        sd.update(read_state_dict(f)[0])
    inner = cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    load_strict(inner, sd, f"diffusers folder {str(folder)!r}")
    return wrap(inner).to(device=device, dtype=dtype or torch.float32).eval()


def load_hunyuan(sd: dict, meta: dict, source: str, device="cpu", dtype=None):
    """A HunYuan-DiT state dict in either layout (Tencent renamed to diffusers first) as its adapter.
    The latent size is not in the state dict: ``meta["input_size"]`` if saved, else 128 (1024 px)."""
    if is_tencent(sd):
        sd = to_diffusers(sd)
    kwargs = infer_kwargs(sd, sample_size=int(meta.get("input_size", 128)))
    inner = build_hunyuan(kwargs)
    load_strict(inner, sd, f"HunYuan-DiT checkpoint {source}")
    return wrap(inner).to(device=device, dtype=dtype or torch.float32).eval()


def save_folder(model, folder) -> Path:
    """Save an adapter's diffusers model as a diffusers folder (config.json + safetensors)."""
    folder = Path(folder)
    model.inner.save_pretrained(str(folder), safe_serialization=True)
    return folder
