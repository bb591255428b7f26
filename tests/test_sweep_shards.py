"""A cache sweep split across processes (--shard i/n, torchrun ranks) merges to the one-process
sweep, bit for bit but for wall times; bad splits and mixed shards are refused with one line."""
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from smoothness import merge as merge_cmd
from smoothness.cache import cli as cache_cli
from smoothness.cache import shards
from smoothness.cache.sweep import SweepConfig, cells, sweep
from smoothness.cli import run_cli
from smoothness.diffusion import SamplerConfig
from smoothness.io_utils import read_netcdf
from smoothness.ranks import block

pytestmark = pytest.mark.usefixtures("single_thread")
ROOT = Path(__file__).resolve().parents[1]
WALL = {"realized_speedup", "call_speedup", "seconds", "realized_over_theoretical", "reference_seconds"}
CFG = SweepConfig(SamplerConfig(num_steps=5, cfg_scale=2.0), methods=("skip-cache", "fora", "magcache"),
                  intervals=(2, 3), ks=(1,), windows=((0, 1000),), classes=(0, 1), per_class=1, seeds=(0, 1))


def _same(a: xr.Dataset, b: xr.Dataset):
    """Every variable and attribute equal (NaN = NaN) but wall times and the shard bookkeeping."""
    for v in a.data_vars:
        if v not in WALL:
            x, y = a[v].values, b[v].values
            assert (np.array_equal(x, y, equal_nan=True) if x.dtype.kind == "f" else (x == y).all()), v
    for k in (set(a.attrs) | set(b.attrs)) - {"seconds_total", "cpu_seconds_total", "shards"}:
        assert np.array_equal(np.asarray(a.attrs.get(k)), np.asarray(b.attrs.get(k))), k


@pytest.fixture(scope="module")
def pair(make_model):
    return {"plain": make_model("DiT-Mini/2", num_classes=3, in_channels=1),
            "skip": make_model("DiT-Mini/2-skip", num_classes=3, in_channels=1, seed=1)}


def test_blocks_deal_every_cell_once_in_order():
    for count in (0, 1, 5, 14):
        for n in (1, 2, 3, 7):
            dealt = [c for i in range(n) for c in block(count, (i, n))]
            assert dealt == list(range(count))
            sizes = [len(block(count, (i, n))) for i in range(n)]
            assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("n", [2, 3])
def test_merged_sweep_shards_equal_one_sweep(pair, n):
    whole = sweep(pair, CFG, log=lambda *a: None)
    parts = [sweep(pair, CFG, log=lambda *a: None, shard=(i, n)) for i in range(n)]
    every = cells(pair, CFG)
    for i, p in enumerate(parts):
        assert p.attrs["shard"] == f"{i}/{n}"
        mine = {every[c] for c in block(len(every), (i, n))}
        assert {tuple(map(int, at)) for at in np.argwhere(p.done.values) if tuple(at) in set(every)} == mine
    merged = shards.merge(parts[::-1])
    _same(merged, whole)
    assert merged.done.values.all() and merged.attrs["shards"] == n and "shard" not in merged.attrs
    assert sorted(k for k in merged.attrs if k.startswith("calibration_")) == \
        sorted(k for k in whole.attrs if k.startswith("calibration_"))


def test_merge_refuses_mixed_missing_overlapping_sweeps(pair):
    a, b = (sweep(pair, CFG, log=lambda *a: None, shard=(i, 2)) for i in range(2))
    with pytest.raises(ValueError, match=r"missing \[1\]"):
        shards.merge([a])
    with pytest.raises(ValueError, match=r"given twice \[0\]"):
        shards.merge([a, a.copy()])
    other = sweep(pair, SweepConfig(**{**CFG.__dict__, "seeds": (0, 2)}), log=lambda *a: None, shard=(1, 2))
    with pytest.raises(ValueError, match="different sweep.*grid differs"):
        shards.merge([a, other])
    overlap = a.copy(deep=True)
    overlap.attrs["shard"] = "1/2"
    with pytest.raises(ValueError, match="more than one shard"):
        shards.merge([a, overlap])
    hole = b.copy(deep=True)
    at = tuple(np.argwhere(b.done.values & (b.config != "").values[None, :, :, None])[0])
    hole["done"].values[at] = False
    with pytest.raises(ValueError, match="1 cells are done in no shard"):
        shards.merge([a, hole])


def test_resume_refuses_another_shards_partial_file(pair, tmp_path):
    sweep(pair, CFG, log=lambda *a: None, partial=tmp_path / "p.nc", shard=(0, 2))
    with pytest.raises(ValueError, match="is shard 0/2, not 1/2"):
        sweep(pair, CFG, log=lambda *a: None, partial=tmp_path / "p.nc", resume=True, shard=(1, 2))


