"""LPIPS (AlexNet, v0.1) from a local weights file, and the cache sweep's ``lpips`` variable.

The oracle is an independent re-implementation of the formula written here: plain
``F.conv2d`` / ``F.max_pool2d`` over AlexNet's layers one image at a time, in float64, with the
unit normalisation and the 1x1 weighting spelled out. (The ``lpips`` package itself needs torchvision,
which this project does not install.) The weights are random, in the package's state-dict layout."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import xarray as xr

from smoothness.cache import cli as cache_cli
from smoothness.cache.sweep import SweepConfig, run_chain, sweep
from smoothness.chain import config_json
from smoothness.cli import run_cli
from smoothness.diffusion import Diffusion, SamplerConfig
from smoothness.models import Lpips, Vae, load_model, sha256

pytestmark = pytest.mark.usefixtures("single_thread")

# (features index, out channels, in channels, kernel, stride, padding) of the five convolutions, and
# the LPIPS slice each sits in: torchvision's AlexNet, written out from its definition
CONVS = [(0, 64, 3, 11, 4, 2), (3, 192, 64, 5, 1, 2), (6, 384, 192, 3, 1, 1), (8, 256, 384, 3, 1, 1),
         (10, 256, 256, 3, 1, 1)]
POOL_AFTER = (0, 1)               # a 3/2 max-pool follows the first two taps (features 2 and 5)


def full_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """What ``lpips.LPIPS(net='alex').state_dict()`` holds, with random (He-scaled) weights."""
    g = torch.Generator().manual_seed(seed)
    sd = {"scaling_layer.shift": torch.tensor([-.030, -.088, -.188])[None, :, None, None],
          "scaling_layer.scale": torch.tensor([.458, .448, .450])[None, :, None, None]}
    for s, (idx, cout, cin, k, _, _) in enumerate(CONVS, 1):
        sd[f"net.slice{s}.{idx}.weight"] = torch.randn(cout, cin, k, k, generator=g) * math.sqrt(2 / (cin * k * k))
        sd[f"net.slice{s}.{idx}.bias"] = torch.randn(cout, generator=g) * 0.1
        sd[f"lin{s - 1}.model.1.weight"] = torch.rand(1, cout, 1, 1, generator=g) * 0.1   # >= 0, as trained
    return sd


def naive(sd: dict, a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """LPIPS of (N, 3, H, W) images in [0, 1], one image and one layer at a time, float64."""
    sd = {k: v.double() for k, v in sd.items()}
    out = []
    for i in range(len(a)):
        taps = []
        for img in (a[i:i + 1], b[i:i + 1]):
            h = (img.double() * 2 - 1 - sd["scaling_layer.shift"]) / sd["scaling_layer.scale"]
            feats = []
            for s, (idx, _, _, _, stride, pad) in enumerate(CONVS, 1):
                if s - 2 in POOL_AFTER:
                    h = F.max_pool2d(h, kernel_size=3, stride=2)
                h = F.conv2d(h, sd[f"net.slice{s}.{idx}.weight"], sd[f"net.slice{s}.{idx}.bias"], stride=stride,
                             padding=pad).clamp(min=0)
                feats.append(h[0])                                              # (C, H_l, W_l)
            taps.append(feats)
        total = 0.0
        for layer in range(5):
            fa, fb = taps[0][layer], taps[1][layer]
            na = fa / (torch.sqrt((fa ** 2).sum(0)) + 1e-10)                    # unit length over channels
            nb = fb / (torch.sqrt((fb ** 2).sum(0)) + 1e-10)
            w = sd[f"lin{layer}.model.1.weight"].flatten()                      # (C,)
            weighted = sum(w[c] * (na[c] - nb[c]) ** 2 for c in range(len(w)))   # (H_l, W_l)
            total += weighted.mean().item()
        out.append(total)
    return np.array(out)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("lpips") / "lpips_alex.pth"
    sd = full_state_dict()
    torch.save(sd, path)
    return path, sd


def _images(n: int, size, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, *size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("size", [(31, 31), (64, 48)])
def test_distance_equals_the_formula_written_out(weights, size):
    path, sd = weights
    a, b = _images(3, size, 1), _images(3, size, 2)
    want = naive(sd, a, b)
    got64 = Lpips.load(path, dtype=torch.float64, chunk=2)(a, b)
    np.testing.assert_allclose(got64.numpy(), want, rtol=1e-10, atol=1e-12)
    got32 = Lpips.load(path)(a, b)
    assert got32.dtype == torch.float32 and got32.shape == (3,)
    np.testing.assert_allclose(got32.numpy(), want, rtol=1e-5, atol=1e-6)
    assert (want > 0).all()


def test_identical_images_are_exactly_zero_and_order_does_not_matter(weights):
    lpips = Lpips.load(weights[0])
    a, b = _images(4, (40, 40), 3), _images(4, (40, 40), 4)
    assert (lpips(a, a.clone()) == 0).all()
    torch.testing.assert_close(lpips(a, b), lpips(b, a), rtol=1e-6, atol=0)


def test_a_video_is_scored_frame_by_frame(weights):
    lpips = Lpips.load(weights[0], chunk=3)
    a, b = torch.rand(2, 3, 4, 32, 32, generator=torch.Generator().manual_seed(5)), \
        torch.rand(2, 3, 4, 32, 32, generator=torch.Generator().manual_seed(6))
    want = [np.mean(naive(weights[1], a[i].transpose(0, 1), b[i].transpose(0, 1))) for i in range(2)]
    np.testing.assert_allclose(lpips(a, b).numpy(), want, rtol=1e-5)


def test_the_lpips_packages_other_layouts_load(weights, tmp_path):
    """Heads saved without dropout (lin0.model.0.weight) and a file without the scaling buffers."""
    path, sd = weights
    a, b = _images(2, (32, 32), 7), _images(2, (32, 32), 8)
    want = Lpips.load(path)(a, b)
    other = {k.replace(".model.1.", ".model.0."): v for k, v in sd.items() if not k.startswith("scaling_layer")}
    torch.save(other, tmp_path / "other.pth")
    torch.testing.assert_close(Lpips.load(tmp_path / "other.pth")(a, b), want, rtol=0, atol=0)


def test_size_and_shape_limits(weights):
    lpips = Lpips.load(weights[0])
    with pytest.raises(ValueError, match="at least 31x31 pixels; the images are 30x40"):
        lpips(_images(1, (30, 40), 0), _images(1, (30, 40), 1))
    with pytest.raises(ValueError, match="equal-shaped RGB"):
        lpips(torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32))


# ---------------------------------------------------------------- the cache command

@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """A random AutoencoderKL folder (two blocks: 2x upsampling), as tests/test_vae.py's stand-in."""
    diffusers = pytest.importorskip("diffusers")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        vae = diffusers.AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
            latent_channels=4, norm_num_groups=4, sample_size=32, scaling_factor=0.37).eval()
    folder = tmp_path_factory.mktemp("vae") / "sd-vae-ft-ema"
    vae.save_pretrained(str(folder), safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, make_model):
    """Latent DiT stand-ins: 16x16 latents (32x32 decoded pixels) and 8x8 ones (16x16: too small)."""
    folder = tmp_path_factory.mktemp("ckpt")
    for name, size in (("big.pt", 16), ("small.pt", 8)):
        model = make_model("DiT-Mini/2-skip", seed=3, depth=8, input_size=size, in_channels=4, num_classes=10)
        torch.save({"ema": model.state_dict()}, folder / name)
    return folder


