"""Jacobian spectral norms: a linear map with chosen singular values, and explicit Jacobians of the
real tiny blocks, units and the whole trunk (torch.autograd.functional.jacobian)."""
from dataclasses import replace

import matplotlib
import numpy as np
import pytest
import torch
from _toy_models import ToyVideo
from torch.nn.attention import SDPBackend, sdpa_kernel

from smoothness.analysis import spectral
from smoothness.diffusion import SamplerConfig
from smoothness.plots.analysis import spectral_norms

pytestmark = [pytest.mark.usefixtures("single_thread"),      # torch's forward-mode AD warns from its own code
              pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")]


def _linear(singular_values, in_shape, out_shape, seed=0):
    """f(x) = W x with W = U diag(s) V^T, acting on tensors of in_shape -> out_shape."""
    g = torch.Generator().manual_seed(seed)
    n_in, n_out = int(np.prod(in_shape)), int(np.prod(out_shape))
    u, _ = torch.linalg.qr(torch.randn(n_out, n_out, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n_in, n_in, generator=g, dtype=torch.float64))
    s = torch.zeros(n_out, n_in, dtype=torch.float64)
    s[range(len(singular_values)), range(len(singular_values))] = torch.tensor(singular_values, dtype=torch.float64)
    w = u @ s @ v.T
    return (lambda x: (w @ x.reshape(-1)).reshape(out_shape)), w


@pytest.mark.parametrize("solver", spectral.SOLVERS)
@pytest.mark.parametrize("jvp", spectral.JVPS)
def test_linear_map_with_known_singular_values(solver, jvp):
    f, w = _linear([3.0, 1.5, 1.0, 0.5, 0.25], (2, 3, 2), (5, 2))
    x = torch.randn(2, 3, 2, dtype=torch.float64)
    r = spectral.largest_singular_value(f, x, iterations=200, tol=1e-12, solver=solver, jvp=jvp)
    assert r.sigma == pytest.approx(3.0, rel=1e-9)
    assert r.converged and r.iterations < 200
    top = torch.linalg.svd(w).Vh[0].reshape(2, 3, 2)                   # the top right singular vector
    assert abs(float((r.vector.double() * top).sum())) == pytest.approx(1.0, abs=1e-6)


def test_lanczos_needs_fewer_products_when_singular_values_cluster():
    f, _ = _linear([1.05, 1.04, 1.03, 1.02, 1.01, 1.0, 1.0, 1.0], (8, 4), (8, 4), seed=1)
    x = torch.zeros(8, 4, dtype=torch.float64)
    lanczos = spectral.largest_singular_value(f, x, iterations=100, tol=1e-12, solver="lanczos")
    power = spectral.power_iteration(f, x, iterations=100, tol=1e-12)
    assert lanczos.sigma == pytest.approx(1.05, rel=1e-10)
    assert lanczos.iterations <= 9                                      # 7 distinct values + 1: the space is exhausted
    assert not power.converged and 1.0 < power.sigma < 1.05 - 1e-3        # a lower bound, still rising


def _explicit(f, h):
    with sdpa_kernel(SDPBackend.MATH):
        jac = torch.autograd.functional.jacobian(lambda z: f(z.reshape(h.shape)).reshape(-1), h.reshape(-1))
    return float(torch.linalg.matrix_norm(jac, ord=2))


@pytest.fixture(scope="module")
def skip64(make_model):
    """Tiny Skip-DiT in float64 on 4x4 inputs: 4 tokens x 64 = 256-dimensional features."""
    return make_model("DiT-Mini/2-skip", seed=1, input_size=4).double()


def test_maps_against_explicit_jacobians(skip64):
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        start, per = spectral.unit_inputs(skip64, x, torch.tensor([400]), torch.tensor([1]))
    maps = [(spectral.block_map(skip64, u, per[u]["trunk"]), per[u]["blocks_in"]) for u in (0, 2)]
    maps += [(spectral.unit_map(skip64, 3, per[3]["trunk"]), per[3]["deep"]),
             (spectral.end_to_end_map(skip64, start), start.h)]
    for f, h in maps:
        want = _explicit(f, h)
        got = spectral.largest_singular_value(f, h, iterations=300, tol=1e-13)
        assert got.sigma == pytest.approx(want, rel=1e-8)
    # the maps are what they say: the unit map of a decoder unit includes its fusion; the end-to-end
    # map reproduces the model's trunk
    with torch.no_grad():
        fused = skip64.fuse(0, per[2]["deep"], per[2]["trunk"].skips[1])
        assert torch.equal(fused, per[2]["blocks_in"])
        trunk = skip64.embed(x, torch.tensor([400]), torch.tensor([1]))
        for u in range(4):
            skip64.run_unit(u, trunk)
        torch.testing.assert_close(spectral.end_to_end_map(skip64, start)(start.h), trunk.h, rtol=0, atol=0)


@pytest.fixture(scope="module")
def result(make_model):
    models = {"dit": make_model("DiT-Mini/2", input_size=4), "skip": make_model("DiT-Mini/2-skip", seed=1, input_size=4)}
    cfg = spectral.SpectralConfig(steps=(2, 5), sampler=SamplerConfig(num_steps=5), seeds=(2,), iterations=30,
                                  tol=1e-5)
    return spectral.compute(models, cfg), models, cfg


def test_compute_labels_and_is_deterministic(result):
    ds, models, cfg = result
    assert ds.sigma_block.dims == ("model", "unit", "step", "seed")
    assert ds.sigma_end_to_end.dims == ("model", "step", "seed")
    assert (ds.sigma_block > 0).all() and (ds.iterations_unit >= 1).all()
    no_skip = ds.skip_in == 0                                           # without a fused skip, unit == block
    np.testing.assert_allclose(ds.sigma_unit.where(no_skip).values, ds.sigma_block.where(no_skip).values, rtol=1e-12)
    assert ds.skip_in.sel(model="skip").values.tolist() == [0, 0, 1, 1]
    for key in ("iterations", "tol", "power_seed", "solver", "jvp", "seeds", "chain", "config"):
        assert key in ds.attrs
    again = spectral.compute({"skip": models["skip"]}, replace(cfg, maps=("unit",)))
    np.testing.assert_array_equal(again.sigma_unit.values[0], ds.sigma_unit.sel(model="skip", seed=[2]).values)


def test_unconditional_video_model_end_to_end():
    model = ToyVideo(hidden=6).double().eval()
    cfg = spectral.SpectralConfig(steps=(3,), sampler=SamplerConfig(num_steps=4), iterations=20, tol=1e-4)
    ds = spectral.compute({"toy": model}, cfg)
    x = torch.randn(1, 1, 3, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        start, _ = spectral.unit_inputs(model, x, torch.tensor([500]), None)
    f = spectral.end_to_end_map(model, start)
    assert spectral.largest_singular_value(f, start.h, 200, 1e-12).sigma == pytest.approx(_explicit(f, start.h), rel=1e-8)
    assert np.isfinite(ds.sigma_end_to_end).all() and np.isfinite(ds.sigma_unit).all()


def test_plot_and_errors(result):
    ds, _, _ = result
    assert isinstance(spectral_norms(ds), matplotlib.figure.Figure)
    assert isinstance(spectral_norms(ds.drop_vars(["sigma_unit", "sigma_block"]), seed=2), matplotlib.figure.Figure)
    with pytest.raises(ValueError, match="unknown map 'jacobian'; allowed: block, unit, end_to_end"):
        spectral.SpectralConfig(maps=("jacobian",))
    with pytest.raises(ValueError, match="unknown solver 'svd'; allowed: power, lanczos"):
        spectral.SpectralConfig(solver="svd")
    with pytest.raises(ValueError, match="step 300 is outside the chain; allowed: 1..250"):
        spectral.SpectralConfig(steps=(300,))
    with pytest.raises(ValueError, match="unknown jvp 'central'; allowed: reverse, forward"):
        spectral.largest_singular_value(lambda z: z, torch.ones(3), jvp="central")