def test_more_shards_than_cells_leaves_idle_shards_that_say_so(pair):
    one = {"skip": pair["skip"]}
    cfg = SweepConfig(SamplerConfig(num_steps=4, cfg_scale=2.0), methods=("fora",), intervals=(2,), ks=(1,),
                      classes=(0,), per_class=1)
    msgs = [[], []]
    parts = [sweep(one, cfg, log=msgs[i].append, shard=(i, 2)) for i in range(2)]
    idle = [i for i in range(2) if "nothing to do, more shards than cells" in msgs[i][0]]
    assert len(idle) == 1 and not any("uncached" in m for m in msgs[idle[0]])        # no reference chain run
    assert not parts[idle[0]].done.values.any() and np.isnan(parts[idle[0]].psnr.values).all()
    _same(shards.merge(parts), sweep(one, cfg, log=lambda *a: None))


def _argv(out):
    return ["--model", "digits-skip-dit", "--methods", "skip-cache,fora", "--intervals", "2,3", "--k", "1",
            "--num-sampling-steps", "4", "--classes", "0,1", "--per-class", "1", "--seed", "0,1", "--out", str(out)]


NAME = "cache_sweep_digits-skip-dit_DDPM-4.nc"


def test_cli_shards_and_merge_command_equal_one_sweep(tmp_path, capsys):
    assert run_cli(cache_cli.main, _argv(tmp_path / "one")) == 0
    for i in range(3):
        assert run_cli(cache_cli.main, _argv(tmp_path / "sh") + ["--shard", f"{i}/3"]) == 0
    assert "python -m smoothness.merge" in capsys.readouterr().out
    files = sorted((tmp_path / "sh").glob("*.shard-*-of-3.nc"))
    assert len(files) == 3 and not list((tmp_path / "sh").glob("*.partial.nc"))
    assert run_cli(merge_cmd.main, [str(f) for f in files] + ["--out", str(tmp_path / "m.nc"), "--figures"]) == 0
    assert (tmp_path / "m.png").is_file() and (tmp_path / "m.html").is_file()
    _same(read_netcdf(tmp_path / "m.nc"), read_netcdf(tmp_path / "one" / NAME))
    assert run_cli(merge_cmd.main, [str(f) for f in files[:2]] + ["--out", str(tmp_path / "m2.nc")]) == 2
    assert "missing [2]" in capsys.readouterr().err
    assert run_cli(merge_cmd.main, [str(files[0]), str(tmp_path / "one" / NAME), "--out", str(tmp_path / "m3.nc")]) == 2
    assert "shard" in capsys.readouterr().err
    assert run_cli(cache_cli.main, _argv(tmp_path / "sh") + ["--shard", "3/2"]) == 2
    assert "--shard '3/2' is not allowed" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_ranks_sweep_equals_one_rank(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                          "127.0.0.1", "--master-port", str(_free_port()), "-m", "smoothness.cache",
                          *_argv(tmp_path / "tr")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run_cli(cache_cli.main, _argv(tmp_path / "one")) == 0
    _same(read_netcdf(tmp_path / "tr" / NAME), read_netcdf(tmp_path / "one" / NAME))
    assert not list((tmp_path / "tr").glob("*.shard-*"))               # rank 0 merged and tidied up
    assert (tmp_path / "tr" / NAME.replace(".nc", ".png")).is_file()


def _rank_pid(agent_pid: int, rank: int) -> int | None:
    """The pid of torchrun's worker with RANK=rank (a child of the agent), or None while it starts."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == agent_pid and f"RANK={rank}".encode() in env:
            return int(entry.name)
    return None


def test_a_killed_rank_resumes_under_torchrun_to_the_same_sweep(tmp_path):
    """SIGKILL rank 1 after its first saved cell: torchrun fails the job; rerun with --resume, each rank
    redoes only its unfinished cells, and the merged sweep equals one process's."""
    import signal
    import time
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    argv = _argv(tmp_path / "k") + ["--num-sampling-steps", "30"]

    def launch(*extra):
        return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                                 "127.0.0.1", "--master-port", str(_free_port()), "-m", "smoothness.cache", *argv, *extra],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    job = launch()
    name = NAME.replace("DDPM-4", "DDPM-30")
    partial = tmp_path / "k" / name.replace(".nc", ".shard-1-of-2.partial.nc")
    deadline = time.time() + 240
    while not partial.exists() and job.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    pid = _rank_pid(job.pid, 1)
    assert job.poll() is None and pid is not None, "the job ended before a rank could be killed: " + job.stdout.read()
    os.kill(pid, signal.SIGKILL)
    assert job.wait(120) != 0                                          # one rank dead: the job fails
    saved = xr.load_dataset(partial, engine="h5netcdf")
    real = (saved.config != "").values[None, :, :, None]
    assert 0 < int((saved.done.values & real).sum()) and not (tmp_path / "k" / name).exists()
    again = launch("--resume")
    out = again.communicate(timeout=300)[0]
    assert again.returncode == 0, out
    assert re.search(r"resumed [1-9]\d* of \d+ cells from .*shard-1-of-2.partial.nc", out), out
    assert run_cli(cache_cli.main, _argv(tmp_path / "one") + ["--num-sampling-steps", "30"]) == 0
    _same(read_netcdf(tmp_path / "k" / name), read_netcdf(tmp_path / "one" / name))
