"""Small shared fixtures: tiny random DiT / Skip-DiT models whose blocks are not the identity.

DiT's adaLN-Zero init zeroes every modulation layer and the final linear, so a freshly built model
outputs exactly zero and every block is the identity; tests that compare against an independent
computation would pass trivially. ``wake`` re-draws those weights N(0, 0.02) (and the Skip-DiT
norms' affine parameters) from a fixed seed.
"""
from __future__ import annotations

import pytest
import torch

from smoothness.models import build

TINY = dict(input_size=8, in_channels=2, num_classes=3)   # 16 tokens, 4 output channels (learn_sigma)


@torch.no_grad()
def _wake(model, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def redraw(p, std=0.02, mean=0.0):
        p.copy_(mean + std * torch.randn(p.shape, generator=g))

    for block in model.blocks:
        redraw(block.adaLN_modulation[-1].weight)
        redraw(block.adaLN_modulation[-1].bias)
    redraw(model.final_layer.adaLN_modulation[-1].weight)
    redraw(model.final_layer.adaLN_modulation[-1].bias)
    redraw(model.final_layer.linear.weight)
    redraw(model.final_layer.linear.bias)
    for norm in getattr(model, "skip_norms", []):
        redraw(norm.weight, std=0.1, mean=1.0)
        redraw(norm.bias, std=0.1)
    return model


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a module of tiny-model tests (thread hand-offs cost more than they
    save at these sizes on the shared 2-core machines); restored afterwards. Opt in with
    ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def make_model():
    """Factory: ``make_model(name="DiT-Mini/2", seed=0, **config_overrides)`` -> eval-mode random model."""
    def make(name: str = "DiT-Mini/2", seed: int = 0, **overrides):
        with torch.random.fork_rng():            # module init draws from the global generator
            torch.manual_seed(seed)
            model = build(name, **{**TINY, **overrides})
        return _wake(model, seed).eval()
    return make


@pytest.fixture
def tiny(make_model):
    """DiT-Mini/2 (depth 4, hidden 64, 2 heads) on 8x8x2 inputs, 3 classes, learned sigma."""
    return make_model("DiT-Mini/2")


@pytest.fixture
def tiny_skip(make_model):
    """The same size with Skip-DiT's 2 long skip branches."""
    return make_model("DiT-Mini/2-skip", seed=1)


@pytest.fixture
def tiny_inputs():
    """(x_t, t, y) for a batch of 2 matching the tiny models."""
    g = torch.Generator().manual_seed(123)
    x = torch.randn(2, TINY["in_channels"], TINY["input_size"], TINY["input_size"], generator=g)
    return x, torch.tensor([999, 17]), torch.tensor([0, 2])
