"""Correlation of smoothness and caching error: the statistics against scipy, the caching errors
against naive whole-chain runs, the Dataset, the table, the plot and the CLI's errors."""
from dataclasses import replace

import matplotlib
import numpy as np
import pytest
import scipy.stats
import torch
import xarray as xr
from _toy_models import ToyVideo

from smoothness import metrics
from smoothness.analysis import caching_error, correlate
from smoothness.analysis import cli as correlate_cli
from smoothness.analysis.stats import bootstrap_ci, pearson, rankdata, spearman
from smoothness.cache import CacheConfig, Schedule, apply_cache
from smoothness.cli import run_cli
from smoothness.diffusion import Diffusion, SamplerConfig
from smoothness.plots.analysis import correlation_scatter
from smoothness.surface import ModelEntry, SurfaceConfig

pytestmark = pytest.mark.usefixtures("single_thread")


# ------------------------------------------------------------------ statistics
def test_rankdata_matches_scipy_with_ties():
    x = np.array([3.0, 1.0, 3.0, 2.0, 1.0, 5.0, 3.0])
    np.testing.assert_array_equal(rankdata(x), scipy.stats.rankdata(x))
    rows = np.random.default_rng(0).integers(0, 4, (6, 9)).astype(float)
    np.testing.assert_array_equal(rankdata(rows), scipy.stats.rankdata(rows, axis=1))


