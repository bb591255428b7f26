"""Plots take data and keep alpha on x: a surface varying with alpha only must vary along x."""
import numpy as np
import pytest
import xarray as xr

from smoothness.plots import surfaces as plotting


@pytest.fixture
def alpha_only():
    a, b = np.linspace(-1, 1, 7), np.linspace(-0.5, 0.5, 5)            # different lengths catch transposes
    vals = np.broadcast_to((1 - a ** 2)[:, None], (7, 5))[None, None, None, None]
    da = xr.DataArray(vals.copy(), dims=("model", "step", "readout", "seed", "alpha", "beta"),
                      coords={"model": ["m1"], "step": [10], "timestep": ("step", [963]), "readout": ["output"],
                              "seed": [0], "alpha": a, "beta": b}, attrs={"long_name": "cosine similarity"})
    return xr.Dataset({"surface": da}, attrs={"mode": "weights", "norm": "filter", "chain": "DDPM-250"})


def test_matplotlib_3d_varies_along_alpha(alpha_only, monkeypatch):
    from mpl_toolkits.mplot3d import Axes3D
    seen = []
    real = Axes3D.plot_surface
    monkeypatch.setattr(Axes3D, "plot_surface", lambda self, X, Y, Z, **kw: seen.append((X, Y, Z)) or real(self, X, Y, Z, **kw))
    fig = plotting.surfaces(alpha_only, kind="3d")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "alpha" and ax.get_ylabel() == "beta"
    (X, Y, Z), = seen
    assert X.min() == pytest.approx(-1) and Y.max() == pytest.approx(0.5)
    np.testing.assert_allclose(Z, 1 - X ** 2, atol=1e-12)              # z depends on x (alpha) only
    assert np.ptp(Z, axis=1).max() > 0.5 and np.ptp(Z, axis=0).max() == 0


def test_contour_lines_are_vertical(alpha_only):
    fig = plotting.surfaces(alpha_only, kind="contour")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "alpha"
    cs = ax.collections[0] if ax.collections else None
    paths = [p for p in cs.get_paths() if len(p.vertices)]
    assert paths
    for p in paths:                                                     # filled bands span the whole beta range
        ys = p.vertices[:, 1]
        assert ys.min() == pytest.approx(-0.5) and ys.max() == pytest.approx(0.5)


def test_heatmap_columns_are_alpha(alpha_only):
    fig = plotting.heatmap(alpha_only)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "alpha"
    mesh = ax.collections[0]
    z = np.asarray(mesh.get_array()).reshape(5, 7)                      # rows beta, columns alpha
    np.testing.assert_allclose(z, np.broadcast_to(1 - np.linspace(-1, 1, 7) ** 2, (5, 7)))
    assert [t.get_text() for t in ax.get_xticklabels()][0] == "-1"


def test_plotly_surface_axes(alpha_only):
    fig = plotting.surfaces_plotly(alpha_only)
    tr = fig.data[0]
    np.testing.assert_allclose(tr.x, np.linspace(-1, 1, 7))
    np.testing.assert_allclose(tr.y, np.linspace(-0.5, 0.5, 5))
    z = np.asarray(tr.z)
    assert z.shape == (5, 7)                                            # plotly: z[row=y][col=x]
    np.testing.assert_allclose(z[0], 1 - np.linspace(-1, 1, 7) ** 2)
    assert fig.layout.scene.xaxis.title.text == "alpha"


def test_heatmap_draws_one_panel_per_model_and_step(alpha_only):
    """The heatmap file showed only the first model; it has a panel for every model and step."""
    two = xr.concat([alpha_only, alpha_only.assign_coords(model=["m2"])], dim="model")
    two = xr.concat([two, two.assign_coords(step=[250], timestep=("step", [0]))], dim="step")
    fig = plotting.heatmap(two)
    panels = [ax for ax in fig.axes if ax.get_xlabel() == "alpha"]
    assert sorted(ax.get_title() for ax in panels) == ["m1 step 10 (t=963)", "m1 step 250 (t=0)",
                                                       "m2 step 10 (t=963)", "m2 step 250 (t=0)"]
    one = plotting.heatmap(two, model="m2", step=250)
    assert [ax.get_title() for ax in one.axes if ax.get_xlabel() == "alpha"] == ["m2 step 250 (t=0)"]


def test_3d_axis_labels_clear_the_tick_labels(alpha_only):
    ax = plotting.surfaces(alpha_only, kind="3d").axes[0]
    assert ax.yaxis.labelpad >= 8 and ax.xaxis.labelpad >= 8
