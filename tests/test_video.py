"""Video models through the tools: moving-digits data, surfaces, Skip-Cache on pairs, the sweep and
sampling CLIs on an unconditional Latte checkpoint."""
import numpy as np
import pytest
import torch

from smoothness import data, hooks
from smoothness.data import digits
from smoothness.cache import CacheConfig, apply_cache
from smoothness.diffusion import Diffusion, SamplerConfig
from smoothness.surface import ModelEntry, SurfaceConfig, compute
from smoothness.surface.engine import GridEngine, Perturbation, naive_forward
from smoothness.surface.perturb import DirectionSpec

pytestmark = pytest.mark.usefixtures("single_thread")

SHAPE = (2, 2, 4, 8, 8)           # (N, C, F, H, W) for make_model's TINY (8x8, 2 channels)


@pytest.fixture(scope="module")
def latte(make_model):
    return make_model("Latte-Mini/2-skip", num_frames=4, num_classes=0)


# ------------------------------------------------------------------- data
def test_bounce_reflects_off_the_walls_by_hand():
    # room 4: 3 -> 4 -> (reflect) 3 -> 2 -> 1 -> 0 -> (reflect) 1 -> 2; a still axis stays put
    path = data.bounce(torch.tensor([[3, 2]]), torch.tensor([[1, 0]]), room=4)
    assert path[0, :, 0].tolist() == [3, 4, 3, 2, 1, 0, 1, 2]
    assert path[0, :, 1].tolist() == [2] * data.FRAMES
    back = data.bounce(torch.tensor([[1]]), torch.tensor([[-1]]), room=2)
    assert back[0, :, 0].tolist() == [1, 0, 1, 2, 1, 0, 1, 2]


def test_moving_digits_paste_the_glyph_along_its_path():
    glyph = torch.arange(144, dtype=torch.float32).reshape(1, 12, 12) / 144
    v = data.moving_digits(glyph, torch.tensor([[3, 1]]), torch.tensor([[1, -1]]))
    assert v.shape == (1, 1, data.FRAMES, 16, 16)
    rows, cols = [3, 4, 3, 2, 1, 0, 1, 2], [1, 0, 1, 2, 3, 4, 3, 2]
    for f in range(data.FRAMES):
        r, c = rows[f], cols[f]
        assert torch.equal(v[0, 0, f, r:r + 12, c:c + 12], glyph[0])
        outside = v[0, 0, f].clone()
        outside[r:r + 12, c:c + 12] = -1
        assert (outside == -1).all()


def test_render_is_bilinear_and_keeps_the_blank_border():
    x8 = digits._native("test")[:5]
    glyphs = data.render(x8)
    assert glyphs.shape == (5, data.DIGIT, data.DIGIT)
    ref = torch.nn.functional.interpolate(x8[:, None], scale_factor=data.DIGIT / 8, mode="bilinear",
                                          align_corners=False)[:, 0]
    assert torch.allclose(glyphs, ref.clamp(-1, 1))
    assert glyphs.min() >= -1 and glyphs.max() <= 1


def test_random_motion_stays_on_canvas_moves_and_is_seeded():
    s, v = data.random_motion(2000, torch.Generator().manual_seed(5))
    path = data.bounce(s, v)
    assert ((path >= 0) & (path <= data.ROOM)).all()
    assert (path[:, 1:] != path[:, :-1]).any(dim=2).all()             # every frame moves
    assert (v != 0).any(dim=1).all()
    assert len({tuple(x) for x in v.tolist()}) == 8                   # every nonzero velocity occurs
    assert len({tuple(x) for x in s.tolist()}) == (data.ROOM + 1) ** 2
    assert torch.equal(data.load_videos(3, seed=2), data.load_videos(3, seed=2))


def test_medoids_are_the_digits_nearest_their_class_means():
    xtr, ytr, _, _ = digits._split()
    glyphs, labels = digits._medoids("train")
    assert labels.tolist() == list(range(10))
    for c in range(10):
        members = xtr[ytr == c]
        dist = [float(((m - members.mean(0)) ** 2).sum()) for m in members]      # naive loop
        assert np.array_equal(glyphs[c], members[int(np.argmin(dist))])
    videos, y = data.video_batch(64, torch.Generator().manual_seed(1), with_labels=True)
    ink = data.render(torch.from_numpy(glyphs))
    d = data.DIGIT
    for v, label in zip(videos, y):                      # every frame shows its class medoid somewhere
        for frame in v[0]:
            assert any(torch.equal(frame[r:r + d, c:c + d], ink[label])
                       for r in range(data.ROOM + 1) for c in range(data.ROOM + 1))
    with pytest.raises(ValueError, match="unknown glyphs 'some'; allowed: medoids, all"):
        data.video_batch(1, torch.Generator(), glyphs="some")


