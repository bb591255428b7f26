"""GridEngine's Linear paths: the chunked weight build equals the unchunked one, and the linearity
path (few rows per point) and a bias-only perturbation equal an independent per-point computation."""
from __future__ import annotations

import copy

import pytest
import torch

from smoothness import hooks
from smoothness.surface.engine import GridEngine, Perturbation, naive_forward
from smoothness.surface.perturb import DirectionSpec, direction

pytestmark = pytest.mark.usefixtures("single_thread")

ALPHAS = torch.tensor([0.0, 0.15, -0.1, 0.05, 0.2])     # 5 points: chunks of 3 leave a remainder
BETAS = torch.tensor([0.1, 0.0, -0.2, 0.05, -0.05])


def _inputs(rows: int):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(rows, 2, 8, 8, generator=g)             # conftest TINY: 16 tokens per sample
    return x, torch.full((rows,), 400), torch.arange(rows) % 3


@pytest.mark.parametrize("include_1d", [False, True])        # True: per-point biases are chunked too
def test_chunked_weight_build_equals_unchunked(make_model, include_1d):
    model = make_model("DiT-Mini/2-skip", seed=2)
    spec = DirectionSpec(seed=5, params="all", include_1d=include_1d)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    x, t, y = _inputs(2)                                      # 32 rows per point: the weight-build path
    with torch.no_grad():
        whole = GridEngine(model, Perturbation("weights", spec), chunk_points=len(ALPHAS))
        want = whole.forward(x, t, y, (ALPHAS, BETAS))
        for k in (1, 3):
            got = GridEngine(model, Perturbation("weights", spec), chunk_points=k).forward(x, t, y, (ALPHAS, BETAS))
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert hooks.leftover_hooks(model) == []
    for n, p in model.state_dict().items():
        assert torch.equal(p, before[n]), n


def test_linearity_path_equals_naive_loop(make_model):
    model = make_model("DiT-Mini/2", seed=1)
    spec = DirectionSpec(seed=7, params="all", include_1d=True)
    x, t, y = _inputs(1)                                      # 16 rows per point: linearity for every Linear
    with torch.no_grad():
        got = GridEngine(model, Perturbation("weights", spec)).forward(x, t, y, (ALPHAS, BETAS))
        for g in range(len(ALPHAS)):
            want = naive_forward(model, spec, float(ALPHAS[g]), float(BETAS[g]), x, t, y)
            torch.testing.assert_close(got[g], want, rtol=1e-4, atol=1e-5)


def test_linear_with_only_its_bias_perturbed(make_model):
    """Not reachable through a DirectionSpec (a pattern takes a module's weight with its bias), so
    the engine's parameter list is narrowed by hand and compared with biases moved on a copy.
    norm="none": DiT initialises Linear biases to zero, so filter-normalized bias directions are zero."""
    model = make_model("DiT-Mini/2", seed=3)
    spec = DirectionSpec(seed=11, norm="none", params="all", include_1d=True)
    engine = GridEngine(model, Perturbation("weights", spec))
    engine.param_names = [n for n in engine.param_names if n.endswith("mlp.fc1.bias")]
    x, t, y = _inputs(2)
    with torch.no_grad():
        got = engine.forward(x, t, y, (ALPHAS, BETAS))
        for g in range(len(ALPHAS)):
            m = copy.deepcopy(model)
            for name, p in m.named_parameters():
                if name in engine.param_names:
                    p.add_(ALPHAS[g] * direction(p, name, 1, spec) + BETAS[g] * direction(p, name, 2, spec))
            torch.testing.assert_close(got[g], m(x, t, y), rtol=1e-4, atol=1e-5)
        assert (got[1] - got[0]).abs().max() > 1e-5


@pytest.mark.parametrize("bad", [0, -2])
def test_chunk_points_must_be_positive(make_model, bad):
    with pytest.raises(ValueError, match="chunk_points"):
        GridEngine(make_model(), Perturbation("weights", DirectionSpec()), chunk_points=bad)


def test_grid_rows_share_their_alpha_build_bit_for_bit(make_model, monkeypatch):
    """Alpha-major grid points (runs of equal alpha) take the per-run build; it must equal the
    two-pass build exactly, chunk boundaries falling inside and between runs."""
    from smoothness.surface import engine as eng
    model = make_model("DiT-Mini/2-skip", seed=4)
    spec = DirectionSpec(seed=2, params="all", include_1d=True)
    a = torch.tensor([-0.2] * 5 + [0.0] * 5 + [0.2] * 5)
    b = torch.linspace(-0.2, 0.2, 5).repeat(3)
    assert eng._runs(a, 4) == [[(0, 4, 0)], [(0, 1, 0), (1, 4, 1)], [(0, 2, 1), (2, 4, 2)], [(0, 3, 2)]]
    assert eng._runs(a, 1)[4:6] == [[(0, 1, 0)], [(0, 1, 1)]]           # one point per chunk: runs span chunks
    assert eng._runs(torch.arange(8.0), 4) is None                       # no shared alphas: two-pass
    x, t, y = _inputs(2)
    with torch.no_grad():
        runs = GridEngine(model, Perturbation("weights", spec), chunk_points=4).forward(x, t, y, (a, b))
        monkeypatch.setattr(eng, "RUN_BUILD", False)
        plain = GridEngine(model, Perturbation("weights", spec), chunk_points=4).forward(x, t, y, (a, b))
        assert torch.equal(runs, plain)
        single_plain = GridEngine(model, Perturbation("weights", spec), chunk_points=1).forward(x, t, y, (a, b))
        monkeypatch.setattr(eng, "RUN_BUILD", True)
        single = GridEngine(model, Perturbation("weights", spec), chunk_points=1).forward(x, t, y, (a, b))
        assert torch.equal(single, single_plain)
        want = naive_forward(model, spec, 0.2, 0.1, x, t, y)
        torch.testing.assert_close(runs[13], want, rtol=1e-4, atol=1e-5)
