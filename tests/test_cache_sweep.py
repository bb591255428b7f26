"""The cache sweep over every registered method: one plane, calibration recorded, Pareto front, and
resumable cells (an interrupted or killed sweep resumes to the uninterrupted result, wall times aside)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from smoothness.cache.base import method_names
from smoothness.cache.report import pareto, table
from smoothness.cache.sweep import WALL, SweepConfig, sweep
from smoothness.cli import run_cli
from smoothness.diffusion import SamplerConfig

pytestmark = pytest.mark.usefixtures("single_thread")   # conftest: one thread for tiny models
ROOT = Path(__file__).resolve().parents[1]
SWEEP = tuple(m for m in method_names() if m != "none")
NOT_COMPARED = set(WALL) | {"realized_over_theoretical", "reference_seconds"}


def _same(a: xr.Dataset, b: xr.Dataset):
    for v in a.data_vars:
        if v in NOT_COMPARED:
            continue
        x, y = a[v].values, b[v].values
        if x.dtype.kind == "f":
            assert np.array_equal(x, y, equal_nan=True), v
        else:
            assert (x == y).all(), v
    for k in set(a.attrs) | set(b.attrs):
        if k not in ("seconds_total", "cpu_seconds_total"):          # times differ between runs
            assert np.array_equal(np.asarray(a.attrs.get(k)), np.asarray(b.attrs.get(k))), k


@pytest.fixture(scope="module")
def pair(make_model):
    return {"plain": make_model("DiT-Mini/2", num_classes=3, in_channels=1),
            "skip": make_model("DiT-Mini/2-skip", num_classes=3, in_channels=1, seed=1)}


CFG = SweepConfig(SamplerConfig(num_steps=6, cfg_scale=2.0), methods=SWEEP + ("skip-cache+taylor1",),
                  intervals=(2,), ks=(1,), windows=((0, 1000),), classes=(0, 1), per_class=1)


def test_every_method_on_one_plane(pair):
    ds = sweep(pair, CFG, log=lambda *a: None)
    assert ds.psnr.dims == ("model", "method", "setting", "seed")
    assert list(ds.method.values) == list(SWEEP) + ["skip-cache+taylor1"]
    done = np.isfinite(ds.psnr.values)
    assert done[1].all() or not np.isfinite(ds.psnr.sel({"model": "skip"}).values).all()
    assert not np.isfinite(ds.psnr.sel({"model": "plain", "method": "skip-cache"}).values).any()   # no skips
    assert {"calibration_plain_seed0", "calibration_skip_seed0"} <= set(ds.attrs)
    # dynamic methods: the MACs of the calls made, checked against the recorded full fraction
    mag = ds.sel({"model": "skip", "method": "fbcache", "setting": 0, "seed": 0})
    assert float(mag.full_steps) + float(mag.cached_steps) == 6
    front = pareto(ds, "skip")
    assert front and all(ds.config.sel({"method": a}).values.tolist().count(c) == 1 for a, c in front)
    rows = [(float(ds.theoretical_speedup.sel({"model": "skip", "method": a, "setting": k}).mean()),
             float(ds.psnr.sel({"model": "skip", "method": a, "setting": k}).mean()), str(c))
            for a in ds.method.values for k, c in zip(ds.setting.values, ds.config.sel({"method": a}).values)
            if not np.isnan(ds.psnr.sel({"model": "skip", "method": a, "setting": k}).mean())]
    naive = {c for x, y, c in rows if not any(x2 >= x and y2 >= y and (x2 > x or y2 > y) for x2, y2, _ in rows)}
    assert {c for _, c in front} == naive
    text = table(ds)
    assert "*" in text and "teacache" in text


SMALL = SweepConfig(SamplerConfig(num_steps=6, cfg_scale=2.0), methods=("skip-cache", "fora", "magcache"),
                    intervals=(2, 3), ks=(1,), windows=((0, 1000),), classes=(0, 1), per_class=1)


def test_an_interrupted_sweep_resumes_to_the_same_result(pair, tmp_path):
    whole = sweep(pair, SMALL, log=lambda *a: None)
    seen = []

    def stop_after_three(msg):
        seen.append(msg)
        if sum("speedup" in m for m in seen) == 3:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        sweep(pair, SMALL, log=stop_after_three, partial=tmp_path / "p.nc")
    part = xr.load_dataset(tmp_path / "p.nc", engine="h5netcdf")
    assert 0 < int(part.done.sum()) < part.done.size
    msgs = []
    resumed = sweep(pair, SMALL, log=msgs.append, partial=tmp_path / "p.nc", resume=True)
    assert msgs[0].startswith("resumed 4 of")    # skip-cache x2 on the plain DiT (skipped), fora x2; not the 3rd run
    _same(whole, resumed)


def test_resume_refuses_a_partial_file_of_another_grid(pair, tmp_path):
    small = SweepConfig(SamplerConfig(num_steps=4, cfg_scale=2.0), methods=("fora",), intervals=(2,), ks=(1,),
                        classes=(0,), per_class=1)
    sweep({"plain": pair["plain"]}, small, log=lambda *a: None, partial=tmp_path / "p.nc")
    other = SweepConfig(SamplerConfig(num_steps=4, cfg_scale=2.0), methods=("fora",), intervals=(3,), ks=(1,),
                        classes=(0,), per_class=1)
    with pytest.raises(ValueError, match="written by another sweep"):
        sweep({"plain": pair["plain"]}, other, log=lambda *a: None, partial=tmp_path / "p.nc", resume=True)


def test_kill_9_after_the_first_cell_then_resume(tmp_path, make_model):
    """A sweep subprocess is killed (SIGKILL) once its partial file holds a finished cell; --resume
    completes it, equal to an uninterrupted run except for wall times."""
    from smoothness.cache.cli import main
    ckpt = tmp_path / "mini-skip.pt"
    torch.save(make_model("DiT-Mini/2-skip", num_classes=3, in_channels=1, seed=1).state_dict(), ckpt)
    argv = ["--ckpt", str(ckpt), "--num-sampling-steps", "10", "--intervals", "2,3,4", "--k", "1",
            "--classes", "0,1", "--per-class", "1", "--methods", "skip-cache,fora,magcache",
            "--threads", "1", "--name", "s"]
    main(argv + ["--out", str(tmp_path / "whole")])
    partial = tmp_path / "killed" / "s.partial.nc"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "smoothness.cache", *argv, "--out", str(tmp_path / "killed")],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not partial.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the sweep finished before it could be killed"
    before = xr.load_dataset(partial, engine="h5netcdf")
    assert 0 < int(before.done.sum()) < before.done.size
    assert run_cli(main, argv + ["--out", str(tmp_path / "killed"), "--resume"]) == 0
    assert not partial.exists()
    _same(xr.load_dataset(tmp_path / "whole" / "s.nc", engine="h5netcdf"),
          xr.load_dataset(tmp_path / "killed" / "s.nc", engine="h5netcdf"))


def test_figure_c_marks_each_models_pareto_front(pair):
    from smoothness.plots.cache import figure, figure_plotly
    ds = sweep(pair, SMALL, log=lambda *a: None)
    fig = figure(ds)
    top = {ax.get_title().split("\n")[0]: ax for ax in fig.axes if ax.get_title()}
    assert set(top) == {"plain", "skip"}
    for model, ax in top.items():
        line = next(ln for ln in ax.get_lines() if ln.get_label() == "Pareto front")
        front = pareto(ds, model)
        want = sorted((float(ds.theoretical_speedup.sel({"model": model, "method": a}).where(
            ds.config.sel({"method": a}) == c).mean()), float(ds.psnr.sel({"model": model, "method": a}).where(
                ds.config.sel({"method": a}) == c).mean())) for a, c in front)
        want = [p for p in want if np.isfinite(p[1])]              # identical runs (PSNR inf) cannot be drawn
        np.testing.assert_allclose(np.c_[line.get_xdata(), line.get_ydata()], want)
    assert len(fig.axes) == 2 * 3                       # PSNR, SSIM, PSNR vs realized (no classifier here)
    assert any("Pareto" in t.name for t in figure_plotly(ds).data)
