"""What caption-conditioned adapters share: the caption checks, the negative-prompt embedding and
the null condition of classifier-free guidance, and the image-shape check of patch-based adapters."""
from __future__ import annotations

import torch


def check_image(x, config):
    """An image batch (N, C, H, W) a patch-based adapter can take: its channels, sides divisible by the patch."""
    if x.dim() != 4 or x.shape[1] != config.in_channels or x.shape[-1] % config.patch_size \
            or x.shape[-2] % config.patch_size:
        raise ValueError(f"x has shape {tuple(x.shape)}; this model takes (N, {config.in_channels}, H, W) with H and "
                         f"W divisible by patch_size={config.patch_size}")


class TextConditioned:
    """Caption-conditioned adapters: y is caption embeddings (N, L, caption_channels), float. The CFG
    unconditional input is the negative-prompt embedding given to ``set_negative_embeds``, else zeros
    (no text encoder is bundled)."""

    negative_embeds: torch.Tensor | None = None        # (1, L, C); None: zeros
    pad_hint = ""                                      # how this family pads its captions, for the token error

    def check_captions(self, y, batch: int | None = None):
        width = self.config.caption_channels
        name = self.config.class_name
        if y is None or not torch.is_tensor(y) or not y.is_floating_point():
            raise ValueError(f"{name} is text-conditioned: pass caption embeddings of shape (N, L, {width}) as a "
                             f"float tensor; got {getattr(y, 'dtype', type(y).__name__)}")
        if y.dim() != 3 or y.shape[-1] != width:
            raise ValueError(f"caption embeddings have shape {tuple(y.shape)}; this model takes (N, L, {width})")
        if batch is not None and y.shape[0] != batch:
            raise ValueError(f"caption embeddings have {y.shape[0]} rows for a batch of {batch}")

    def set_negative_embeds(self, embeds: torch.Tensor | None):
        """Use ``embeds`` ((L, C) or (1, L, C)) as the CFG unconditional input; None: zeros."""
        if embeds is not None:
            embeds = embeds.unsqueeze(0) if embeds.dim() == 2 else embeds
            self.check_captions(embeds)
            if embeds.shape[0] != 1:
                raise ValueError(f"negative embeddings have {embeds.shape[0]} rows; use one (L, C) embedding")
            embeds = embeds.detach().float()
        self.negative_embeds = embeds

    def negative(self) -> torch.Tensor | None:
        """The stored negative embedding (1, L, C), or None for zeros."""
        return self.negative_embeds

    def null_condition(self, y):
        """The CFG unconditional input: the negative embedding for every row, else zeros like y."""
        self.check_captions(y)
        neg = self.negative()
        if neg is None:
            return torch.zeros_like(y)
        if neg.shape[1] != y.shape[1]:
            raise ValueError(f"negative embeddings have {neg.shape[1]} tokens but the captions have {y.shape[1]}; "
                             f"pad both to the same length{self.pad_hint}")
        return neg.to(y.device, y.dtype).expand(y.shape[0], -1, -1)
