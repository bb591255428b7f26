"""Decoding latents with a local diffusers AutoencoderKL, and the pixel-space fidelity it gives.

The oracles: diffusers' own ``AutoencoderKL.from_pretrained(...).decode`` on the scaled latents
(mapped to [0, 1]), and scikit-image's PSNR / SSIM on the decoded arrays."""
from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

diffusers = pytest.importorskip("diffusers")
skimage_metrics = pytest.importorskip("skimage.metrics")

from smoothness import figures  # noqa: E402
from smoothness.analysis import cli as correlate_cli  # noqa: E402
from smoothness.cache import cli as cache_cli  # noqa: E402
from smoothness.cache.sweep import SCORES, WALL, SweepConfig, run_chain, sweep  # noqa: E402
from smoothness.chain import config_json  # noqa: E402
from smoothness.cli import run_cli  # noqa: E402
from smoothness.data import sample as sample_cli  # noqa: E402
from smoothness.diffusion import Diffusion, SamplerConfig  # noqa: E402
from smoothness.models import Vae, sha256  # noqa: E402
from smoothness.plots.samples import grid_figure, strip_figure, write_gif  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")
SCALE = 0.37                      # not the SD default: a decode that ignored the config would show


def _tiny_vae(seed: int = 0, latent_channels: int = 4) -> "diffusers.AutoencoderKL":
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return diffusers.AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
            latent_channels=latent_channels, norm_num_groups=4, sample_size=16, scaling_factor=SCALE).eval()


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    """A stand-in for sd-vae-ft-ema: a random AutoencoderKL saved as a diffusers folder (safetensors)."""
    folder = tmp_path_factory.mktemp("vae") / "sd-vae-ft-ema"
    _tiny_vae().save_pretrained(str(folder), safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def oracle(vae_dir):
    """diffusers' own loading and decoding: x = decode(z / scale).sample, mapped to [0, 1]."""
    inner = diffusers.AutoencoderKL.from_pretrained(str(vae_dir), local_files_only=True).eval()

    def decode(z: torch.Tensor, scale: float = SCALE) -> torch.Tensor:
        with torch.no_grad():
            return ((inner.decode(z / scale).sample + 1) / 2).clamp(0, 1)
    return decode


@pytest.fixture(scope="module")
def latent_ckpt(tmp_path_factory, make_model) -> Path:
    """A stand-in for DiT-XL-2-skip.pt: the same key layout, 4 latent channels, 8 blocks (k=4 of dit-c2i)."""
    model = make_model("DiT-Mini/2-skip", seed=3, depth=8, input_size=8, in_channels=4, num_classes=10)
    path = tmp_path_factory.mktemp("ckpt") / "DiT-XL-2-skip.pt"
    torch.save({"ema": model.state_dict()}, path)
    return path


def test_decode_equals_the_vaes_own_decode_on_scaled_latents(vae_dir, oracle):
    vae = Vae.load(vae_dir)
    assert vae.scaling_factor == SCALE and vae.latent_channels == 4
    z = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    out = vae.decode(z, chunk=2)
    assert out.shape == (5, 3, 16, 16) and out.dtype == torch.float32
    torch.testing.assert_close(out, oracle(z), atol=1e-5, rtol=0)
    assert 0 <= out.min() and out.max() <= 1
    over = Vae.load(vae_dir, scaling_factor=0.18215)                    # --vae-scale wins over the config
    torch.testing.assert_close(over.decode(z), oracle(z, 0.18215), atol=1e-5, rtol=0)
    assert not torch.allclose(over.decode(z), out, atol=1e-3)
    assert vae.sha256 == sha256(vae_dir / "diffusion_pytorch_model.safetensors")


@pytest.mark.parametrize("chunk", [1, 3])
def test_a_video_decodes_frame_by_frame(vae_dir, oracle, chunk):
    vae = Vae.load(vae_dir, chunk=chunk)
    z = torch.randn(2, 4, 5, 8, 8, generator=torch.Generator().manual_seed(1))    # (N, C, F, H, W)
    out = vae.decode(z)
    assert out.shape == (2, 3, 5, 16, 16)
    for i in range(2):
        for f in range(5):
            torch.testing.assert_close(out[i, :, f], oracle(z[i:i + 1, :, f])[0], atol=1e-5, rtol=0)


def test_pickled_vae_reloads_from_its_folder_and_checks_the_weights(vae_dir, tmp_path):
    vae = Vae.load(vae_dir, scaling_factor=0.5, chunk=3)
    again = pickle.loads(pickle.dumps(vae))
    assert again.attrs() == vae.attrs() and len(pickle.dumps(vae)) < 1000      # by reference, not by weights
    moved = tmp_path / "vae"
    shutil.copytree(vae_dir, moved)
    changed = Vae.load(moved)
    with torch.no_grad():
        changed.model.decoder.conv_out.bias.add_(1)
    changed.model.save_pretrained(str(moved), safe_serialization=True)
    stale = Vae.load(moved)
    stale.sha256 = vae.sha256
    with pytest.raises(ValueError, match="changed on disk"):
        pickle.loads(pickle.dumps(stale))


def test_config_json_leaves_out_an_absent_vae():
    """Runs without a VAE keep their config JSON, so their fingerprints and resumable partial files."""
    plain = SweepConfig(methods=("fora",))
    assert '"vae"' not in config_json(plain) and '"vae"' not in plain.grid_json()


def _small(vae=None, **kw) -> SweepConfig:
    return SweepConfig(SamplerConfig(num_steps=6, cfg_scale=2.0), methods=("skip-cache",), intervals=(2,), ks=(1,),
                       classes=(0, 1), per_class=1, vae=vae, **kw)


def test_sweep_scores_decoded_pixels_as_skimage_does(vae_dir, latent_ckpt, oracle):
    from smoothness.models import load_model
    model = load_model(latent_ckpt).eval()
    vae = Vae.load(vae_dir)
    ds = sweep({"m": model}, _small(vae), log=lambda *a: None)
    plain = sweep({"m": model}, _small(), log=lambda *a: None)
    cfg = _small()
    diffusion = Diffusion.for_config(cfg.sampler)
    shape, y = (2, *model.sample_shape()), torch.tensor([0, 1])
    ref = run_chain(model, diffusion, shape, y, cfg.sampler, 0, None)[0]
    run = run_chain(model, diffusion, shape, y, cfg.sampler, 0, cfg.settings("skip-cache")[0])[0]
    a, b = oracle(run).double().numpy(), oracle(ref).double().numpy()          # (N, 3, 16, 16) in [0, 1]
    want_psnr = np.mean([skimage_metrics.peak_signal_noise_ratio(b[i], a[i], data_range=1) for i in range(2)])
    want_ssim = np.mean([skimage_metrics.structural_similarity(b[i], a[i], data_range=1, channel_axis=0,
                                                               gaussian_weights=True, sigma=1.5,
                                                               use_sample_covariance=False) for i in range(2)])
    cell = ds.sel({"model": "m", "method": "skip-cache", "setting": 0, "seed": 0})
    assert np.isfinite(want_psnr)
    np.testing.assert_allclose(float(cell.psnr), want_psnr, rtol=1e-5)
    np.testing.assert_allclose(float(cell.ssim), want_ssim, rtol=1e-5)
    np.testing.assert_allclose(float(cell.mse), np.mean((a - b) ** 2), rtol=1e-5)
    for v in ("psnr", "ssim", "mse"):                   # the latent numbers: exactly the sweep without a VAE
        assert float(cell[f"latent_{v}"]) == float(plain[v].sel({"model": "m", "method": "skip-cache", "setting": 0, "seed": 0}))
    for v in set(SCORES) - set(WALL) - {"psnr", "ssim", "mse"}:
        np.testing.assert_array_equal(ds[v].values, plain[v].values)
    assert ds.attrs["vae_sha256"] == vae.sha256 and ds.attrs["vae_scaling_factor"] == SCALE
    assert ds.attrs["data_range"] == 1.0 and "decoded" in ds.psnr.attrs["long_name"]
    assert not any(v.startswith("latent_") for v in plain) and "vae_sha256" not in plain.attrs
    assert plain.attrs["data_range"] == 2.0


def test_video_sweep_temporal_change_on_decoded_frames(vae_dir, make_model, oracle):
    model = make_model("Latte-Mini/2-skip", input_size=8, in_channels=4, num_frames=3, num_classes=0, depth=4)
    cfg = SweepConfig(SamplerConfig(num_steps=4, cfg_scale=1.0), methods=("skip-cache",), intervals=(2,), ks=(1,),
                      classes=(0,), per_class=2, vae=Vae.load(vae_dir, chunk=2))
    ds = sweep({"v": model}, cfg, log=lambda *a: None)
    diffusion = Diffusion.for_config(cfg.sampler)
    shape = (2, *model.sample_shape())
    ref = run_chain(model, diffusion, shape, None, cfg.sampler, 0, None)[0]
    run = run_chain(model, diffusion, shape, None, cfg.sampler, 0, cfg.settings("skip-cache")[0])[0]
    frames = lambda z: torch.stack([oracle(z[:, :, f]) for f in range(z.shape[2])], 2).double().numpy()
    a, b = frames(run), frames(ref)                                           # (N, 3, F, 16, 16)
    change = lambda v: np.sqrt(((v[:, :, 1:] - v[:, :, :-1]) ** 2).mean(axis=(1, 3, 4))).mean(1)   # (N,)
    cell = ds.sel({"model": "v", "method": "skip-cache", "setting": 0, "seed": 0})
    np.testing.assert_allclose(float(cell.temporal_change_ratio), np.mean(change(a) / change(b)), rtol=1e-5)
    want = np.mean([np.mean([skimage_metrics.peak_signal_noise_ratio(b[i, :, f], a[i, :, f], data_range=1)
                             for f in range(3)]) for i in range(2)])           # per frame, then per video
    np.testing.assert_allclose(float(cell.psnr), want, rtol=1e-5)
    assert np.isfinite(float(cell.latent_temporal_change_ratio))


def test_done_when_the_cache_command_sweeps_a_skip_dit_checkpoint_with_its_vae(vae_dir, latent_ckpt, tmp_path, capsys):
    """``python -m smoothness.cache --ckpt DiT-XL-2-skip.pt --vae path/to/sd-vae-ft-ema --preset dit-c2i``
    on the small stand-ins, with a short chain for speed."""
    argv = ["--ckpt", str(latent_ckpt), "--vae", str(vae_dir), "--preset", "dit-c2i",
            "--num-sampling-steps", "6", "--methods", "skip-cache,fora", "--intervals", "2", "--classes", "0,1",
            "--per-class", "1", "--out", str(tmp_path), "--name", "s"]
    assert run_cli(cache_cli.main, argv) == 0
    ds = xr.load_dataset(tmp_path / "s.nc", engine="h5netcdf")
    assert ds.attrs["preset"] == "dit-c2i" and int(ds.setting_k.sel({"method": "skip-cache", "setting": 0})) == 4
    assert ds.attrs["vae_sha256"] == sha256(vae_dir / "diffusion_pytorch_model.safetensors")
    assert ds.attrs["vae_path"] == str(vae_dir) and ds.attrs["vae_scaling_factor"] == SCALE
    assert np.isfinite(ds.psnr.values).all() and np.isfinite(ds.latent_psnr.values).all()
    assert (ds.psnr.values != ds.latent_psnr.values).all()
    assert (tmp_path / "s.png").is_file()
    # resumable: the same command again is the same configuration (same fingerprint), a VAE-less one is not
    assert run_cli(cache_cli.main, argv) == 0
    no_vae = [a for a in argv if a not in ("--vae", str(vae_dir))]
    assert run_cli(cache_cli.main, no_vae) == 2
    assert "different configuration" in capsys.readouterr().err


def test_sample_draws_decoded_rgb_grids(vae_dir, latent_ckpt, tmp_path, oracle):
    argv = ["--ckpt", str(latent_ckpt), "--vae", str(vae_dir), "--classes", "3,4", "--per-class", "2",
            "--num-sampling-steps", "3", "--out", str(tmp_path)]
    assert run_cli(sample_cli.main, argv) == 0
    pngs = list(tmp_path.glob("samples_DiT-XL-2-skip_*.png"))
    assert len(pngs) == 1
    from PIL import Image
    with Image.open(pngs[0]) as img:
        rgb = np.asarray(img.convert("RGB")).astype(int)
    assert (np.abs(rgb[..., 0] - rgb[..., 1]) > 8).any()                  # colour, not the grey first channel
    pixels = oracle(torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(2)))
    fig = grid_figure(pixels, [3, 4], "t", rgb=True)
    np.testing.assert_allclose(fig.axes[1].images[0].get_array(), pixels[1].permute(1, 2, 0).numpy())
    videos = pixels.reshape(2, 2, 3, 16, 16).transpose(1, 2)                 # (N=2, 3, F=2, 16, 16)
    fig = strip_figure(videos, "t", rgb=True)
    np.testing.assert_allclose(fig.axes[1].images[0].get_array(), videos[0, :, 1].permute(1, 2, 0).numpy())
    write_gif(videos, tmp_path / "v.gif", columns=2, scale=1, rgb=True)
    with Image.open(tmp_path / "v.gif") as gif:
        gif.seek(1)
        frame = np.asarray(gif.convert("RGB")).astype(int)
    want = (videos[1, :, 1] * 255).round().permute(1, 2, 0).numpy()
    err = np.abs(frame[:16, 17:33] - want).mean()                              # GIF: a 256-colour palette
    other = (videos[1, :, 0] * 255).round().permute(1, 2, 0).numpy()
    assert err < 4 and err < np.abs(frame[:16, 17:33] - other).mean() / 3


