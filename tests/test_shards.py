"""Work split across processes: --shard i/n and torchrun give exactly the one-process result."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from smoothness import merge as merge_cmd
from smoothness.cli import run_cli
from smoothness.diffusion import SamplerConfig
from smoothness.models import ModelEntry
from smoothness.ranks import parse_shard
from smoothness.surface import SurfaceConfig, compute, io
from smoothness.surface.dataset import chunk_plan, owned_chunks

ROOT = Path(__file__).resolve().parents[1]


def _cfg(**kw):
    base = dict(steps=(2, 3), sampler=SamplerConfig(num_steps=3), alpha="-0.2:0.2:4", beta="-0.2:0.2:3",
                batch_size=2, seeds=(0, 1))
    return SurfaceConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def entries():
    from smoothness.models import build
    out = []
    for i, size in enumerate(("DiT-Mini/2", "DiT-Mini/2-skip")):
        torch.manual_seed(i)
        m = build(size, input_size=8, in_channels=1, num_classes=3).eval()
        for p in m.parameters():                           # adaLN-Zero inits make every output alike
            torch.nn.init.normal_(p, std=0.05)
        out.append(ModelEntry(f"m{i}", m))
    return out


def test_shards_deal_every_chunk_once():
    for n_chunks in (1, 5, 12):
        for n in (1, 2, 3, 7):
            dealt = sorted(c for i in range(n) for c in owned_chunks(n_chunks, (i, n)))
            assert dealt == list(range(n_chunks))


@pytest.mark.parametrize("n", [2, 3])
def test_merged_shards_equal_one_run_bit_for_bit(entries, n):
    cfg = _cfg()
    whole = compute(entries, cfg, progress=False, log=None)
    parts = [compute(entries, cfg, progress=False, log=None, shard=(i, n)) for i in range(n)]
    for i, p in enumerate(parts):
        p.attrs["shard"] = f"{i}/{n}"
        assert np.isnan(p["surface"].values).any()                # each holds only its cells
    merged = io.merge(parts[::-1])
    np.testing.assert_array_equal(merged["surface"].values, whole["surface"].values)
    assert "shard" not in merged.attrs


def test_merge_refuses_mixed_overlapping_missing_shards(entries):
    cfg = _cfg()
    a, b = (compute(entries, cfg, progress=False, log=None, shard=(i, 2)) for i in range(2))
    a.attrs["shard"], b.attrs["shard"] = "0/2", "1/2"
    with pytest.raises(ValueError, match=r"missing \[1\]"):
        io.merge([a])
    with pytest.raises(ValueError, match=r"given twice \[0\]"):
        io.merge([a, a.copy()])
    other = compute(entries, _cfg(seeds=(0, 2)), progress=False, log=None, shard=(1, 2))
    other.attrs["shard"] = "1/2"
    with pytest.raises(ValueError, match="different run"):
        io.merge([a, other])
    whole = compute(entries, cfg, progress=False, log=None)
    whole.attrs["shard"] = "1/2"
    with pytest.raises(ValueError, match="more than one shard"):
        io.merge([a, whole])
    hole = b.copy(deep=True)
    hole["surface"].values[0, 0, 0, 0, 0, 0] = np.nan if not np.isnan(a["surface"].values[0, 0, 0, 0, 0, 0]) else 0
    if np.isnan(a["surface"].values[0, 0, 0, 0, 0, 0]):
        hole["surface"].values[0, 0, 0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="filled in no shard"):
        io.merge([a, hole])


@pytest.mark.parametrize("text, ok", [("0/2", (0, 2)), ("1/1", None), ("3/2", None), ("-1/2", None), ("a/b", None),
                                      ("2", None)])
def test_parse_shard(text, ok):
    if ok:
        assert parse_shard(text) == ok
    else:
        with pytest.raises(ValueError, match="--shard"):
            parse_shard(text)


def _ckpt(entries, tmp_path):
    path = tmp_path / "m.pt"
    torch.save({"ema": entries[1].model.state_dict()}, path)
    return str(path)


def _argv(ckpt, out):
    return ["--ckpt", ckpt, "--num-steps", "3", "--steps", "2,3", "--grid=-0.2:0.2:5", "--batch-size", "2",
            "--seeds", "0,1", "--out", str(out)]


def test_cli_shards_and_merge_command_equal_one_run(entries, tmp_path, capsys):
    ckpt = _ckpt(entries, tmp_path)
    assert run_cli(__import__("smoothness.surface.cli", fromlist=["main"]).main, _argv(ckpt, tmp_path / "one")) == 0
    from smoothness.surface import cli
    for i in range(3):
        assert run_cli(cli.main, _argv(ckpt, tmp_path / "sh") + ["--shard", f"{i}/3"]) == 0
    files = sorted((tmp_path / "sh").glob("*.shard-*-of-3.nc"))
    assert len(files) == 3 and "python -m smoothness.merge" in capsys.readouterr().out
    assert run_cli(merge_cmd.main, [str(f) for f in files] + ["--out", str(tmp_path / "m.nc")]) == 0
    one = io.load(next((tmp_path / "one").glob("surface_m_step2-3.nc")))
    np.testing.assert_array_equal(io.load(tmp_path / "m.nc")["surface"].values, one["surface"].values)
    assert run_cli(merge_cmd.main, [str(f) for f in files[:2]] + ["--out", str(tmp_path / "m2.nc")]) == 2
    assert "missing [2]" in capsys.readouterr().err
    assert run_cli(cli.main, _argv(ckpt, tmp_path / "sh") + ["--shard", "3/2"]) == 2
    assert "--shard '3/2' is not allowed" in capsys.readouterr().err


def _cli_subprocess(args, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def test_a_killed_shard_resumes_to_the_same_result(entries, tmp_path):
    """kill -9 a shard after its first saved chunk, resume it, merge: bit-identical to one run."""
    ckpt = _ckpt(entries, tmp_path)
    argv = _argv(ckpt, tmp_path / "k") + ["--evaluation", "trajectory", "--num-steps", "12", "--steps", "6,12",
                                          "--batch-size", "1"]
    proc = _cli_subprocess(["-m", "smoothness.surface", *argv, "--shard", "1/2"])
    partial = tmp_path / "k" / "surface_m_step6-12.shard-1-of-2.partial.nc"
    deadline = time.time() + 120
    while not partial.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the shard finished before it could be killed: " + proc.stdout.read()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = io.load(partial)["surface"].values
    assert np.isfinite(saved).any() and np.isnan(saved).any()        # killed mid-run
    for args in (["--shard", "1/2", "--resume"], ["--shard", "0/2"]):
        done = _cli_subprocess(["-m", "smoothness.surface", *argv, *args])
        assert done.wait(300) == 0, done.stdout.read()
    files = sorted((tmp_path / "k").glob("*.shard-*-of-2.nc"))
    merged = io.merge([io.load(f) for f in files])
    from smoothness.surface import cli
    assert run_cli(cli.main, argv + ["--out", str(tmp_path / "k1")]) == 0
    one = io.load(next((tmp_path / "k1").glob("*.nc")))
    np.testing.assert_array_equal(merged["surface"].values, one["surface"].values)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_ranks_equal_one_rank(entries, tmp_path):
    ckpt = _ckpt(entries, tmp_path)
    argv = _argv(ckpt, tmp_path / "tr")
    run = _cli_subprocess(["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                           "--master-port", str(_free_port()), "-m", "smoothness.surface", *argv])
    out = run.communicate(timeout=300)[0]
    assert run.returncode == 0, out
    from smoothness.surface import cli
    assert run_cli(cli.main, _argv(ckpt, tmp_path / "one")) == 0
    name = "surface_m_step2-3.nc"
    np.testing.assert_array_equal(io.load(tmp_path / "tr" / name)["surface"].values,
                                  io.load(tmp_path / "one" / name)["surface"].values)
    assert not list((tmp_path / "tr").glob("*.shard-*"))               # rank 0 merged and tidied up
    assert (tmp_path / "tr" / "surface_m_step2-3.png").is_file()
