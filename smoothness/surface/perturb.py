"""Random directions, their normalization, parameter selection and alpha/beta grids (tensor math only).

A direction is a set of Gaussian tensors, one per perturbed parameter. Each tensor is drawn from
its own generator seeded by (seed, direction id, parameter name), so any single tensor can be
regenerated on demand without storing the others: a DiT-XL/2 surface never holds both directions
for all 675 M weights at once.

Normalization (Li et al. 2018, "Visualizing the loss landscape of neural nets"):
    filter: each output row of a weight matrix (each filter of a convolution) is scaled to the norm
            of the matching row of the weights;
    layer:  the whole tensor is scaled to the norm of the whole weight tensor;
    none:   raw N(0, 1) entries.
One-dimensional parameters (biases, norm scales) are left unperturbed unless ``include_1d``.
"""
from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..hooks import pattern_regex

NORMS = ("filter", "layer", "none")
DEFAULT_PARAMS = "blocks.*"      # every transformer block; skip fusions, embedders and head untouched


@dataclass(frozen=True)
class DirectionSpec:
    seed: int = 0                    # directions are reproducible from (seed, norm, selection)
    norm: str = "filter"             # filter | layer | none
    params: str = DEFAULT_PARAMS     # comma-separated module patterns: blocks.*, blocks.0-6, skips.*, all
    include_1d: bool = False         # also perturb biases and norm scales

    def __post_init__(self):
        if self.norm not in NORMS:
            raise ValueError(f"unknown normalization {self.norm!r}; allowed: {', '.join(NORMS)}")


def _module_regex(pattern: str) -> re.Pattern:
    """A module pattern (``blocks.*``, ``blocks.0-6``) as a regex over parameter names under it."""
    return re.compile(r"(?:" + pattern_regex(pattern).pattern + r")(?:\..+)?")


def _block_regexes(model: nn.Module, pattern: str) -> list[re.Pattern]:
    """Block patterns through the model's own module paths: ``blocks.{i}`` is the i-th block in
    execution order, which LatteT2V keeps as ``transformer_blocks.{i//2}`` (spatial) and
    ``temporal_transformer_blocks.{i//2}``. For DiT and Latte the paths are the names themselves."""
    if not (pattern.startswith("blocks.") and hasattr(model, "sites")):
        return []
    target = pattern_regex(pattern)
    return [re.compile(re.escape(path) + r"(?:\..+)?") for site, path in model.sites().items()
            if re.fullmatch(r"blocks\.\d+", site) and target.fullmatch(site)]


def select_parameters(model: nn.Module, spec: DirectionSpec) -> list[str]:
    """Names of the parameters a perturbation touches, in model order.

    Patterns address modules: ``blocks.*`` (all blocks), ``blocks.3``, ``blocks.0-6``, ``skips.*``
    (both halves of every skip fusion), ``final_layer``, or ``all``. ``blocks.{i}`` means the model's
    i-th block site, whatever its module path (see ``_block_regexes``). Frozen parameters (the fixed
    position table) are never perturbed.
    """
    patterns = [p.strip() for p in spec.params.split(",") if p.strip()]
    if not patterns:
        raise ValueError("the parameter selection is empty; use e.g. 'blocks.*', 'blocks.0-6', 'skips.*' or 'all'")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    chosen: set[str] = set()
    for pat in patterns:
        if pat == "all":
            hits = set(names)
        else:
            alts = [pat]
            if pat.startswith("skips."):
                rest = pat[len("skips."):]
                alts = [f"skip_norms.{rest}", f"skip_linears.{rest}"]
            regexes = [_module_regex(a) for a in alts] + _block_regexes(model, pat)
            hits = {n for n in names if any(r.fullmatch(n) for r in regexes)}
        if not hits:
            raise ValueError(f"parameter pattern {pat!r} matches nothing in this model; "
                             "use e.g. 'blocks.*', 'blocks.0-6', 'skips.*', 'final_layer' or 'all'")
        chosen |= hits
    params = dict(model.named_parameters())
    return [n for n in names if n in chosen and (spec.include_1d or params[n].dim() > 1)]


