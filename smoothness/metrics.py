"""Fidelity and quality scores as labelled ``xr.DataArray`` objects.

Fidelity compares a cached run with the uncached run from the same seed, per sample: ``mse``,
``psnr`` and ``ssim`` (Wang et al. 2004, implemented here, checked against scikit-image). Videos
(N, C, F, H, W) are scored per frame and averaged over frames; ``temporal_change`` measures the
frame-to-frame change of each video, to set a cached run's beside the uncached one's. Inputs are
(N, C, H, W) tensors in pixel space for the bundled models or latent space for latent models; pass
``data_range`` accordingly (2.0 for [-1, 1] pixels).

``step_cosine`` compares two chains step by step (the sampler's ``Step`` records) and
``site_cosine`` compares recorded features at block sites (``hooks.record``), as in the paper's
teaser (a). ``classifier_accuracy`` and ``frechet_distance`` score distribution quality of digits
samples with the shipped classifier.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr

from . import data
from .data import classifier as clf


def _pair(a, b) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}; compare runs of the same size")
    if a.dim() not in (4, 5):
        raise ValueError(f"expected (N, C, H, W) images or (N, C, F, H, W) videos, got shape {tuple(a.shape)}")
    return a, b


def _frames(x: torch.Tensor) -> torch.Tensor:
    """(N, C, F, H, W) -> (N*F, C, H, W), sample-major; images pass through."""
    if x.dim() == 4:
        return x
    n, c, f, h, w = x.shape
    return x.transpose(1, 2).reshape(n * f, c, h, w)


def _frame_mean(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-frame values (N*F,) -> per-video mean (N,); images pass through."""
    return values if like.dim() == 4 else values.reshape(like.shape[0], like.shape[2]).mean(dim=1)


def _per_sample(values: torch.Tensor, name: str, long_name: str, units: str, **attrs) -> xr.DataArray:
    return xr.DataArray(values.numpy(), dims=("sample",), coords={"sample": np.arange(len(values))}, name=name,
                        attrs={"long_name": long_name, "units": units, **attrs})


def mse(a, b) -> xr.DataArray:
    """Mean squared error per sample; dims ("sample",)."""
    a, b = _pair(a, b)
    return _per_sample(((a - b) ** 2).flatten(1).mean(dim=1), "mse", "mean squared error", "(data units)^2")


def psnr(a, b, data_range: float = 2.0) -> xr.DataArray:
    """Peak signal-to-noise ratio per sample, 10 log10(range^2 / mse); inf where identical."""
    if not data_range > 0:
        raise ValueError(f"data_range={data_range!r} is not allowed; use a positive number")
    a, b = _pair(a, b)
    err = ((_frames(a) - _frames(b)) ** 2).mean(dim=(1, 2, 3))
    val = _frame_mean(10 * torch.log10(data_range ** 2 / err), a)       # inf where err == 0
    return _per_sample(val, "psnr", "peak signal-to-noise ratio" + (", mean over frames" if a.dim() == 5 else ""),
                       "dB", data_range=data_range)


def _window(gaussian: bool, win_size: int | None, sigma: float) -> torch.Tensor:
    if gaussian:
        radius = int(3.5 * sigma + 0.5)                  # scipy.ndimage truncate=3.5, as scikit-image
        size = 2 * radius + 1 if win_size is None else win_size
        x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
        w = torch.exp(-x ** 2 / (2 * sigma ** 2))
    else:
        size = 7 if win_size is None else win_size
        w = torch.ones(size, dtype=torch.float64)
    return w / w.sum()                                   # (size,) separable 1-D window


def ssim(a, b, data_range: float = 2.0, gaussian: bool = True, sigma: float = 1.5,
         win_size: int | None = None, sample_covariance: bool | None = None) -> xr.DataArray:
    """Structural similarity per sample, mean over the valid window positions and channels.

    Defaults follow Wang et al. (Gaussian window sigma 1.5, 11 taps, population covariance), the same
    as ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False)``. ``gaussian=False`` gives scikit-image's default 7x7 uniform window
    with sample covariance. Only window positions fully inside the image count (scikit-image crops).
    """
    if not data_range > 0:
        raise ValueError(f"data_range={data_range!r} is not allowed; use a positive number")
    a, b = _pair(a, b)
    video = a
    a, b = _frames(a), _frames(b)
    w = _window(gaussian, win_size, sigma)
    size = len(w)
    if size % 2 == 0 or size > min(a.shape[-2:]):
        raise ValueError(f"window size {size} is not allowed for {tuple(a.shape[-2:])} images; "
                         "use an odd size no larger than the image")
    if sample_covariance is None:
        sample_covariance = not gaussian
    n, c = a.shape[:2]
    kern = (w[:, None] * w[None, :]).expand(c, 1, size, size)   # (C, 1, k, k) depthwise
    filt = lambda x: F.conv2d(x, kern, groups=c)                  # valid positions only
    ux, uy = filt(a), filt(b)
    norm = size * size / (size * size - 1) if sample_covariance else 1.0
    vx = norm * (filt(a * a) - ux * ux)
    vy = norm * (filt(b * b) - uy * uy)
    vxy = norm * (filt(a * b) - ux * uy)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
    return _per_sample(_frame_mean(s.mean(dim=(1, 2, 3)), video), "ssim",
                       "structural similarity" + (", mean over frames" if video.dim() == 5 else ""), "1",
                       data_range=data_range,
                       window=("gaussian" if gaussian else "uniform"), win_size=size, sigma=sigma)


