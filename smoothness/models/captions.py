"""Caption embedding files for text-to-video models: precomputed text-encoder outputs (e.g. T5-XXL),
so no text encoder is needed. Read weights-only, never unpickling code."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from .checkpoint import sha256 as file_sha256
from .hunyuan import CAPTION_KEYS, pack_captions


def load_caption_embeds(path) -> torch.Tensor:
    """Caption embeddings from a file, as (N, L, C) float32.

    ``.safetensors`` or a weights-only ``torch.load`` file (``.pt``/``.pth``/``.bin``) holding one
    tensor, or a dict with exactly one tensor (e.g. ``{"prompt_embeds": ...}``), of shape (L, C) for
    one caption or (N, L, C) for N captions (padded to the same length L). A HunYuan-DiT file (a dict
    with ``prompt_embeds``, ``prompt_attention_mask``, ``prompt_embeds_2``, ``prompt_attention_mask_2``)
    comes back packed into one tensor (``hunyuan.pack_captions``)."""
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
    if isinstance(obj, dict) and any(k in obj for k in CAPTION_KEYS[1:]):
        try:
            return pack_captions(obj)
        except ValueError as e:
            raise ValueError(f"caption embedding file {str(path)!r}: {e}") from None
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


class Captions:
    """Caption embeddings loaded once, with where they came from and their checksum.

    ``embeds`` (N, L, C) float32; ``sha256`` of the file (or of the tensor's bytes when given in
    memory); ``source`` the file path ("" in memory). Two Captions are equal when their checksums are."""

    def __init__(self, embeds: torch.Tensor, sha256: str, source: str = ""):
        self.embeds, self.sha256, self.source = embeds, sha256, source

    @classmethod
    def load(cls, path) -> "Captions":
        return cls(load_caption_embeds(path), file_sha256(path), str(path))

    @classmethod
    def of(cls, value) -> "Captions | None":
        """None (or "") -> None; a path -> loaded; a tensor (L, C) or (N, L, C) -> in memory; Captions as is."""
        if value is None or isinstance(value, Captions):
            return value
        if torch.is_tensor(value):
            t = (value.unsqueeze(0) if value.dim() == 2 else value).float()
            return cls(t, hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest())
        if isinstance(value, (str, Path)):
            return cls.load(value) if str(value) else None
        raise ValueError(f"captions must be a file path, a tensor (L, C) or (N, L, C), or None; got "
                         f"{type(value).__name__}")

    def attrs(self) -> dict:
        return {"caption_embeds": self.source, "caption_sha256": self.sha256}

    def __eq__(self, other):
        return isinstance(other, Captions) and other.sha256 == self.sha256

    def __hash__(self):
        return hash(self.sha256)

    def __repr__(self):
        return f"Captions({tuple(self.embeds.shape)}, source={self.source!r}, sha256={self.sha256[:12]}...)"


def caption_attrs(captions: Captions | None) -> dict:
    """attrs naming the captions' file and checksum (empty strings without captions)."""
    return captions.attrs() if captions is not None else {"caption_embeds": "", "caption_sha256": ""}
