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


def test_deal_keeps_b_with_c_and_puts_the_longest_first():
    from smoothness.figures import PAPER, deal
    times = {"a": 25, "b": 212, "c": 2, "d": 9, "e": 124, "f": 20, "g": 14, "h": 24, "i": 892}
    two = deal(sorted(PAPER), times, 2)
    assert two == [["i"], ["a", "b", "c", "d", "e", "f", "g", "h"]]               # 892 s against 430 s
    three = deal(sorted(PAPER), times, 3)
    assert sorted(k for r in three for k in r) == sorted(PAPER)                     # every figure once
    # by hand: i -> 0; b+c (214) -> 1; then e, a, h, f, g, d each to the least loaded, always rank 2
    # (124, 149, 173, 193, 207, 216 s: each still below b+c's 214 when it is placed)
    assert three == [["i"], ["b", "c"], ["a", "d", "e", "f", "g", "h"]]
    assert deal(["d", "f"], {}, 3) == [["d"], ["f"], []]                            # no times: guessed equal


def test_a_shard_makes_only_its_figures(tmp_path, capsys):
    from smoothness.figures import main
    assert run_cli(main, ["--only", "d,f", "--shard", "2/3", "--out", str(tmp_path)]) == 0
    assert "figures none (more shards than figures)" in capsys.readouterr().out
    assert run_cli(main, ["--only", "d,f", "--shard", "0/3", "--out", str(tmp_path), "--threads", "1"]) == 0
    assert (tmp_path / "fig_d_feature_dynamics.png").is_file() and not (tmp_path / "fig_f_spectral_norms.png").exists()
    readme = (tmp_path / "README.md").read_text()
    assert "| d |" in readme and readme.count("not run") == len("abcefghi")


def test_torchrun_ranks_share_the_figures_and_one_readme(tmp_path):
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                          "127.0.0.1", "--master-port", str(port), "-m", "smoothness.figures", "--only", "d,f",
                          "--out", str(tmp_path)], cwd=root, env=env, capture_output=True, text=True, timeout=300,
                         check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "shard 0/2: figures d" in run.stdout and "shard 1/2: figures f" in run.stdout
    readme = (tmp_path / "README.md").read_text()
    assert (tmp_path / "fig_d_feature_dynamics.png").is_file() and (tmp_path / "fig_f_spectral_norms.png").is_file()
    assert readme.count("not run") == len("abceghi")