@pytest.mark.parametrize("call, match", [
    (lambda: data.bounce(torch.tensor([[5, 0]]), torch.tensor([[1, 1]])), "start corners must lie in 0..4"),
    (lambda: data.moving_digits(torch.zeros(1, 16, 16), torch.tensor([[0, 0]]), torch.tensor([[1, 1]])),
     "16x16 pixels cannot move"),
])
def test_motion_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --------------------------------------------------------------- surfaces
def test_engine_equals_naive_loop_on_video(latte):
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500, 500])
    spec = DirectionSpec(seed=3)
    alphas, betas = torch.tensor([0.0, 0.1, -0.05]), torch.tensor([0.0, -0.1, 0.08])
    with torch.no_grad():
        out = GridEngine(latte, Perturbation("weights", spec)).forward(x, t, None, (alphas, betas))
        for i in range(3):
            ref = naive_forward(latte, spec, float(alphas[i]), float(betas[i]), x, t, None)
            torch.testing.assert_close(out[i], ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode,site", [("weights", None), ("features", "blocks.1")])
def test_video_surface_origin_is_exactly_one(latte, mode, site):
    cfg = SurfaceConfig(steps=(2,), sampler=SamplerConfig(num_steps=3), alpha="-0.2:0.2:3", beta="-0.2:0.2:3",
                        perturbation=Perturbation(mode, site=site), readouts=("output", "blocks.2", "blocks.3"),
                        batch_size=4)
    ds = compute([ModelEntry("latte", latte)], cfg, progress=False, log=lambda *a: None)
    s = ds["surface"]
    assert (s.sel(alpha=0.0, beta=0.0) == 1.0).all()
    assert float(s.sel(readout="output").min()) < 1.0


def test_video_feature_perturbation_by_hand(latte):
    """features mode on a temporal block: h + a*d1 + b*d2, each direction scaled per token to h."""
    from smoothness.surface.perturb import feature_direction
    x = torch.randn((1, *SHAPE[1:]), generator=torch.Generator().manual_seed(2))
    t = torch.tensor([300])
    a, b = 0.3, -0.2
    engine = GridEngine(latte, Perturbation("features", DirectionSpec(seed=4), site="blocks.1"))
    with torch.no_grad():
        got = engine.forward(x, t, None, (torch.tensor([a]), torch.tensor([b])))[0]

        def add(h, ctx):
            d1 = feature_direction(h, 4, 1, "blocks.1")              # one sample: (rows, F, H)
            d2 = feature_direction(h, 4, 2, "blocks.1")
            return h + a * d1 + b * d2
        with hooks.inject(latte, {"blocks.1": add}):
            want = latte(x, t)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_unconditional_video_refuses_guidance(latte):
    cfg = SurfaceConfig(steps=(1,), sampler=SamplerConfig(num_steps=2, cfg_scale=2.0), alpha="-0.1:0.1:3",
                        beta="-0.1:0.1:3")
    with pytest.raises(ValueError, match="unconditional"):
        compute([ModelEntry("latte", latte)], cfg, progress=False, log=lambda *a: None)


# ---------------------------------------------------------------- caching
SC = SamplerConfig(num_steps=8)
DIFF = Diffusion.for_config(SC)


def _sample(model, config=None):
    with torch.no_grad():
        if config is None:
            return DIFF.sample(model, SHAPE, None, SC, seed=0)
        with apply_cache(model, config) as state:
            return DIFF.sample(model, SHAPE, None, SC, seed=0), state


def test_skip_cache_interval_one_is_bit_identical_on_video(latte):
    ref = _sample(latte)
    out, _ = _sample(latte, CacheConfig(interval=1, k=1))
    assert torch.equal(out, ref)
    cached, state = _sample(latte, CacheConfig(interval=2, k=1, t_stop=0, t_start=1000))
    assert state.num_cached > 0 and not torch.equal(cached, ref)


def test_skip_cache_skips_middle_pairs(make_model):
    deep = make_model("Latte-Mini/2-skip", num_frames=4, num_classes=0, depth=8)     # 4 pairs, 2 fusions
    ran = []
    count = lambda h, ctx: ran.append(int(ctx.site.split(".")[1])) and None
    with torch.no_grad(), apply_cache(deep, CacheConfig(interval=2, k=1, t_stop=0, t_start=1000)) as state:
        with hooks.inject(deep, {f"blocks.{i}": count for i in range(8)}):
            DIFF.sample(deep, SHAPE, None, SC, seed=0)
    full, cached = state.num_full, state.num_cached
    assert cached > 0
    counts = np.bincount(ran, minlength=8)
    assert list(counts) == [full + cached] * 2 + [full] * 4 + [full + cached] * 2   # pairs 0 and 3 always


# -------------------------------------------------------------------- CLIs
@pytest.fixture(scope="module")
def video_ckpt(tmp_path_factory, make_model):
    path = tmp_path_factory.mktemp("ckpt") / "tiny-latte.pt"
    model = make_model("Latte-Mini/2-skip", num_frames=4, num_classes=0, input_size=8, in_channels=1)
    torch.save({"ema": model.state_dict(), "meta": {"num_heads": 2}}, path)
    return path


def test_cache_sweep_cli_on_video(tmp_path, video_ckpt, capsys):
    import xarray as xr

    from smoothness.cache.cli import main
    main(["--ckpt", str(video_ckpt), "--methods", "skip-cache", "--intervals", "2", "--k", "1",
          "--num-sampling-steps", "6", "--per-class", "1", "--out", str(tmp_path), "--name", "v"])
    ds = xr.load_dataset(tmp_path / "v.nc", engine="h5netcdf")
    assert ds.attrs["cfg_scale"] == 1.0
    ratio = float(ds["temporal_change_ratio"].squeeze())
    assert np.isfinite(ratio) and ratio > 0
    assert np.isfinite(float(ds["psnr"].squeeze()))


@pytest.mark.parametrize("flags,match", [(["--classes", "1"], "unconditional"),
                                         (["--cfg-scale", "2"], "unconditional")])
def test_cli_refuses_labels_and_guidance_for_unconditional(tmp_path, video_ckpt, flags, match):
    from smoothness.cache.cli import main as cache_main
    from smoothness.cli import run_cli
    assert run_cli(cache_main, ["--ckpt", str(video_ckpt), "--out", str(tmp_path)] + flags) == 2


def test_sample_cli_writes_strip_and_gif(tmp_path, video_ckpt):
    from PIL import Image

    from smoothness.data.sample import main
    main(["--ckpt", str(video_ckpt), "--num-sampling-steps", "3", "--per-class", "1", "--out", str(tmp_path)])
    gif = Image.open(tmp_path / "samples_tiny-latte_DDIM-3.gif")
    assert gif.n_frames == 4
    assert (tmp_path / "samples_tiny-latte_DDIM-3.png").stat().st_size > 0


# ------------------------------------------------------- do samples show digits?
def test_video_digit_scores_find_the_digits_of_real_videos():
    from smoothness import metrics
    videos, labels = data.load_videos(120, seed=3, with_labels=True)
    sc = metrics.video_digit_scores(videos)
    assert (sc["labels"] == labels[:, None]).double().mean() > 0.95      # the crop finds the digit
    assert sc["label_consistency"] > 0.95 and sc["confident_frames"] > 0.9 and sc["digits_covered"] == 1.0
    # the same frames dealt across videos: each video now shows several digits
    g = torch.Generator().manual_seed(0)
    mixed = videos.transpose(1, 2).reshape(-1, 1, 16, 16)[torch.randperm(120 * data.FRAMES, generator=g)]
    mixed = mixed.reshape(120, data.FRAMES, 1, 16, 16).transpose(1, 2)
    assert metrics.video_digit_scores(mixed)["label_consistency"] < 0.6
    noise = metrics.video_digit_scores(torch.rand(60, 1, data.FRAMES, 16, 16, generator=g) * 2 - 1)
    assert noise["confident_frames"] < 0.5 and noise["label_consistency"] < 0.6
    with pytest.raises(ValueError, match=r"videos must be \(N, 1, F, 16, 16\)"):
        metrics.video_digit_scores(torch.zeros(2, 1, 8, 8))


def test_sample_cli_refuses_to_score_a_model_of_other_data(tmp_path, video_ckpt):
    from smoothness.cli import run_cli
    from smoothness.data.sample import main
    assert run_cli(main, ["--ckpt", str(video_ckpt), "--score-samples", "2", "--out", str(tmp_path)]) == 2
    assert not list(tmp_path.iterdir())
