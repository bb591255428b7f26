"""smoothness.correlate split by model across --shard processes or torchrun ranks: the written result
equals a one-process run's (numbers and settings), and finished models are reused on a rerun."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from smoothness.analysis import cli as correlate_cli
from smoothness.cli import run_cli

pytestmark = pytest.mark.usefixtures("single_thread")
ROOT = Path(__file__).resolve().parents[1]
NAME = "correlate_plain_skip"
TIMES = {"seconds", "jobs"}


@pytest.fixture(scope="module")
def ckpts(make_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpts")
    for name, model in (("plain", make_model("DiT-Mini/2")), ("skip", make_model("DiT-Mini/2-skip", seed=1))):
        torch.save({"ema": model.state_dict()}, folder / f"{name}.pt")
    return folder


def _argv(ckpts, out):
    return ["--ckpt", str(ckpts / "plain.pt"), "--ckpt", str(ckpts / "skip.pt"), "--num-steps", "6", "--steps", "3,6",
            "--seeds", "0,1", "--grid=-0.2:0.2:3", "--k", "1", "--resamples", "50", "--jobs", "1", "--out", str(out)]


def _same(folder_a: Path, folder_b: Path):
    for suffix in ("", "_surface"):
        a = xr.load_dataset(folder_a / f"{NAME}{suffix}.nc", engine="h5netcdf")
        b = xr.load_dataset(folder_b / f"{NAME}{suffix}.nc", engine="h5netcdf")
        for v in a.data_vars:
            x, y = a[v].values, b[v].values
            assert (np.array_equal(x, y, equal_nan=True) if x.dtype.kind == "f" else (x == y).all()), v
        for k in (set(a.attrs) | set(b.attrs)) - TIMES:
            if k != "versions":
                assert np.array_equal(np.asarray(a.attrs.get(k)), np.asarray(b.attrs.get(k))), k


def test_the_last_shard_writes_the_one_process_result(ckpts, tmp_path, capsys):
    assert run_cli(correlate_cli.main, _argv(ckpts, tmp_path / "one")) == 0
    assert not list((tmp_path / "one").glob("*.model-*.nc"))                    # the parts are tidied up
    outs = []
    for i in range(3):                                                           # 3 shards, 2 models: one idle
        assert run_cli(correlate_cli.main, _argv(ckpts, tmp_path / "sh") + ["--shard", f"{i}/3"]) == 0
        outs.append(capsys.readouterr().out)
    assert "skip not yet: when every shard is done" in outs[0]
    assert "spearman rho" in outs[1]                                             # the last to finish writes it
    assert "nothing to do, more shards than models" in outs[2] and "is already written" in outs[2]
    assert not list((tmp_path / "sh").glob("*.model-*.nc"))
    _same(tmp_path / "sh", tmp_path / "one")


def test_a_rerun_reuses_finished_models(ckpts, tmp_path, capsys):
    assert run_cli(correlate_cli.main, _argv(ckpts, tmp_path / "r") + ["--shard", "1/2"]) == 0
    assert run_cli(correlate_cli.main, _argv(ckpts, tmp_path / "r")) == 0
    assert "reusing 1 finished model(s)" in capsys.readouterr().out
    assert run_cli(correlate_cli.main, _argv(ckpts, tmp_path / "one")) == 0
    _same(tmp_path / "r", tmp_path / "one")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_ranks_equal_one_process(ckpts, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                          "127.0.0.1", "--master-port", str(_free_port()), "-m", "smoothness.correlate",
                          *_argv(ckpts, tmp_path / "tr")], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run_cli(correlate_cli.main, _argv(ckpts, tmp_path / "one")) == 0
    _same(tmp_path / "tr", tmp_path / "one")
    assert not list((tmp_path / "tr").glob("*.model-*.nc"))