def temporal_change(x) -> xr.DataArray:
    """Frame-to-frame change of each video (N, C, F, H, W): the RMS of x[f+1] - x[f], mean over the
    F-1 consecutive pairs. Compare a cached run's with the uncached run's (same seed)."""
    x = torch.as_tensor(x).double()
    if x.dim() != 5 or x.shape[2] < 2:
        raise ValueError(f"temporal_change needs videos (N, C, F, H, W) with F >= 2, got shape {tuple(x.shape)}")
    rms = ((x[:, :, 1:] - x[:, :, :-1]) ** 2).mean(dim=(1, 3, 4)).sqrt()   # (N, F-1)
    return _per_sample(rms.mean(dim=1), "temporal_change", "RMS change between consecutive frames, "
                       "mean over frame pairs", "data units")


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity per row of two (N, ...) tensors, in float64."""
    return F.cosine_similarity(a.double().flatten(1), b.double().flatten(1), dim=1)


def step_cosine(steps_a, steps_b, field: str = "model_output") -> xr.DataArray:
    """Per-step cosine similarity between two chains' ``Step`` records; dims ("step", "sample")."""
    steps_a, steps_b = list(steps_a), list(steps_b)
    if len(steps_a) != len(steps_b):
        raise ValueError(f"the chains have {len(steps_a)} and {len(steps_b)} steps; compare equal chains")
    if field not in ("model_output", "pred_x0", "x_t", "x_next"):
        raise ValueError(f"field={field!r} is not allowed; use model_output, pred_x0, x_t or x_next")
    vals = torch.stack([_cosine(getattr(sa, field), getattr(sb, field)) for sa, sb in zip(steps_a, steps_b)])
    return xr.DataArray(vals.numpy(), dims=("step", "sample"),
                        coords={"step": [s.step for s in steps_a], "timestep": ("step", [s.timestep for s in steps_a]),
                                "sample": np.arange(vals.shape[1])},
                        name="cosine", attrs={"long_name": f"cosine similarity of {field}", "units": "1"})


def site_cosine(rec_a, rec_b, sites=None) -> xr.DataArray:
    """Cosine similarity of features recorded at block sites in two runs (``hooks.record`` results,
    one tensor per call); dims ("site", "call", "sample")."""
    sites = list(sites or rec_a.keys())
    missing = [s for s in sites if s not in rec_a or s not in rec_b]
    if missing:
        raise ValueError(f"sites {missing} were not recorded in both runs; recorded: {sorted(rec_a)}")
    calls = min(len(rec_a[s]) for s in sites)
    if any(len(rec_a[s]) != len(rec_b[s]) for s in sites):
        raise ValueError("the two recordings have different numbers of calls; record the same chain")
    vals = torch.stack([torch.stack([_cosine(rec_a[s][i], rec_b[s][i]) for i in range(calls)]) for s in sites])
    steps = [m[0] for m in rec_a.meta[sites[0]][:calls]] if hasattr(rec_a, "meta") else list(range(calls))
    return xr.DataArray(vals.numpy(), dims=("site", "call", "sample"),
                        coords={"site": sites, "call": np.arange(calls), "step": ("call", steps),
                                "sample": np.arange(vals.shape[-1])},
                        name="cosine", attrs={"long_name": "cosine similarity of site features", "units": "1"})


@torch.no_grad()
def classifier_accuracy(images, labels, classifier=None) -> xr.DataArray:
    """Share of ``images`` (N, 1, 16, 16) in [-1, 1] that the digits classifier assigns to ``labels``."""
    model = classifier or clf.load()
    images = torch.as_tensor(images).float().clamp(-1, 1)
    labels = torch.as_tensor(labels).long()
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    acc = (model(images).argmax(1) == labels).double().mean().item()
    return xr.DataArray(acc, name="accuracy", attrs={"long_name": "digits-classifier accuracy on requested "
                                                                  "classes", "units": "1", "samples": len(labels)})


