"""Forwards of a Conv2d, LayerNorm, Embedding or bias-only Linear whose parameters differ per grid
point: G groups of rows, each with its own (perturbed) parameters (the engine builds the values)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def linear_bias_only(module: nn.Linear, value, g: int):
    def fwd(x):
        xs = x.reshape(g, -1, x.shape[-1])                             # (G, R*T, in)
        return torch.baddbmm(value("bias").unsqueeze(1), xs, module.weight.t().expand(g, -1, -1)
                             ).reshape(*x.shape[:-1], module.out_features)
    return fwd


def conv(module: nn.Conv2d, value, g: int):
    def fwd(x):
        w, bias = value("weight"), value("bias")
        xs = x.reshape(g, -1, *x.shape[1:])
        outs = [module._conv_forward(xs[i], w[min(i, len(w) - 1)],
                                     None if bias is None else bias[min(i, len(bias) - 1)]) for i in range(g)]
        return torch.cat(outs)
    return fwd


def layer_norm(module: nn.LayerNorm, value, g: int):
    def fwd(x):
        w, bias = value("weight"), value("bias")
        xs = x.reshape(g, -1, *x.shape[1:])
        out = F.layer_norm(xs.float(), module.normalized_shape, None, None, module.eps)
        shape = lambda v: v.reshape(v.shape[0], *([1] * (xs.dim() - 2)), v.shape[-1]).float()
        if w is not None:
            out = out * shape(w)
        if bias is not None:
            out = out + shape(bias)
        return out.to(x.dtype).reshape(x.shape)
    return fwd


def embedding(module: nn.Embedding, value, g: int):
    def fwd(idx):
        w = value("weight")                                            # (G, rows, H)
        ids = idx.reshape(g, -1)
        rows = torch.stack([F.embedding(ids[i], w[min(i, len(w) - 1)]) for i in range(g)])
        return rows.reshape(*idx.shape, w.shape[-1])
    return fwd