def _argv(ckpt, vae_dir, out, *extra):
    return ["--ckpt", str(ckpt), "--vae", str(vae_dir), "--num-sampling-steps", "8", "--methods", "fora",
            "--intervals", "4", "--classes", "0,1", "--per-class", "1", "--out", str(out), "--name", "s", *extra]


def _decoded_runs(model, vae, sampler, interval: int):
    """The cached (fora, every ``interval``) and uncached runs of classes 0 and 1, seed 0, decoded."""
    diffusion = Diffusion.for_config(sampler)
    shape, y = (2, *model.sample_shape()), torch.tensor([0, 1])
    cfg = SweepConfig(sampler, methods=("fora",), intervals=(interval,), classes=(0, 1), per_class=1)
    ref = run_chain(model, diffusion, shape, y, sampler, 0, None)[0]
    run = run_chain(model, diffusion, shape, y, sampler, 0, cfg.settings("fora")[0])[0]
    return vae.decode(run), vae.decode(ref)                                   # (2, 3, 32, 32) in [0, 1]


def test_sweep_lpips_is_the_formula_on_the_decoded_arrays(weights, vae_dir, ckpts):
    """In float64 the sweep's cell equals the written-out formula on the decoded runs to 1e-10."""
    path, sd = weights
    model, vae = load_model(ckpts / "big.pt").eval(), Vae.load(vae_dir)
    sampler = SamplerConfig(num_steps=8, cfg_scale=3.0)
    cfg = SweepConfig(sampler, methods=("fora",), intervals=(4,), classes=(0, 1), per_class=1, vae=vae,
                      lpips=Lpips.load(path, dtype=torch.float64))
    ds = sweep({"m": model}, cfg, log=lambda *a: None)
    want = naive(sd, *_decoded_runs(model, vae, sampler, 4)).mean()
    assert np.isfinite(want) and want > 0
    cell = ds.lpips.sel({"model": "m", "method": "fora", "setting": 0, "seed": 0})
    np.testing.assert_allclose(float(cell), want, rtol=1e-10)


