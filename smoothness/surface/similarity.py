"""How a perturbed feature is compared with the original: cosine similarity, relative L2 / L1.

Flattening: ``"sample"`` (default) compares each sample's whole tensor as one vector; ``"token"``
compares each token (the last axis of a (T, D) feature; the channel axis at each pixel of a
(C, H, W) output) and averages over tokens. Computed in float64. Identical tensors give cosine
exactly 1 and relative distances exactly 0.
"""
from __future__ import annotations

import torch

METRICS = {
    # name: (long_name, units, value at the origin)
    "cosine": ("cosine similarity", "1", 1.0),
    "rel_l2": ("relative L2 distance ||f' - f|| / ||f||", "1", 0.0),
    "rel_l1": ("relative L1 distance |f' - f|_1 / |f|_1", "1", 0.0),
}
FLATTENS = ("sample", "token")


def check(metric: str, flatten: str = "sample"):
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; allowed: {', '.join(METRICS)}")
    if flatten not in FLATTENS:
        raise ValueError(f"unknown flatten {flatten!r}; allowed: {', '.join(FLATTENS)}")


def _vectors(x: torch.Tensor, lead: int, flatten: str) -> torch.Tensor:
    """(lead dims..., feature...) -> (lead dims..., tokens, vector)."""
    feat = x.shape[lead:]
    if flatten == "sample":
        return x.reshape(*x.shape[:lead], 1, -1)
    if len(feat) == 3:                                   # (C, H, W): a token per pixel
        return x.reshape(*x.shape[:lead], feat[0], -1).transpose(-1, -2)
    return x.reshape(*x.shape[:lead], -1, feat[-1])


def compare(perturbed: torch.Tensor, reference: torch.Tensor, metric: str = "cosine",
            flatten: str = "sample") -> torch.Tensor:
    """perturbed (P, R, ...) against reference (R, ...) -> (P, R) float64."""
    check(metric, flatten)
    a = _vectors(perturbed.double(), 2, flatten)                       # (P, R, tokens, V)
    b = _vectors(reference.double(), 1, flatten).unsqueeze(0)          # (1, R, tokens, V)
    if metric == "cosine":
        dot = (a * b).sum(-1)
        denom = torch.sqrt((a * a).sum(-1) * (b * b).sum(-1))
        val = torch.where(denom > 0, dot / torch.where(denom > 0, denom, 1.0), (a == b).all(-1).double())
    elif metric == "rel_l2":
        val = torch.linalg.vector_norm(a - b, dim=-1) / torch.linalg.vector_norm(b, dim=-1).clamp_min(1e-300)
    else:
        val = (a - b).abs().sum(-1) / b.abs().sum(-1).clamp_min(1e-300)
    return val.mean(-1)                                                  # mean over tokens