def _nan_vae(tmp_path: Path, vae_dir: Path) -> Path:
    from safetensors.torch import load_file, save_file
    folder = tmp_path / "nan-vae"
    shutil.copytree(vae_dir, folder)
    sd = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    sd["decoder.conv_out.weight"][0, 0, 0, 0] = float("nan")
    save_file(sd, str(folder / "diffusion_pytorch_model.safetensors"))
    return folder


def _wide_vae(tmp_path: Path) -> Path:
    folder = tmp_path / "vae-16ch"
    _tiny_vae(latent_channels=16).save_pretrained(str(folder), safe_serialization=True)
    return folder


CLIS = {"cache": cache_cli.main, "sample": sample_cli.main, "correlate": correlate_cli.main, "figures": figures.main}
ROWS = [  # (cli, argv, text of the one line); {vae} {ckpt} {nan} {wide} {empty} {file} ...: placeholders
    ("cache", ["--ckpt", "{ckpt}", "--vae", "{empty}/missing"], "does not exist"),
    ("cache", ["--ckpt", "{ckpt}", "--vae", "{empty}"], "has no config.json"),
    ("cache", ["--ckpt", "{ckpt}", "--vae", "{file}"], "is a file"),
    ("cache", ["--ckpt", "{ckpt}", "--vae", "{noweights}"], "has no weights"),
    ("cache", ["--ckpt", "{ckpt}", "--vae", "{ckpt_dir}"], "holds a DiTTransformer2DModel; allowed: AutoencoderKL"),
    ("cache", ["--ckpt", "{ckpt}", "--vae", "{nan}"], "non-finite values"),
    ("cache", ["--ckpt", "{ckpt}", "--vae", "{wide}"], "makes 4-channel latents, but the VAE"),
    ("cache", ["--model", "digits-skip-dit", "--vae", "{vae}"], "digits-skip-dit is a pixel-space model"),
    ("cache", ["--ckpt", "{ckpt}", "--vae-scale", "0.2"], "--vae-scale 0.2 given without --vae"),
    ("cache", ["--ckpt", "{ckpt}", "--vae", "{vae}", "--vae-scale", "-1"], "--vae-scale=-1.0 is not allowed"),
    ("cache", ["--ckpt", "{ckpt}", "--vae", "{vae}", "--vae-chunk", "0"], "--vae-chunk=0 is not allowed"),
    ("sample", ["--ckpt", "{ckpt}", "--vae", "{empty}/missing"], "does not exist"),
    ("sample", ["--ckpt", "{ckpt}", "--vae", "{wide}"], "makes 4-channel latents"),
    ("sample", ["--model", "digits-dit", "--vae", "{vae}"], "digits-dit is a pixel-space model"),
    ("correlate", ["--ckpt", "{ckpt}", "--vae", "{nan}"], "non-finite values"),
    ("correlate", ["--model", "digits-dit", "--vae", "{vae}"], "digits-dit is a pixel-space model"),
    ("figures", ["--vae", "{vae}"], "every figure is drawn from the bundled pixel-space models"),
    ("figures", ["--vae", "{empty}"], "has no config.json"),
]


