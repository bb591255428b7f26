"""Directions, normalization, selection and grids against hand computations."""
import numpy as np
import pytest
import torch

from smoothness.models import build
from smoothness.surface.perturb import (
    Axis,
    DirectionSpec,
    direction,
    directions,
    normalize,
    select_parameters,
)


def test_filter_normalization_matches_hand_computation():
    w = torch.tensor([[3.0, 4.0], [0.0, 2.0], [1.0, 0.0]])          # row norms 5, 2, 1
    d = torch.tensor([[1.0, 0.0], [0.0, -4.0], [2.0, 2.0]])         # row norms 1, 4, sqrt(8)
    want = torch.tensor([[5.0, 0.0], [0.0, -2.0], [1 / 2 ** 0.5, 1 / 2 ** 0.5]])
    torch.testing.assert_close(normalize(d, w, "filter"), want)
    # layer: whole tensor to ||w|| = sqrt(9+16+4+1) = sqrt(30); ||d|| = sqrt(1+16+8) = 5
    torch.testing.assert_close(normalize(d, w, "layer"), d * (30 ** 0.5 / 5))
    torch.testing.assert_close(normalize(d, w, "none"), d)


def test_conv_filters_are_normalized_per_output_channel():
    w = torch.randn(6, 3, 2, 2)
    d = normalize(torch.randn(6, 3, 2, 2), w, "filter")
    torch.testing.assert_close(torch.linalg.vector_norm(d, dim=(1, 2, 3)), torch.linalg.vector_norm(w, dim=(1, 2, 3)))


def test_directions_are_reproducible_gaussian_and_distinct():
    m = build("DiT-Mini/2", input_size=8, in_channels=1, num_classes=3)
    spec = DirectionSpec(seed=5, norm="none")
    a, b = directions(m, spec), directions(m, spec)
    for k in a:
        assert torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1])
        assert not torch.equal(a[k][0], a[k][1])
    other = directions(m, DirectionSpec(seed=6, norm="none"))
    assert not torch.equal(a["blocks.0.attn.qkv.weight"][0], other["blocks.0.attn.qkv.weight"][0])
    big = a["blocks.0.mlp.fc1.weight"][0]                           # Gaussian, not uniform
    assert abs(big.mean()) < 0.05 and abs(big.std() - 1) < 0.05 and (big < 0).any()
    # one tensor regenerates alone, identical to the batch of all
    w = dict(m.named_parameters())["blocks.1.attn.proj.weight"]
    assert torch.equal(direction(w, "blocks.1.attn.proj.weight", 2, spec), a["blocks.1.attn.proj.weight"][1])


def test_selection_patterns_and_1d_parameters():
    m = build("DiT-Mini/2-skip", input_size=8, in_channels=1, num_classes=3)
    blocks = select_parameters(m, DirectionSpec())
    assert blocks and all(n.startswith("blocks.") and n.endswith("weight") for n in blocks)
    assert all(dict(m.named_parameters())[n].dim() > 1 for n in blocks)
    with_1d = select_parameters(m, DirectionSpec(include_1d=True))
    assert "blocks.0.attn.qkv.bias" in with_1d and "blocks.0.attn.qkv.bias" not in blocks
    assert select_parameters(m, DirectionSpec(params="blocks.1")) == [n for n in blocks if n.startswith("blocks.1.")]
    assert set(select_parameters(m, DirectionSpec(params="blocks.0-1"))) == set(blocks) - {
        n for n in blocks if n.startswith(("blocks.2.", "blocks.3."))}
    skips = select_parameters(m, DirectionSpec(params="skips.*", include_1d=True))
    assert set(skips) == {n for n, _ in m.named_parameters() if n.startswith(("skip_norms", "skip_linears"))}
    assert "pos_embed" not in select_parameters(m, DirectionSpec(params="all", include_1d=True))
    with pytest.raises(ValueError, match="matches nothing"):
        select_parameters(m, DirectionSpec(params="decoder.*"))
    with pytest.raises(ValueError, match="inverted"):
        select_parameters(m, DirectionSpec(params="blocks.3-1"))


def test_grid_always_contains_the_origin():
    np.testing.assert_allclose(Axis.parse("-1:1:5").values(), [-1, -0.5, 0, 0.5, 1])
    v = Axis.parse("-1:1:4").values()
    assert len(v) == 5 and 0.0 in v and np.all(np.diff(v) > 0)
    assert 0.0 in Axis.parse("0.1:0.5:3").values()
    for bad in ("1:-1:3", "-1:1:0", "1:1:3", "a:b:c", "-1:1"):
        with pytest.raises(ValueError):
            Axis.parse(bad)
