"""Fidelity and quality metrics against scikit-image, scipy and hand-worked values."""
import numpy as np
import pytest
import torch
from skimage.metrics import (
    mean_squared_error,
    peak_signal_noise_ratio,
    structural_similarity,
)

from smoothness import data, hooks, metrics
from smoothness.diffusion import Diffusion, SamplerConfig
from smoothness.models import build


def pair(shape=(3, 1, 16, 16), seed=0, noise=0.3):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1
    b = (a + noise * torch.randn(shape, generator=g, dtype=torch.float64)).clamp(-1, 1)
    return a, b


@pytest.mark.parametrize("shape", [(3, 1, 16, 16), (2, 3, 24, 20)])
@pytest.mark.parametrize("gaussian", [True, False])
def test_ssim_matches_skimage(shape, gaussian):
    a, b = pair(shape)
    ours = metrics.ssim(a, b, data_range=2.0, gaussian=gaussian)
    for i in range(shape[0]):
        kw = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False) if gaussian else {}
        ref = structural_similarity(a[i].numpy(), b[i].numpy(), data_range=2.0, channel_axis=0, **kw)
        assert ours.values[i] == pytest.approx(ref, abs=1e-10)
    assert ours.dims == ("sample",) and ours.attrs["win_size"] == (11 if gaussian else 7)


def test_ssim_sample_covariance_with_gaussian_window():
    a, b = pair()
    ours = metrics.ssim(a, b, gaussian=True, sample_covariance=True)
    ref = structural_similarity(a[0, 0].numpy(), b[0, 0].numpy(), data_range=2.0, gaussian_weights=True)
    assert ours.values[0] == pytest.approx(ref, abs=1e-10)


def test_psnr_and_mse_match_skimage():
    a, b = pair()
    p, m = metrics.psnr(a, b, data_range=2.0), metrics.mse(a, b)
    for i in range(3):
        assert m.values[i] == pytest.approx(mean_squared_error(a[i].numpy(), b[i].numpy()), rel=1e-12)
        assert p.values[i] == pytest.approx(peak_signal_noise_ratio(a[i].numpy(), b[i].numpy(), data_range=2.0),
                                            rel=1e-12)
    assert p.attrs["units"] == "dB"


def test_identical_inputs():
    a, _ = pair()
    assert np.isinf(metrics.psnr(a, a).values).all()
    assert metrics.ssim(a, a).values == pytest.approx(1.0)
    assert (metrics.mse(a, a).values == 0).all()


def test_psnr_hand_value():
    a = torch.zeros(1, 1, 4, 4)
    b = torch.full((1, 1, 4, 4), 0.2)                     # mse 0.04, range 2 -> 10 log10(4 / 0.04) = 20 dB
    assert metrics.psnr(a, b, data_range=2.0).item() == pytest.approx(20.0)


def test_bad_inputs():
    a, b = pair()
    with pytest.raises(ValueError, match=r"\(3, 1, 16, 16\) vs \(2, 1, 16, 16\)"):
        metrics.psnr(a, b[:2])
    with pytest.raises(ValueError, match="window size 11"):
        metrics.ssim(a[..., :8, :8], b[..., :8, :8])
    with pytest.raises(ValueError, match="data_range=0"):
        metrics.psnr(a, b, data_range=0)


def test_frechet_hand_values():
    g = np.random.default_rng(0)
    fa, fb = g.normal(0, 1, (4000, 1)), g.normal(2, 3, (4000, 1))
    va, vb = fa.var(ddof=1), fb.var(ddof=1)
    hand = (fa.mean() - fb.mean()) ** 2 + va + vb - 2 * np.sqrt(va * vb)
    assert metrics.frechet_from_features(fa, fb) == pytest.approx(hand, rel=1e-9)
    assert metrics.frechet_from_features(fa, fa) == pytest.approx(0.0, abs=1e-9)
    # diagonal 2-D: sum of the 1-D distances
    da, db = g.normal(0, [1, 2], (5000, 2)), g.normal([1, 0], [2, 2], (5000, 2))
    assert metrics.frechet_from_features(da, db) == pytest.approx(1 + 1 + 0, abs=0.15)


def test_classifier_scores_real_digits():
    ds = data.load("test")
    acc = metrics.classifier_accuracy(ds.images, ds.labels)
    assert acc.item() > 0.9 and acc.attrs["samples"] == len(ds.labels)
    fd_real = metrics.frechet_distance(ds.images[:150], ds.images[150:]).item()
    fd_noise = metrics.frechet_distance(torch.rand(150, 1, 16, 16) * 2 - 1, ds.images[150:]).item()
    assert fd_real < fd_noise


def _tiny():
    m = build("DiT-Mini/2-skip", input_size=8, in_channels=1, num_classes=10)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return m.eval()


def test_step_and_site_cosine():
    torch.set_num_threads(1)
    m, sc = _tiny(), SamplerConfig(num_steps=5)
    diff = Diffusion.for_config(sc)
    y = torch.tensor([1, 2])
    with torch.no_grad(), hooks.record(m, "blocks.0-1") as ra:
        a = list(diff.sample_steps(m, (2, 1, 8, 8), y, sc, seed=0))
    with torch.no_grad(), hooks.record(m, "blocks.0-1") as rb:
        b = list(diff.sample_steps(m, (2, 1, 8, 8), y, sc, seed=1))
    same = metrics.step_cosine(a, a)
    assert same.dims == ("step", "sample") and np.allclose(same.values, 1.0)
    assert list(same.timestep.values) == diff.chain
    other = metrics.step_cosine(a, b, field="x_t")
    assert (other.values < 0.99).all()
    sites = metrics.site_cosine(ra, rb)
    assert sites.dims == ("site", "call", "sample") and list(sites.site.values) == ["blocks.0", "blocks.1"]
    assert list(sites.step.values) == [1, 2, 3, 4, 5]
    assert np.allclose(metrics.site_cosine(ra, ra).values, 1.0)


def test_video_scores_are_frame_averages_of_image_scores():
    from skimage.metrics import peak_signal_noise_ratio

    g = torch.Generator().manual_seed(4)
    a = torch.rand(2, 1, 3, 12, 12, generator=g) * 2 - 1
    b = (a + 0.1 * torch.randn(a.shape, generator=g)).clamp(-1, 1)
    for n in range(2):
        frames = [peak_signal_noise_ratio(a[n, :, f].numpy(), b[n, :, f].numpy(), data_range=2.0) for f in range(3)]
        assert float(metrics.psnr(a, b)[n]) == pytest.approx(np.mean(frames), rel=1e-6)
        per_frame = [float(metrics.ssim(a[n:n + 1, :, f], b[n:n + 1, :, f], win_size=7)[0]) for f in range(3)]
        assert float(metrics.ssim(a, b, win_size=7)[n]) == pytest.approx(np.mean(per_frame), rel=1e-9)


def test_temporal_change_by_hand():
    x = torch.zeros(1, 1, 3, 2, 2)
    x[0, 0, 1] = 1.0          # frame 0 -> 1 changes by 1 everywhere, 1 -> 2 by 1 on one pixel of four
    x[0, 0, 2] = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    assert float(metrics.temporal_change(x)[0]) == pytest.approx((1.0 + 0.5) / 2)
    with pytest.raises(ValueError, match="F >= 2"):
        metrics.temporal_change(torch.zeros(1, 1, 1, 2, 2))