def video_digit_scores(videos, classifier=None, confident: float = 0.9, ink: float = -0.5) -> dict:
    """Do samples of the moving-digits models show digits? Each frame of ``videos`` (N, 1, F, 16, 16)
    in [-1, 1] is cropped to the 12x12 box centred on its ink (pixels above ``ink``), as a digit is
    drawn, upsampled to the classifier's 16x16 and classified (on real test videos this finds the
    digit's label in 99 % of frames). Returns the mean confidence (top softmax probability), the share
    of frames classified with at least ``confident``, label consistency (the share of frames that agree
    with their video's majority label: 1 when a video shows one digit throughout), the share of the 10
    digits that are some video's majority label, and ``labels`` (N, F)."""
    model = classifier or clf.load()
    v = torch.as_tensor(videos).float().clamp(-1, 1)
    if v.dim() != 5 or tuple(v.shape[1:2] + v.shape[3:]) != (1, data.SIZE, data.SIZE):
        raise ValueError(f"videos must be (N, 1, F, {data.SIZE}, {data.SIZE}); got {tuple(v.shape)}")
    n, _, f = v.shape[:3]
    frames = v.transpose(1, 2).reshape(n * f, data.SIZE, data.SIZE)
    mask = frames > ink
    idx = torch.arange(data.SIZE)

    def centre(hit):                                   # (N*F, 16) rows or columns with ink
        lo = torch.where(hit, idx, data.SIZE).min(1).values
        hi = torch.where(hit, idx, -1).max(1).values
        mid = torch.where(hit.any(1), (lo + hi) / 2, torch.tensor((data.SIZE - 1) / 2))
        return (mid - (data.DIGIT - 1) / 2).round().long().clamp(0, data.ROOM)

    rows, cols = centre(mask.any(2)), centre(mask.any(1))
    d = data.DIGIT
    crops = torch.stack([frames[i, r:r + d, c:c + d] for i, (r, c) in enumerate(zip(rows.tolist(), cols.tolist()))])
    crops = F.interpolate(crops.unsqueeze(1), size=(data.SIZE, data.SIZE), mode="bilinear", align_corners=False)
    with torch.no_grad():
        conf, label = model(crops).softmax(-1).max(-1)
    conf, label = conf.reshape(n, f), label.reshape(n, f)
    majority = label.mode(dim=1).values
    return {"confidence": float(conf.mean()), "confident_frames": float((conf >= confident).double().mean()),
            "label_consistency": float((label == majority[:, None]).double().mean()),
            "digits_covered": len(set(majority.tolist())) / 10, "labels": label}


def frechet_from_features(fa, fb) -> float:
    """Frechet distance between Gaussians fitted to two (N, D) feature sets."""
    from scipy import linalg
    fa, fb = np.asarray(fa, dtype=np.float64), np.asarray(fb, dtype=np.float64)
    if fa.ndim != 2 or fb.ndim != 2 or fa.shape[1] != fb.shape[1] or min(len(fa), len(fb)) < 2:
        raise ValueError(f"need two (N >= 2, D) feature sets of the same D, got {fa.shape} and {fb.shape}")
    mu_a, mu_b = fa.mean(0), fb.mean(0)
    ca, cb = np.atleast_2d(np.cov(fa, rowvar=False)), np.atleast_2d(np.cov(fb, rowvar=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(ca @ cb)
        if not np.isfinite(covmean).all():             # singular product: regularise as pytorch-fid does
            eps = np.eye(len(ca)) * 1e-6
            covmean = linalg.sqrtm((ca + eps) @ (cb + eps))
    covmean = np.real(covmean)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(ca) + np.trace(cb) - 2 * np.trace(covmean))


@torch.no_grad()
def frechet_distance(images, reference=None, classifier=None) -> xr.DataArray:
    """Frechet distance in the digits classifier's 64-d feature space between ``images`` and real
    digits (default: the held-out test split)."""
    model = classifier or clf.load()
    ref = data.load("test").images if reference is None else torch.as_tensor(reference)
    fa = model.features(torch.as_tensor(images).float().clamp(-1, 1)).numpy()
    fb = model.features(ref.float()).numpy()
    return xr.DataArray(frechet_from_features(fa, fb), name="frechet",
                        attrs={"long_name": "Frechet distance in digits-classifier features (64-d)",
                               "units": "1", "samples": len(fa), "reference_samples": len(fb)})
