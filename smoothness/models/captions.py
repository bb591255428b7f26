"""Caption embedding files for text-to-video models: precomputed text-encoder outputs (e.g. T5-XXL),
so no text encoder is needed. Read weights-only, never unpickling code."""
from __future__ import annotations

from pathlib import Path

import torch


def load_caption_embeds(path) -> torch.Tensor:
    """Caption embeddings from a file, as (N, L, C) float32.

    ``.safetensors`` or a weights-only ``torch.load`` file (``.pt``/``.pth``/``.bin``) holding one
    tensor, or a dict with exactly one tensor (e.g. ``{"prompt_embeds": ...}``), of shape (L, C) for
    one caption or (N, L, C) for N captions (padded to the same length L)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"caption embedding file {str(path)!r} does not exist or is not a file")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file
            obj = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"caption embedding file {str(path)!r} could not be read weights-only: {first}") from None
    if isinstance(obj, dict):
        tensors = [v for v in obj.values() if torch.is_tensor(v)]
        if len(tensors) != 1:
            raise ValueError(f"caption embedding file {str(path)!r} holds {len(tensors)} tensors "
                             f"({', '.join(map(str, obj))}); use a file with exactly one")
        obj = tensors[0]
    if not torch.is_tensor(obj) or not obj.is_floating_point() or obj.dim() not in (2, 3):
        what = f"a tensor of shape {tuple(obj.shape)} ({obj.dtype})" if torch.is_tensor(obj) else type(obj).__name__
        raise ValueError(f"caption embedding file {str(path)!r} holds {what}; "
                         "allowed: a float tensor (L, C) or (N, L, C)")
    return (obj.unsqueeze(0) if obj.dim() == 2 else obj).float()