def test_cache_command_writes_lpips_of_the_decoded_runs(weights, vae_dir, ckpts, tmp_path):
    """``--vae --lpips`` on the command: float32 LPIPS of the runs it decoded, its attributes, and a
    configuration of its own (the lpips entry is in the fingerprint)."""
    path, sd = weights
    argv = _argv(ckpts / "big.pt", vae_dir, tmp_path, "--lpips", str(path))
    assert run_cli(cache_cli.main, argv) == 0
    ds = xr.load_dataset(tmp_path / "s.nc", engine="h5netcdf")
    cell = ds.sel({"model": "big", "method": "fora", "setting": 0, "seed": 0})
    assert ds.attrs["lpips_sha256"] == sha256(path) and ds.attrs["lpips_path"] == str(path)
    assert ds.lpips.attrs["units"] == "1" and ds.lpips.dims == ds.psnr.dims
    sampler = SamplerConfig(**json.loads(ds.attrs["grid"])["sampler"])       # the chain the command ran
    a, b = _decoded_runs(load_model(ckpts / "big.pt").eval(), Vae.load(vae_dir), sampler, 4)
    assert float(cell.lpips) == Lpips.load(path)(a, b).mean().item()         # float32, as computed there
    np.testing.assert_allclose(float(cell.lpips), naive(sd, a, b).mean(), rtol=1e-3)   # the random VAE barely
    # moves its pixels (pixel PSNR ~78 dB), so float32 rounding shows at 1e-4 of these tiny distances

    assert run_cli(cache_cli.main, argv) == 0                                  # the same command resumes
    assert run_cli(cache_cli.main, _argv(ckpts / "big.pt", vae_dir, tmp_path)) == 2     # without --lpips: not
    plain = _argv(ckpts / "big.pt", vae_dir, tmp_path / "plain")
    assert run_cli(cache_cli.main, plain) == 0
    ds2 = xr.load_dataset(tmp_path / "plain" / "s.nc", engine="h5netcdf")
    assert "lpips" not in ds2 and "lpips_sha256" not in ds2.attrs
    np.testing.assert_array_equal(ds2.psnr.values, ds.psnr.values)


def test_config_json_leaves_out_an_absent_lpips():
    plain = SweepConfig(methods=("fora",))
    assert '"lpips"' not in config_json(plain) and '"lpips"' not in plain.grid_json()
    with pytest.raises(ValueError, match="lpips given without vae"):
        SweepConfig(methods=("fora",), lpips=object())


def _lin_only(tmp_path, sd):
    p = tmp_path / "alex.pth"
    torch.save({k: v for k, v in sd.items() if k.startswith("lin")}, p)
    return p


def _nan(tmp_path, sd):
    p = tmp_path / "nan.pth"
    bad = dict(sd)
    bad["net.slice3.6.weight"] = bad["net.slice3.6.weight"].clone()
    bad["net.slice3.6.weight"][0, 0, 0, 0] = float("nan")
    torch.save(bad, p)
    return p


def _vgg(tmp_path, sd):
    p = tmp_path / "vgg.pth"
    torch.save({**sd, "net.slice1.2.weight": torch.zeros(64, 64, 3, 3)}, p)
    return p


def _misshaped(tmp_path, sd):
    p = tmp_path / "bad.pth"
    torch.save({**sd, "lin2.model.1.weight": torch.zeros(1, 100, 1, 1)}, p)
    return p


@pytest.mark.parametrize("case, ckpt, vae, text", [
    ("lin_only", "big.pt", True, "holds only the linear heads"),
    ("nan", "big.pt", True, "weight net.slice3.6.weight has non-finite values"),
    ("missing", "big.pt", True, "does not exist"),
    ("good", "big.pt", False, "given without --vae"),
    ("good", "small.pt", True, "at least 31x31 pixels"),
    ("vgg", "big.pt", True, "VGG trunk"),
    ("misshaped", "big.pt", True, "mis-shaped: lin2.model.1.weight"),
])
def test_bad_lpips_inputs_give_one_line_and_exit_2(weights, vae_dir, ckpts, tmp_path, capsys, case, ckpt, vae, text):
    path, sd = weights
    file = {"lin_only": _lin_only, "nan": _nan, "vgg": _vgg, "misshaped": _misshaped,
            "missing": lambda t, s: t / "missing.pth", "good": lambda t, s: path}[case](tmp_path, sd)
    argv = _argv(ckpts / ckpt, vae_dir, tmp_path / "out", "--lpips", str(file))
    if not vae:
        argv = [a for a in argv if a not in ("--vae", str(vae_dir))]
    assert run_cli(cache_cli.main, argv) == 2
    captured = capsys.readouterr()
    assert text in captured.err and len(captured.err.strip().splitlines()) == 1, captured.err
    if case == "lin_only":
        assert "AlexNet backbone weights are needed too" in captured.err and "lpips.LPIPS(net='alex')" in captured.err
    assert not (tmp_path / "out" / "s.nc").exists()
