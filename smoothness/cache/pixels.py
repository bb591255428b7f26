"""The cache sweep's fidelity scores, on the samples as they are or on decoded pixels.

Without a VAE, PSNR / SSIM / MSE (and, for videos, the temporal-change ratio) compare the final
samples as the chain leaves them: [-1, 1] pixels for the bundled models, latents for latent
checkpoints, scored with ``data_range`` 2. With a VAE (``models.Vae``) both runs are decoded to RGB
in [0, 1] first and those names hold the pixel-space scores (``data_range`` 1), as the paper reports
them; the latent-space scores stay available as ``latent_psnr``, ``latent_ssim``, ``latent_mse``
and ``latent_temporal_change_ratio``. The reference run is decoded once per (model, seed). With an
LPIPS as well (``models.Lpips``, ``--lpips``), ``lpips`` holds its distance between the decoded runs.
"""
from __future__ import annotations

import xarray as xr

from .. import metrics

SAMPLE_RANGE = 2.0                # peak-to-peak range of the samples as the chain leaves them ([-1, 1])
PIXEL_RANGE = 1.0                 # decoded pixels in [0, 1]
LATENT = {  # variable: (long name, units), only with a VAE
    "latent_psnr": ("PSNR of the latents against the uncached run, mean over samples (data range 2)", "dB"),
    "latent_ssim": ("SSIM of the latents against the uncached run, mean over samples (data range 2)", "1"),
    "latent_mse": ("MSE of the latents against the uncached run, mean over samples", "(latent units)^2"),
    "latent_temporal_change_ratio": ("videos: frame-to-frame change of the cached run's latents / of the "
                                     "uncached run's, mean over samples", "1"),
}
PIXEL_NAMES = {  # variable: (long name, units) with a VAE: the sweep's own names, on decoded pixels
    "psnr": ("PSNR of the decoded RGB pixels in [0, 1] against the uncached run, mean over samples", "dB"),
    "ssim": ("SSIM of the decoded RGB pixels in [0, 1] against the uncached run, mean over samples", "1"),
    "mse": ("MSE of the decoded RGB pixels in [0, 1] against the uncached run, mean over samples", "(pixel units)^2"),
    "temporal_change_ratio": ("videos: frame-to-frame change of the cached run's decoded pixels / of the "
                              "uncached run's, mean over samples", "1"),
}
LPIPS = ("LPIPS (AlexNet, v0.1) of the decoded RGB pixels against the uncached run, mean over samples "
         "(videos: over frames first); lower is closer", "1")


def extra(vae, lpips=None) -> tuple[str, ...]:
    """The variables a sweep adds to its own: the latent-space scores with a VAE (and ``lpips`` with
    an LPIPS), none without."""
    return (*(LATENT if vae is not None else ()), *(("lpips",) if lpips is not None else ()))


def scores(x, x_ref, data_range: float) -> dict[str, float]:
    """PSNR / SSIM / MSE (and the temporal-change ratio of videos) of ``x`` against ``x_ref``, mean
    over samples; SSIM with the 11-tap Gaussian window, or the largest odd one that fits."""
    side = min(x.shape[-2:])
    win = min(11, side if side % 2 else side - 1)
    out = {"psnr": metrics.psnr(x, x_ref, data_range=data_range).mean().item(),
           "ssim": metrics.ssim(x, x_ref, data_range=data_range, win_size=win).mean().item(),
           "mse": metrics.mse(x, x_ref).mean().item()}
    if x.dim() == 5:
        out["temporal_change_ratio"] = (metrics.temporal_change(x) / metrics.temporal_change(x_ref)).mean().item()
    return out


def fidelity(data: dict, at, x, x_ref, vae=None, lpips=None):
    """Fill cell ``at`` of the sweep's arrays ``data`` ({variable: array}) from the final samples of a
    cached run ``x`` and of the uncached run ``x_ref``; with ``vae``, on decoded pixels (and their
    LPIPS with ``lpips``)."""
    if vae is not None:
        for k, v in scores(x, x_ref, SAMPLE_RANGE).items():
            data[f"latent_{k}"][at] = v
        x, x_ref = vae.decode(x), vae.decode(x_ref, reuse=True)        # (N, 3, [F,] H', W') in [0, 1]
        if lpips is not None:
            data["lpips"][at] = lpips(x, x_ref).mean().item()
    for k, v in scores(x, x_ref, PIXEL_RANGE if vae is not None else SAMPLE_RANGE).items():
        data[k][at] = v


def describe(ds: xr.Dataset, data: dict, dims, vae=None, lpips=None):
    """With a VAE: the latent-space variables, the pixel-space long names and the VAE's attributes
    (with an LPIPS: its variable and attributes)."""
    if lpips is not None:
        ds["lpips"] = (dims, data["lpips"], {"long_name": LPIPS[0], "units": LPIPS[1]})
        ds.attrs.update(**lpips.attrs())
    if vae is None:
        return
    for v, (long_name, units) in LATENT.items():
        ds[v] = (dims, data[v], {"long_name": long_name, "units": units})
    for v, (long_name, units) in PIXEL_NAMES.items():
        ds[v].attrs.update(long_name=long_name, units=units)
    ds.attrs.update(data_range=PIXEL_RANGE, latent_data_range=SAMPLE_RANGE, **vae.attrs())