def test_spearman_and_pearson_match_scipy():
    rng = np.random.default_rng(1)
    for n in (3, 7, 40):
        x = rng.normal(size=n)
        y = 0.6 * x + rng.normal(size=n)
        y[: n // 3] = y[0]                                             # ties in y
        np.testing.assert_allclose(spearman(x, y), scipy.stats.spearmanr(x, y).statistic, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(pearson(x, y), scipy.stats.pearsonr(x, y).statistic, rtol=1e-12, atol=1e-14)
    xs, ys = rng.normal(size=(5, 11)), rng.normal(size=(5, 11))         # batched rows
    want_s = [scipy.stats.spearmanr(a, b).statistic for a, b in zip(xs, ys)]
    want_p = [scipy.stats.pearsonr(a, b).statistic for a, b in zip(xs, ys)]
    np.testing.assert_allclose(spearman(xs, ys), want_s, rtol=1e-12)
    np.testing.assert_allclose(pearson(xs, ys), want_p, rtol=1e-12)


def test_hand_worked_coefficients_and_degenerate_rows():
    assert spearman([1, 2, 3, 4], [10, 100, 1000, 10000]) == pytest.approx(1.0)   # monotone, not linear
    assert pearson([1, 2, 3, 4], [10, 100, 1000, 10000]) < 0.9
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert np.isnan(spearman([1, 2, 3], [5, 5, 5]))                    # constant
    assert np.isnan(pearson([1, 2], [1, 2]))                           # fewer than 3 points
    assert np.isnan(spearman([1, 2, np.nan, 4], [1, 2, 3, 4]))          # non-finite
    with pytest.raises(ValueError, match="same number of points"):
        spearman([1, 2, 3], [1, 2])


def test_bootstrap_matches_a_naive_loop_and_scipy():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4, 6))                                        # (points, seeds)
    y = x + rng.normal(size=(4, 6))
    stat = lambda a, b: spearman(a.mean(-1), b.mean(-1))
    lo, hi, dist = bootstrap_ci(stat, x, y, n_resamples=300, seed=7, return_distribution=True)
    idx = np.random.default_rng(7).integers(0, 6, (300, 6))
    naive = np.array([scipy.stats.spearmanr(x[:, i].mean(1), y[:, i].mean(1)).statistic for i in idx])
    np.testing.assert_allclose(dist, naive, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose([lo, hi], np.percentile(naive, [2.5, 97.5]), rtol=1e-12)
    # the mean of one sample: the same interval as scipy's percentile bootstrap, up to Monte Carlo error
    z = rng.normal(size=40)
    lo, hi = bootstrap_ci(lambda a: a.mean(-1), z, n_resamples=20000, seed=0)
    ref = scipy.stats.bootstrap((z,), np.mean, n_resamples=20000, method="percentile", random_state=0)
    assert lo == pytest.approx(ref.confidence_interval.low, abs=0.02)
    assert hi == pytest.approx(ref.confidence_interval.high, abs=0.02)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci(lambda a: a.mean(-1), z, confidence=1.0)
    with pytest.raises(ValueError, match="n_resamples"):
        bootstrap_ci(lambda a: a.mean(-1), z, n_resamples=0)


def test_correlations_of_a_known_dataset():
    steps, seeds = [2, 3, 4, 5], [0, 1, 2]
    base = np.array([1.0, 2.0, 3.0, 4.0])
    noise = np.random.default_rng(3).normal(0, 0.01, (2, 4, 3))
    smooth = xr.DataArray((base[None, :, None] + noise)[..., None], dims=("model", "step", "seed", "score"),
                          coords={"model": ["a", "b"], "step": steps, "seed": seeds, "score": ["s"]})
    err = xr.DataArray(np.exp(smooth.values), dims=("model", "step", "seed", "error"),
                       coords={"model": ["a", "b"], "step": steps, "seed": seeds, "error": ["e"]})
    ds = correlate.correlations(smooth, err, n_resamples=200)
    for g in ("a", "b"):                                               # monotone within each model
        assert float(ds.spearman.sel(group=g, score="s", error="e")) == pytest.approx(1.0)
        assert float(ds.spearman_low.sel(group=g, score="s", error="e")) == pytest.approx(1.0)
    pooled_x = smooth.mean("seed").sel(score="s").values.ravel()
    pooled_y = err.mean("seed").sel(error="e").values.ravel()
    assert float(ds.pearson.sel(group="all", score="s", error="e")) == pytest.approx(
        scipy.stats.pearsonr(pooled_x, pooled_y).statistic, rel=1e-12)
    assert int(ds.n_points.sel(group="all", score="s", error="e")) == 8
    one = correlate.correlations(smooth.isel(seed=[0]), err.isel(seed=[0]), n_resamples=50)
    assert np.isnan(one.spearman_low).all() and np.isfinite(one.spearman).all()   # no interval from one seed


# ------------------------------------------------------------------ caching errors
def test_output_errors_and_psnr_hand_worked():
    full = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    cos, rel = caching_error.output_errors(2 * full, full)
    assert cos == pytest.approx(0.0, abs=1e-12) and rel == pytest.approx(1.0)
    a, b = torch.rand(3, 1, 8, 8) * 2 - 1, torch.rand(3, 1, 8, 8) * 2 - 1
    assert caching_error.psnr(a, b) == pytest.approx(float(metrics.psnr(a, b).mean()), rel=1e-12)
    video = torch.zeros(1, 1, 2, 2, 2)                                 # 5-D: flattened per sample
    assert caching_error.psnr(video + 0.1, video, data_range=2.0) == pytest.approx(10 * np.log10(4 / 0.01))


SAMPLER = SamplerConfig(num_steps=8, clip_denoised=True)


def _naive_errors(model, method, k, step, lag, first, last, seed, y, shape):
    """Whole chains, no shortcuts: the uncached chain, the per-step cached call, the masked chain."""
    diff = Diffusion.for_config(SAMPLER)
    with torch.no_grad():
        recs = list(diff.sample_steps(model, shape, y, SAMPLER, seed=seed))
        ref = recs[-1].x_next
        t = lambda s: torch.full((shape[0],), recs[s - 1].timestep)
        cache = CacheConfig(method=method, k=k, interval=2, t_start=1000, t_stop=-1)
        with apply_cache(model, cache):
            diff.model_output(model, recs[step - lag - 1].x_t, t(step - lag), y, SAMPLER)
            out = diff.model_output(model, recs[step - 1].x_t, t(step), y, SAMPLER)
        c = shape[1]
        cos, rel = caching_error.output_errors(out[:, :c], recs[step - 1].model_output[:, :c])
        mask = Schedule.from_mask([not (first <= s <= last) for s in range(1, SAMPLER.num_steps + 1)])
        with apply_cache(model, CacheConfig(method=method, k=k, mask=mask)):
            x0 = diff.sample(model, shape, y, SAMPLER, seed=seed)
    return cos, rel, caching_error.psnr(x0, ref)


def _cfg(steps=(3, 8), seeds=(0, 1), **kw):
    surf = SurfaceConfig(steps=steps, sampler=SAMPLER, alpha="-0.2:0.2:3", beta="-0.2:0.2:3", seeds=seeds)
    return correlate.CorrelateConfig(surface=surf, k=1, n_resamples=100, **kw)


def test_caching_errors_equal_naive_whole_chains(make_model):
    model = make_model("DiT-Mini/2-skip", seed=1)
    cfg = _cfg(steps=(2, 5, 8), seeds=(4,), lag=1, window=1)
    err = correlate.caching_errors({"skip": model}, cfg)
    assert err.method.values.tolist() == ["skip-cache"]
    for s in (2, 5, 8):
        first, last = cfg.window_of(s)
        want = _naive_errors(model, "skip-cache", 1, s, 1, first, last, 4, torch.tensor([0]), (1, 2, 8, 8))
        np.testing.assert_allclose(err.sel(model="skip", step=s, seed=4).values, want, rtol=1e-6)
    assert (err.sel(error="rel_l2") > 0).all()


def test_caching_errors_on_an_unconditional_video_model():
    model = ToyVideo(skips=False).eval()
    cfg = _cfg(steps=(4, 6), seeds=(0,), lag=2, window=2, method="deep-reuse")
    err = correlate.caching_errors({"toy": model}, cfg)
    first, last = cfg.window_of(6)
    want = _naive_errors(model, "deep-reuse", 1, 6, 2, first, last, 0, None, (1, 1, 3, 4, 4))
    np.testing.assert_allclose(err.sel(model="toy", step=6, seed=0).values, want, rtol=1e-6)


def test_step_error_is_zero_when_the_cache_holds_the_same_input(make_model):
    model = make_model("DiT-Mini/2")
    x = torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    t, y = torch.tensor([500]), torch.tensor([1])
    diff = Diffusion.for_config(SAMPLER)
    with torch.no_grad():
        ref = model(x, t, y)
        cos, rel = caching_error.step_error(model, CacheConfig(method="deep-reuse", k=1), diff, SAMPLER, x, t, x, t, y, ref)
    assert cos == pytest.approx(0.0, abs=1e-12) and rel == pytest.approx(0.0, abs=1e-7)


# ------------------------------------------------------------------ the Dataset
@pytest.fixture(scope="module")
def result(make_model):
    entries = [ModelEntry("dit", make_model("DiT-Mini/2")), ModelEntry("skip", make_model("DiT-Mini/2-skip", seed=1))]
    return correlate.compute(entries, _cfg(), log=lambda *a: None)


def test_compute_labels_and_records_everything(result):
    ds = result
    assert ds.smoothness.dims == ("model", "step", "seed", "score")
    assert ds.caching_error.dims == ("model", "step", "seed", "error")
    assert ds.spearman.dims == ("group", "score", "error")
    assert list(ds.group.values) == ["all", "dit", "skip"]
    assert list(ds.method.values) == ["deep-reuse", "skip-cache"]
    assert ds.timestep.values.tolist() == [Diffusion.for_config(SAMPLER).timestep_of(s) for s in (3, 8)]
    for key in ("config", "seeds", "lag", "window", "k", "chain", "n_resamples", "bootstrap_seed", "confidence"):
        assert key in ds.attrs
    assert np.isfinite(ds.caching_error).all() and np.isfinite(ds.smoothness.sel(score="mean_deviation")).all()
    m = ds.mean("seed")                                                # the coefficient is that of the seed means
    x = m.smoothness.sel(score="total_variation").values.ravel()
    y = m.caching_error.sel(error="rel_l2").values.ravel()
    assert float(ds.spearman.sel(group="all", score="total_variation", error="rel_l2")) == pytest.approx(
        scipy.stats.spearmanr(x, y).statistic)


def test_table_and_scatter(result):
    text = correlate.table(result)
    assert "spearman" in text and "skip" in text and "rel_l2" in text
    fig = correlation_scatter(result, "total_variation", "psnr")
    assert isinstance(fig, matplotlib.figure.Figure)
    assert len(fig.axes[0].texts) == 4                                  # 2 models x 2 steps labelled
    with pytest.raises(ValueError, match="unknown score 'nope'; allowed: mean_deviation"):
        correlation_scatter(result, "nope")


def test_given_surfaces_must_match(result, make_model):
    from smoothness import surface
    cfg = _cfg(seeds=(0,))
    entries = [ModelEntry("dit", make_model("DiT-Mini/2"))]
    surf = surface.compute(entries, cfg.surface, progress=False, log=lambda *a: None)
    with pytest.raises(ValueError, match="lack step"):
        correlate.compute(entries, _cfg(steps=(3, 7), seeds=(0,)), surfaces=surf, log=lambda *a: None)


@pytest.mark.parametrize("kw, match", [
    (dict(method="nope"), "unknown method 'nope'; allowed: auto, skip-cache"),
    (dict(method="magcache"), r"unknown method 'magcache' \(it decides at run time; the caching errors cache "
                              r"chosen steps, so static methods only\); allowed: auto, skip-cache"),
    (dict(lag=3), "step 3 has no step 0 to fill the cache from"),
    (dict(window=-1), "window=-1 is not allowed"),
    (dict(confidence=1.5), "confidence=1.5 is not allowed"),
    (dict(readout="blocks.1"), "readout 'blocks.1' is not among"),
])
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        _cfg(**kw)


@pytest.mark.parametrize("argv, match", [
    (["--score", "bumpiness"], "unknown --score 'bumpiness'; allowed: mean_deviation"),
    (["--error", "fid"], "unknown --error 'fid'; allowed: cosine_distance"),
    (["--method", "magic"], "unknown method 'magic'; allowed: auto"),
    (["--steps", "1,10"], "step 1 has no step 0"),
    (["--steps", "300"], "step 300 is outside the chain; allowed: 1..250"),
    (["--seeds", "0,0"], "--seeds '0,0' repeats a value"),
    (["--resamples", "0"], "n_resamples=0 is not allowed"),
    (["--sampler", "euler"], "unknown sampler 'euler'; allowed: ddpm, ddim"),
    (["--threads", "0"], "--threads=0 is not allowed"),
    (["--jobs", "0"], "--jobs=0 is not allowed"),
])
def test_cli_bad_values_exit_2_with_a_message(argv, match, capsys, tmp_path):
    assert run_cli(correlate_cli.main, argv + ["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err and "Traceback" not in err


def test_cli_end_to_end_on_tiny_checkpoints(make_model, tmp_path, capsys):
    for name, model in (("plain", make_model("DiT-Mini/2")), ("skip", make_model("DiT-Mini/2-skip", seed=1))):
        torch.save({"ema": model.state_dict()}, tmp_path / f"{name}.pt")
    argv = ["--ckpt", str(tmp_path / "plain.pt"), "--ckpt", str(tmp_path / "skip.pt"), "--num-steps", "6",
            "--steps", "3,6", "--seeds", "0,1", "--grid=-0.2:0.2:3", "--k", "1", "--resamples", "50",
            "--jobs", "1", "--out", str(tmp_path / "out")]
    assert run_cli(correlate_cli.main, argv) == 0
    assert "spearman rho" in capsys.readouterr().out
    ds = xr.open_dataset(tmp_path / "out" / "correlate_plain_skip.nc", engine="h5netcdf").load()
    assert list(ds.model.values) == ["plain", "skip"] and list(ds.method.values) == ["deep-reuse", "skip-cache"]
    assert ds.attrs["chain"] == "DDPM-6" and ds.attrs["k"] == 1 and ds.sizes["seed"] == 2
    assert (tmp_path / "out" / "correlate_plain_skip.png").stat().st_size > 0
    from smoothness.surface import io
    surf = io.load(tmp_path / "out" / "correlate_plain_skip_surface.nc")
    assert list(surf.model.values) == ["plain", "skip"] and "plain" in surf.attrs["models"]
    # the saved pieces reproduce the correlation without recomputing anything
    cfg = correlate_cli.config_from_args(correlate_cli._parser().parse_args(argv))
    entries = [ModelEntry("plain", None), ModelEntry("skip", None)]
    again = correlate.compute(entries, cfg, surfaces=surf, errors=ds.caching_error, log=lambda *a: None)
    np.testing.assert_allclose(again.spearman.values, ds.spearman.values)
    with pytest.raises(ValueError, match="lag=1, window=2, not this config's lag=2"):
        correlate.compute(entries, replace(cfg, lag=2), surfaces=surf, errors=ds.caching_error, log=lambda *a: None)