def _seed_for(seed: int, which: int, name: str) -> int:
    return zlib.crc32(f"{seed}:{which}:{name}".encode())


def direction(weight: torch.Tensor, name: str, which: int, spec: DirectionSpec) -> torch.Tensor:
    """Direction ``which`` (1 or 2) for one parameter, normalized; float32 on the weight's device."""
    g = torch.Generator().manual_seed(_seed_for(spec.seed, which, name))
    d = torch.randn(weight.shape, generator=g, dtype=torch.float32)
    return normalize(d, weight.detach().float().cpu(), spec.norm).to(weight.device)


def normalize(d: torch.Tensor, w: torch.Tensor, norm: str) -> torch.Tensor:
    if norm == "none":
        return d
    if norm == "layer":
        return d * (torch.linalg.vector_norm(w) / (torch.linalg.vector_norm(d) + 1e-10))
    if norm == "filter":
        if d.dim() == 1:                      # one "filter" per entry
            return d * (w.abs() / (d.abs() + 1e-10))
        dims = tuple(range(1, d.dim()))
        scale = torch.linalg.vector_norm(w, dim=dims, keepdim=True) / (torch.linalg.vector_norm(d, dim=dims, keepdim=True) + 1e-10)
        return d * scale
    raise ValueError(f"unknown normalization {norm!r}; allowed: {', '.join(NORMS)}")


def directions(model: nn.Module, spec: DirectionSpec) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (d1, d2) for every selected parameter. Materialises both; fine for small models."""
    params = dict(model.named_parameters())
    return {n: (direction(params[n], n, 1, spec), direction(params[n], n, 2, spec))
            for n in select_parameters(model, spec)}


def feature_direction(h: torch.Tensor, seed: int, which: int, site: str) -> torch.Tensor:
    """A Gaussian direction shaped like one sample's feature ``h`` (T, D) (a video block: (F, T, D)),
    or input (C, H, W) / (C, F, H, W), scaled per token (per pixel over C for inputs) to the norm of
    that token of ``h``."""
    g = torch.Generator().manual_seed(_seed_for(seed, which, "feature:" + site))
    d = torch.randn(h.shape, generator=g, dtype=torch.float32).to(h.device)
    hf = h.float()
    if h.dim() in (3, 4) and site in ("input", "latent"):            # (C, [F,] H, W): per pixel over C
        return d * (torch.linalg.vector_norm(hf, dim=0, keepdim=True) / (torch.linalg.vector_norm(d, dim=0, keepdim=True) + 1e-10))
    return d * (torch.linalg.vector_norm(hf, dim=-1, keepdim=True) / (torch.linalg.vector_norm(d, dim=-1, keepdim=True) + 1e-10))


# ------------------------------------------------------------------- grids

@dataclass(frozen=True)
class Axis:
    lo: float
    hi: float
    count: int

    @classmethod
    def parse(cls, text: str, what: str = "grid") -> "Axis":
        """``min:max:count`` as loss-landscape writes it, e.g. ``-1:1:21``."""
        parts = text.split(":")
        try:
            lo, hi, count = float(parts[0]), float(parts[1]), int(parts[2])
            if len(parts) != 3:
                raise IndexError
        except (ValueError, IndexError):
            raise ValueError(f"{what} {text!r} is not min:max:count (e.g. -1:1:21)") from None
        if count < 1:
            raise ValueError(f"{what} {text!r} is empty; count must be at least 1")
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo >= hi:
            raise ValueError(f"{what} {text!r} is inverted or empty; need min < max")
        return cls(lo, hi, count)

    def values(self) -> np.ndarray:
        """The evenly spaced points, plus 0 when it is not among them (the origin is always a point)."""
        v = np.linspace(self.lo, self.hi, self.count)
        v[np.isclose(v, 0.0, atol=1e-12 * max(abs(self.lo), abs(self.hi)))] = 0.0
        if not (v == 0.0).any():
            v = np.sort(np.append(v, 0.0))
        return v

    def __str__(self) -> str:
        return f"{self.lo:g}:{self.hi:g}:{self.count}"

    @property
    def spelling(self) -> str:
        """``min:max:count``, as the CLIs take it and results record it."""
        return str(self)
