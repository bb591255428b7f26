"""A model with its label: the one entry type every multi-model tool takes.

``ModelEntry(label, model, source, sha256)``: ``label`` is the coordinate on a result's ``model`` dim,
``source`` the bundled name or checkpoint path and ``sha256`` the file's checksum (both recorded in
the result's attributes). ``load_entries`` builds them from names or paths; ``as_entries`` also
accepts ``{label: model}``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from . import bundled
from .checkpoint import sha256


@dataclass
class ModelEntry:
    label: str                  # coordinate on the "model" dim
    model: torch.nn.Module
    source: str = ""            # bundled name or checkpoint path
    sha256: str = ""            # checksum of the file the weights came from


def _distinct(entries: list[ModelEntry]) -> list[ModelEntry]:
    labels = [e.label for e in entries]
    if len(set(labels)) != len(labels):
        raise ValueError(f"model labels must be distinct, got {labels}")
    return entries


def load_entries(names, num_heads: int | None = None) -> list[ModelEntry]:
    """Bundled models by name or checkpoints by path, labelled, with their source and checksum."""
    entries = []
    for n in names:
        model = bundled.load(n, num_heads=num_heads)
        path = bundled.weight_path(n) if n in bundled.BUNDLED else Path(n)
        entries.append(ModelEntry(bundled.label(n), model, str(n), sha256(path)))
    return _distinct(entries)


def as_entries(models) -> list[ModelEntry]:
    """``{label: model}`` or a list of ModelEntry, as a list of ModelEntry; labels distinct."""
    out = [ModelEntry(str(k), m) for k, m in models.items()] if isinstance(models, dict) else list(models)
    if not out:
        raise ValueError("no models given")
    return _distinct(out)
