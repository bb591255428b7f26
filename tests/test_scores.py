"""Smoothness scores on surfaces with known answers."""
import numpy as np
import xarray as xr

from smoothness.surface.scores import smoothness_scores


def _dataset(fn, a=np.linspace(-1, 1, 41), b=np.linspace(-1, 1, 41)):
    A, B = np.meshgrid(a, b, indexing="ij")
    vals = fn(A, B)[None, None, None, None]
    da = xr.DataArray(vals, dims=("model", "step", "readout", "seed", "alpha", "beta"),
                      coords={"model": ["m"], "step": [1], "readout": ["output"], "seed": [0], "alpha": a, "beta": b},
                      attrs={"metric": "cosine"})
    return xr.Dataset({"surface": da})


def test_paraboloid_scores_match_calculus():
    c = 0.1
    s = smoothness_scores(_dataset(lambda A, B: 1 - c * (A ** 2 + B ** 2)), radius=0.5).squeeze()
    # deviation = c (a^2 + b^2): mean over [-1,1]^2 grid -> c * 2 * mean(a^2)
    a = np.linspace(-1, 1, 41)
    np.testing.assert_allclose(float(s.mean_deviation), c * 2 * np.mean(a ** 2), rtol=1e-12)
    np.testing.assert_allclose(float(s.at_radius), c * 0.25, rtol=5e-3)          # bilinear interpolation error (h = 0.05)
    np.testing.assert_allclose(float(s.curvature), 2 * c, rtol=1e-9)              # (2c + 2c) / 2
    assert float(s.laplacian_energy) > 0


def test_flat_surface_scores_zero_and_jagged_is_rougher():
    flat = smoothness_scores(_dataset(lambda A, B: np.ones_like(A))).squeeze()
    for v in ("mean_deviation", "at_radius", "total_variation", "laplacian_energy", "curvature"):
        assert float(flat[v]) == 0.0
    smooth = smoothness_scores(_dataset(lambda A, B: 1 - 0.05 * (A ** 2 + B ** 2))).squeeze()
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 0.01, (41, 41))
    noise[20, 20] = 0.0
    jagged = smoothness_scores(_dataset(lambda A, B: 1 - 0.05 * (A ** 2 + B ** 2) - np.abs(noise))).squeeze()
    assert float(jagged.laplacian_energy) > 100 * float(smooth.laplacian_energy)
    assert float(jagged.total_variation) > float(smooth.total_variation)


def test_cone_total_variation_is_its_slope():
    s = smoothness_scores(_dataset(lambda A, B: 1 - 0.3 * np.abs(A))).squeeze()
    np.testing.assert_allclose(float(s.total_variation), 0.3, rtol=0.05)         # kink column halves it
