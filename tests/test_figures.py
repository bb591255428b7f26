"""The figures command: its README, its CLI errors, and the teaser plot against the sweep's data."""
import numpy as np
import pytest
import torch

from smoothness import figures
from smoothness.cli import run_cli

pytestmark = pytest.mark.usefixtures("single_thread")


def test_readme_lists_every_figure_and_keeps_times(tmp_path):
    text = figures.readme({"a": 12.4, "e": 80.0}, "default")
    rows = [line for line in text.splitlines() if line.startswith("| ") and line[2] in figures.PAPER]
    assert [r[2] for r in rows] == sorted(figures.PAPER)
    for key, stem in figures.STEMS.items():
        assert f"[{stem}.png]({stem}.png)" in text and f"--only {key}`" in text
    (tmp_path / "README.md").write_text(text)
    assert figures._times(tmp_path / "README.md") == {"a": 12.0, "e": 80.0}


@pytest.mark.parametrize("argv,match", [(["--only", "a,z"], "'z'"), (["--resolution", "huge"], None),
                                        (["--threads", "-1"], "--threads=-1")])
def test_cli_errors_exit_2(tmp_path, capsys, argv, match):
    assert run_cli(figures.main, argv + ["--out", str(tmp_path)]) == 2
    if match:
        assert match in capsys.readouterr().err
    assert not list(tmp_path.iterdir())                # nothing written


def test_teaser_draws_the_sweep_cosines(make_model):

    from smoothness.cache.sweep import SweepConfig, sweep
    from smoothness.diffusion import SamplerConfig
    models = {"plain": make_model("DiT-Mini/2", num_classes=3, in_channels=1),
              "skip": make_model("DiT-Mini/2-skip", num_classes=3, in_channels=1)}
    cfg = SweepConfig(SamplerConfig(num_steps=5, cfg_scale=2.0), ("skip-cache", "deep-reuse", "fora"), (2, 3), (1,),
                      ((0, 1000),), (0,), (0, 1), 1)
    ds = sweep(models, cfg, log=lambda *a: None)
    fig = figures.teaser(ds, "skip", "plain", interval=2, k=1)
    lines = fig.axes[0].get_lines()
    assert [ln.get_label() for ln in lines] == ["skip-cache on skip", "fora on plain", "deep-reuse on plain"]
    at = int(np.flatnonzero(ds.config.sel({"method": "fora"}).values == "fora_N2_0<t<1000")[0])
    want = ds["step_cosine"].sel({"model": "plain", "method": "fora", "setting": at}).mean("seed")
    np.testing.assert_allclose(lines[1].get_ydata(), want.values)
    np.testing.assert_allclose(lines[1].get_xdata(), ds.timestep.values)
    assert (want.values < 1).any()


def test_video_samples_carry_their_digit_scores(tmp_path, make_model):
    from dataclasses import replace

    from smoothness import data, metrics
    model = make_model("Latte-Mini/4", num_frames=data.FRAMES, num_classes=0, input_size=16, in_channels=1)
    torch.save({"ema": model.state_dict(), "meta": {"num_heads": 2}}, tmp_path / "tiny.pt")
    res = replace(figures.RESOLUTIONS["default"], video_samples=2)
    ds, fig, gifs = figures.video_samples([str(tmp_path / "tiny.pt")], res, tmp_path, log=lambda *_: None)
    assert ds.video.shape == (1, 2, 1, data.FRAMES, 16, 16) and all(p.exists() for p in gifs)
    want = metrics.video_digit_scores(torch.from_numpy(ds.video.values[0]))
    assert float(ds.label_consistency[0]) == want["label_consistency"]
    assert (ds.digit.values[0] == want["labels"].numpy()).all()
    assert ds.confidence.attrs["real_test_videos"] > 0.9
