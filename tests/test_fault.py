"""A surface run killed with SIGKILL after its first saved chunk resumes to exactly the result of an
uninterrupted run (bit for bit): the partial file is only ever replaced whole, and a resume redoes
no finished chunk and skips none."""
from __future__ import annotations

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

ROOT = Path(__file__).resolve().parents[1]

# The child saves its first partial file, then pauses (only so the test can kill it there, whatever
# the machine's speed); the kill lands while later chunks are still to come.
CHILD = """
import sys, time
from smoothness.surface import io
real = io.save
def save_then_pause(ds, path):
    out = real(ds, path)
    if str(path).endswith('.partial.nc'):
        print('saved', flush=True)
        time.sleep(120)
    return out
io.save = save_then_pause
from smoothness.cli import run_cli
from smoothness.surface.cli import main
sys.exit(run_cli(main, sys.argv[1:]))
"""


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "MPLBACKEND": "Agg"}


def _checkpoints(tmp_path: Path, make_model) -> list[str]:
    paths = []
    for name, seed in (("DiT-Mini/2", 0), ("DiT-Mini/2-skip", 1)):
        path = tmp_path / f"{name.replace('/', '_')}.pt"
        torch.save({"ema": make_model(name, seed=seed).state_dict()}, path)
        paths += ["--ckpt", str(path)]
    return paths


def _argv(ckpts, out: Path) -> list[str]:
    return [*ckpts, "--num-steps", "6", "--steps", "2,6", "--grid=-0.2:0.2:5", "--seeds", "0,1",
            "--batch-size", "4", "--readout", "output,blocks.1", "--out", str(out), "--name", "s"]


def _run(argv, *extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "smoothness.surface", *argv, *extra], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300)


def _load(path: Path) -> xr.Dataset:
    with xr.open_dataset(path, engine="h5netcdf") as f:
        return f.load()


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
def test_surface_killed_after_its_first_chunk_resumes_bit_identically(tmp_path, make_model):
    ckpts = _checkpoints(tmp_path, make_model)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    done = _run(_argv(ckpts, whole))
    assert done.returncode == 0, done.stderr

    child = subprocess.Popen([sys.executable, "-c", CHILD, *_argv(ckpts, killed)], cwd=ROOT, env=_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in child.stdout:                    # the CLI's own lines come first
            if line.strip() == "saved":
                break
        else:
            raise AssertionError(child.stderr.read())
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL
    partial = _load(killed / "s.partial.nc")["surface"].values
    assert np.isnan(partial).any() and not np.isnan(partial).all()     # killed part-way, the chunks so far saved
    assert not (killed / "s.nc").exists()

    t0 = time.time()
    resumed = _run(_argv(ckpts, killed), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout and time.time() - t0 < 300
    a, b = _load(whole / "s.nc"), _load(killed / "s.nc")
    np.testing.assert_array_equal(b["surface"].values, a["surface"].values)
    assert not np.isnan(b["surface"].values).any()
    assert {k: v for k, v in b.attrs.items()} == {k: v for k, v in a.attrs.items()}
    assert not (killed / "s.partial.nc").exists()