@pytest.mark.parametrize("cli, argv, text", ROWS, ids=[f"{r[0]}:{' '.join(r[1])}" for r in ROWS])
def test_bad_vae_inputs_give_one_line_and_exit_2(cli, argv, text, vae_dir, latent_ckpt, tmp_path, capsys):
    empty, file = tmp_path / "empty", tmp_path / "afile"
    empty.mkdir()
    file.write_text("{}")
    where = {"vae": str(vae_dir), "ckpt": str(latent_ckpt), "empty": str(empty), "file": str(file)}
    (tmp_path / "noweights").mkdir()
    shutil.copy(vae_dir / "config.json", tmp_path / "noweights")
    where["noweights"] = str(tmp_path / "noweights")
    if any("{ckpt_dir}" in a for a in argv):
        from _diffusers_models import dit
        dit().save_pretrained(str(tmp_path / "transformer"), safe_serialization=True)
        where["ckpt_dir"] = str(tmp_path / "transformer")
    if any("{nan}" in a for a in argv):
        where["nan"] = str(_nan_vae(tmp_path, vae_dir))
    if any("{wide}" in a for a in argv):
        where["wide"] = str(_wide_vae(tmp_path))
    argv = [a.format(**where) for a in argv] + ["--out", str(tmp_path / "out")]
    assert run_cli(CLIS[cli], argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("error: ") and err.count("\n") == 1, err
    assert text in err, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_old_attention_key_names_load(vae_dir, tmp_path, oracle):
    """Folders saved by old diffusers (attention query/key/value/proj_attn) load as diffusers does."""
    from safetensors.torch import load_file, save_file
    folder = tmp_path / "old"
    shutil.copytree(vae_dir, folder)
    sd = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for k, v in sd.items():
        for new, was in names.items():
            if ".attentions.0." in k and f".{new}." in k:
                k = k.replace(f".{new}.", f".{was}.")
        old[k] = v
    assert any(".query." in k for k in old)
    save_file(old, str(folder / "diffusion_pytorch_model.safetensors"))
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(Vae.load(folder).decode(z), oracle(z), atol=1e-5, rtol=0)
    assert json.loads((folder / "config.json").read_text())["_class_name"] == "AutoencoderKL"


def test_correlate_window_psnr_on_decoded_pixels(vae_dir, latent_ckpt, tmp_path):
    from smoothness.analysis.caching_error import CachingErrorConfig, caching_errors
    from smoothness.models import load_model
    model = load_model(latent_ckpt).eval()
    cfg = CachingErrorConfig(steps=(3, 5), sampler=SamplerConfig(num_steps=6, cfg_scale=2.0), seeds=(0,), k=1,
                             window=1)
    plain = caching_errors({"m": model}, cfg)
    with_vae = caching_errors({"m": model}, CachingErrorConfig(**{**cfg.__dict__, "vae": Vae.load(vae_dir)}))
    assert list(plain.error.values) == ["cosine_distance", "rel_l2", "psnr"]
    assert list(with_vae.error.values) == ["cosine_distance", "rel_l2", "psnr", "latent_psnr"]
    np.testing.assert_array_equal(with_vae.sel(error="latent_psnr").values, plain.sel(error="psnr").values)
    np.testing.assert_array_equal(with_vae.sel(error=["cosine_distance", "rel_l2"]).values,
                                  plain.sel(error=["cosine_distance", "rel_l2"]).values)
    pixel = with_vae.sel(error="psnr").values
    assert np.isfinite(pixel).all() and (pixel != plain.sel(error="psnr").values).all()
    argv = ["--ckpt", str(latent_ckpt), "--vae", str(vae_dir), "--steps", "3,5", "--num-steps", "6", "--seeds", "0,1",
            "--grid=-0.1:0.1:3", "--window", "1", "--k", "1", "--jobs", "1", "--resamples", "10",
            "--error", "latent_psnr", "--out", str(tmp_path), "--name", "c"]
    assert run_cli(correlate_cli.main, argv) == 0
    ds = xr.load_dataset(tmp_path / "c.nc", engine="h5netcdf")
    assert "latent_psnr" in ds.error.values and ds.attrs["vae_sha256"] == sha256(vae_dir /
                                                                                   "diffusion_pytorch_model.safetensors")
    assert ds.attrs["data_range"] == 1.0 and ds.attrs["latent_data_range"] == 2.0


def test_sample_decodes_a_latent_video_model_to_colour_strips_and_gif(vae_dir, make_model, tmp_path):
    model = make_model("Latte-Mini/2", input_size=8, in_channels=4, num_frames=3, num_classes=0)
    ckpt = tmp_path / "taichi.pt"
    torch.save(model.state_dict(), ckpt)
    argv = ["--ckpt", str(ckpt), "--vae", str(vae_dir), "--vae-chunk", "2", "--per-class", "1",
            "--cfg-scale", "1", "--num-sampling-steps", "2", "--out", str(tmp_path / "out")]
    assert run_cli(sample_cli.main, argv) == 0
    from PIL import Image
    (gif,) = (tmp_path / "out").glob("samples_taichi_*.gif")
    with Image.open(gif) as img:
        assert img.n_frames == 3
        rgb = np.asarray(img.convert("RGB")).astype(int)
    assert rgb.shape[0] == 2 * 17 * 4 and (np.abs(rgb[..., 0] - rgb[..., 2]) > 8).any()   # 10 videos, 5 a row
