"""Every bad input ends in one line naming the value, exit status 2 (a ValueError for the API),
no traceback and nothing written: one table across every CLI and the main API entry points.

Each CLI validates its whole input before loading a model, so the rows marked ``pre`` also assert
that no checkpoint was read (and the table runs in seconds)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import xarray as xr

from smoothness import figures
from smoothness.analysis import cli as correlate_cli
from smoothness.analysis.caching_error import CachingErrorConfig
from smoothness.cache import CacheConfig
from smoothness.cache import cli as cache_cli
from smoothness.cli import run_cli
from smoothness.data import sample as sample_cli
from smoothness.data import train as train_cli
from smoothness.diffusion import Diffusion, SamplerConfig
from smoothness.models import CheckpointError, DiTConfig, LatteT2VConfig, build, bundled, load_model
from smoothness.surface import Axis, DirectionSpec, Perturbation, SurfaceConfig
from smoothness.surface import cli as surface_cli
from smoothness.surface.scores import smoothness_scores

CLIS = {"surface": surface_cli.main, "cache": cache_cli.main, "correlate": correlate_cli.main,
        "sample": sample_cli.main, "train": train_cli.main, "figures": figures.main}
NO_GPU = not torch.cuda.is_available()

# (cli, argv, text the one-line message must contain, checked before any model is loaded)
# Placeholders: {out} the output folder, {file} an existing file, {ckpt} a tiny DiT checkpoint.
CLI_ROWS = [
    # ---- surface
    ("surface", ["--grid=-1:1:100001"], "-1:1:100001 x -1:1:100001", True),
    ("surface", ["--device", "gpu0"], "'gpu0'", True),
    ("surface", ["--device", ""], "--device ''", True),
    ("surface", ["--num-heads", "-3", "--ckpt", "{ckpt}"], "--num-heads=-3", True),
    ("surface", ["--num-heads", "0", "--ckpt", "{ckpt}"], "--num-heads=0", True),
    ("surface", ["--num-heads", "5", "--ckpt", "{ckpt}"], "num_heads=5", False),
    ("surface", ["--num-heads", "4"], "--num-heads 4 is for --ckpt", True),
    ("surface", ["--resume", "--name", "partial_dir"], "partial_dir.partial.nc' is a folder", True),
    ("surface", ["--out", "{file}"], "is an existing file", True),
    ("surface", ["--out", ""], "argument --out: '' is empty", True),
    ("surface", ["--steps", ""], "--steps '' is empty", True),
    ("surface", ["--grid", ""], "alpha grid ''", True),
    ("surface", ["--alpha", "1:-1:5"], "'1:-1:5'", True),
    ("surface", ["--name", ""], "--name ''", True),
    ("surface", ["--name", "../x"], "--name '../x'", True),
    ("surface", ["--seeds", "0,0"], "--seeds '0,0' repeats", True),
    ("surface", ["--steps", "300"], "step 300 is outside the chain", True),
    ("surface", ["--num-step", "250"], "unrecognized arguments: --num-step", True),
    ("surface", ["--mode", "features", "--site", "blocks.1", "--norm", "layer"], "--norm is a --mode weights", True),
    ("surface", ["--mode", "latent", "--params", "all"], "--params is a --mode weights", True),
    ("surface", ["--mode", "features", "--site", "blocks.1", "--include-1d"], "--include-1d", True),
    ("surface", ["--site", "blocks.1"], "--site 'blocks.1' is only used by --mode features", True),
    ("surface", ["--spacing", "linspace"], "'linspace'", True),
    ("surface", ["--steps-offset", "1"], "--steps-offset 1 only applies with --spacing leading", True),
    ("surface", ["--num-steps", "50", "--spacing", "leading", "--steps-offset", "30", "--steps", "5"],
     "steps_offset=30", True),
    ("surface", ["--cfg-scale", "2", "--cfg-channels", "0"], "--cfg-channels '0'", True),
    ("surface", ["--cfg-scale", "2", "--cfg-channels", "three"], "--cfg-channels 'three'", True),
    ("surface", ["--cfg-channels", "3"], "--cfg-channels is for guided sampling", True),
    ("surface", ["--cfg-scale", "nan"], "cfg_scale=nan", True),
    ("surface", ["--readout", ""], "--readout ''", True),
    ("surface", ["--batch-size", "0"], "batch_size=0", True),
    ("surface", ["--class-label", "12"], "class label 12", False),
    # ---- cache sweep
    ("cache", ["--methods", ""], "--methods ''", True),
    ("cache", ["--methods", "magic"], "'magic'", True),
    ("cache", ["--classes", ""], "--classes ''", True),
    ("cache", ["--preset", ""], "unknown preset ''", True),
    ("cache", ["--preset", "dit-c2i", "--k", "2"], "--preset 'dit-c2i' sets --k", True),
    ("cache", ["--interval", "2"], "unrecognized arguments: --interval 2", True),
    ("cache", ["--seed", "0,0"], "--seed '0,0' repeats", True),
    ("cache", ["--threads", "-1"], "--threads=-1", True),
    ("cache", ["--per-class", "0"], "--per-class=0", True),
    ("cache", ["--out", "{file}"], "is an existing file", True),
    ("cache", ["--name", "../x"], "--name '../x'", True),
    ("cache", ["--windows", "5"], "'5' is not STOP-START", True),
    ("cache", ["--windows", "1000-20"], "t_stop=1000", True),
    ("cache", ["--k", "0"], "k=0", True),
    ("cache", ["--num-sampling-steps", "0"], "num_steps=0", True),
    ("cache", ["--model", "nope"], "unknown model 'nope'", True),
    ("cache", ["--spacing", "leading", "--steps-offset", "-1"], "steps_offset=-1", True),
    ("cache", ["--classes", "42"], "class label 42", False),
    # ---- correlate
    ("correlate", ["--window", "200"], "window=200", True),
    ("correlate", ["--seeds", "1,1"], "--seeds '1,1' repeats", True),
    ("correlate", ["--jobs", "0"], "--jobs=0", True),
    ("correlate", ["--steps", ""], "--steps '' is empty", True),
    ("correlate", ["--grid", ""], "alpha grid ''", True),
    ("correlate", ["--name", ""], "--name ''", True),
    ("correlate", ["--score", "bumpy"], "'bumpy'", True),
    ("correlate", ["--step", "10"], "unrecognized arguments: --step", True),
    # ---- sample
    ("sample", ["--num-sampling-steps", "nan"], "'nan'", True),
    ("sample", ["--score-samples", "-5"], "--score-samples=-5", True),
    ("sample", ["--batch-size", "0"], "--batch-size=0", True),
    ("sample", ["--classes", ""], "--classes ''", True),
    ("sample", ["--per-class", "0"], "--per-class=0", True),
    ("sample", ["--out", "{file}"], "is an existing file", True),
    ("sample", ["--negative-embeds", "learned"], "--negative-embeds needs --caption-embeds", True),
    ("sample", ["--cfg-scale", "0.5"], "cfg_scale=0.5", True),
    ("sample", ["--spacing", "middle"], "'middle'", True),
    ("sample", ["--num-sampling", "50"], "unrecognized arguments: --num-sampling", True),
    ("sample", ["--num-heads", "2"], "--num-heads 2 is for --ckpt", True),
    # ---- train
    ("train", ["--out", "{out}/m.pt", "--save-every", "0"], "--save-every=0", True),
    ("train", ["--out", "{out}/m.pt", "--threads", "-1"], "--threads=-1", True),
    ("train", ["--out", "{out}/m.pt", "--lr", "inf"], "--lr=inf", True),
    ("train", ["--out", "{out}/m.pt", "--lr", "nan"], "--lr=nan", True),
    ("train", ["--out", "{out}/m.pt", "--lr", "-1"], "--lr=-1.0", True),
    ("train", ["--out", "{out}/m.pt", "--steps", "0"], "--steps=0", True),
    ("train", ["--out", "."], "--out '.' is a folder", True),
    ("train", ["--out", "{out}"], "is a folder", True),
    ("train", ["--plot-losses", "{out}"], "--plot-losses", True),
    ("train", ["--out", "{file}/m.pt"], "is a file, not a folder", True),
    ("train", ["--out", "{out}/m.pt", "--model", "DiT-Mini/2", "--resume", "--batch-size", "8"],
     "batch_size=16 there, 8 now", True),
    ("train", ["--out", "{out}/old.pt", "--model", "DiT-Mini/2", "--resume"], "records no training settings", True),
    ("train", ["--out", "{out}/m.pt", "--step", "5"], "unrecognized arguments: --step", True),
    # ---- figures
    ("figures", ["--only", ""], "unknown figure ''", True),
    ("figures", ["--only", "z"], "unknown figure 'z'", True),
    ("figures", ["--threads", "-1"], "--threads=-1", True),
    ("figures", ["--out", "{file}"], "is an existing file", True),
    ("figures", ["--resolution", "huge"], "'huge'", True),
]
if NO_GPU:
    CLI_ROWS.append(("surface", ["--device", "cuda"], "--device 'cuda' is not available here", True))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "mini.pt"
    torch.save({"ema": build("DiT-Mini/2", input_size=8, in_channels=1, num_classes=10).state_dict()}, path)
    return path


class Loaded(AssertionError):
    """A model was loaded before a bad input was refused (raised at once: no job runs on)."""


def _watch_loads(monkeypatch, refuse: bool):
    real = bundled.load_model

    def load(path, *a, **k):
        if refuse:
            raise Loaded(f"{path} was loaded before the input was refused")
        return real(path, *a, **k)
    monkeypatch.setattr(bundled, "load_model", load)


def _setup(tmp_path: Path) -> dict:
    out, file = tmp_path / "out", tmp_path / "afile"
    file.write_text("not a folder")
    (out / "partial_dir.partial.nc").mkdir(parents=True)
    mini = {"model": "DiT-Mini/2", "batch_size": 16, "lr": 2e-3, "warmup": 100, "ema_max": 0.999, "grad_clip": 1.0,
            "seed": 0, "data": "digits"}
    torch.save({"config": json.dumps(mini), "step": 1}, out / "m.state.pt")
    torch.save({"step": 1}, out / "old.state.pt")
    return {"out": str(out), "file": str(file)}


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("cli, argv, text, pre", CLI_ROWS,
                         ids=[f"{r[0]}:{' '.join(r[1])}" for r in CLI_ROWS])
def test_cli_bad_input(cli, argv, text, pre, tmp_path, ckpt, monkeypatch, capsys):
    _watch_loads(monkeypatch, refuse=pre)
    where = {**_setup(tmp_path), "ckpt": str(ckpt)}
    argv = [a.format(**where) for a in argv]
    if cli != "train" and "--out" not in argv:
        argv += ["--out", where["out"]]
    before = _tree(tmp_path)
    assert run_cli(CLIS[cli], argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith("error: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert text in err, err
    assert _tree(tmp_path) == before                        # nothing written, nothing left half-written


def _t2v_without_null():
    return build("LatteT2V-Mini/2", caption_tokens=0, device="meta")


def _nan_checkpoint(tmp_path):
    sd = build("DiT-Mini/2").state_dict()
    sd["blocks.2.attn.qkv.weight"][1, 1] = math.inf
    torch.save(sd, tmp_path / "inf.pt")
    return tmp_path / "inf.pt"


# (what is called, exception type, text the message must contain)
API_ROWS = [
    (lambda p: SamplerConfig(num_steps=10.5), ValueError, "num_steps=10.5"),
    (lambda p: SamplerConfig(num_steps=float("nan")), ValueError, "num_steps=nan"),
    (lambda p: SamplerConfig(cfg_scale=float("inf")), ValueError, "cfg_scale=inf"),
    (lambda p: SamplerConfig(spacing="even", steps_offset=1), ValueError, "steps_offset=1 only applies"),
    (lambda p: SamplerConfig(eta=0.5), ValueError, "eta=0.5 is a DDIM setting"),
    (lambda p: SamplerConfig(cfg_channels=0), ValueError, "cfg_channels=0"),
    (lambda p: Diffusion.respaced(50, "ddim"), ValueError, "not the sampler 'ddim'"),
    (lambda p: SurfaceConfig(steps=(10.5,)), ValueError, "step 10.5 is not an integer"),
    (lambda p: SurfaceConfig(seeds=(0, 0)), ValueError, "seeds [0, 0] repeat"),
    (lambda p: SurfaceConfig(alpha="-1:1:100001", beta="-1:1:100001"), ValueError, "needs about"),
    (lambda p: SurfaceConfig(readouts=()), ValueError, "no readouts"),
    (lambda p: Perturbation("weights", site="blocks.1"), ValueError, "site='blocks.1' is only used by mode='features'"),
    (lambda p: Perturbation("features", DirectionSpec(norm="layer"), "blocks.1"), ValueError, "norm='layer'"),
    (lambda p: Perturbation("latent", DirectionSpec(include_1d=True)), ValueError, "include_1d=True"),
    (lambda p: Axis.parse("", "alpha grid"), ValueError, "alpha grid ''"),
    (lambda p: CachingErrorConfig(sampler=SamplerConfig(num_steps=10), steps=(5,), window=5), ValueError,
     "window=5"),
    (lambda p: CacheConfig(interval=0), ValueError, "interval=0"),
    (lambda p: smoothness_scores(xr.Dataset({"x": ("a", [1.0])})), ValueError, "needs a surface Dataset"),
    (lambda p: DiTConfig(num_heads=-3), ValueError, "num_heads=-3"),
    (lambda p: DiTConfig(num_heads=0), ValueError, "num_heads=0"),
    (lambda p: DiTConfig(hidden_size=96, num_heads=5), ValueError, "not divisible by num_heads=5"),
    (lambda p: LatteT2VConfig(caption_tokens=-1), ValueError, "caption_tokens=-1"),
    (lambda p: _t2v_without_null().set_negative_embeds("learned"), ValueError, "'learned' needs a checkpoint"),
    (lambda p: load_model(_nan_checkpoint(p)), CheckpointError, "'blocks.2.attn.qkv.weight' holds 1 NaN/Inf"),
]


@pytest.mark.parametrize("call, exc, text", API_ROWS, ids=[r[2] for r in API_ROWS])
def test_api_bad_input(call, exc, text, tmp_path):
    with pytest.raises(exc) as info:
        call(tmp_path)
    message = str(info.value)
    assert text in message and "\n" not in message, message


def test_the_table_is_large_enough():
    assert len(CLI_ROWS) + len(API_ROWS) >= 60 and {r[0] for r in CLI_ROWS} == set(CLIS)
