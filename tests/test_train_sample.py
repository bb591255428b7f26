"""Training is reproducible and resumable; the sample CLI validates its input; the shipped classifier."""

import pytest
import torch

from smoothness import data
from smoothness.cli import run_cli
from smoothness.data import classifier, sample, train


def _ckpt(path):
    return torch.load(path, weights_only=True)


def test_training_is_deterministic_and_resume_is_exact(tmp_path):
    cfg = train.TrainConfig(model="DiT-Mini/4-skip", steps=4, batch_size=8, warmup=2)
    log = lambda *_: None
    train.train(cfg, tmp_path / "a.pt", log=log)
    train.train(cfg, tmp_path / "b.pt", log=log)
    a, b = _ckpt(tmp_path / "a.pt"), _ckpt(tmp_path / "b.pt")
    for k in a["ema"]:
        assert torch.equal(a["ema"][k], b["ema"][k]), k
    # interrupted after 2 steps (state saved at step 2), then resumed
    half = train.TrainConfig(model="DiT-Mini/4-skip", steps=2, batch_size=8, warmup=2)
    state = tmp_path / "c.state.pt"
    train.train(half, tmp_path / "c.pt", save_every=1, log=log)      # leaves no state once finished
    assert not state.exists()
    with pytest.raises(KeyboardInterrupt):
        def stop(msg):
            raise KeyboardInterrupt
        train.train(train.TrainConfig(model="DiT-Mini/4-skip", steps=4, batch_size=8, warmup=2),
                    tmp_path / "c.pt", save_every=2, log=lambda m: stop(m) if "step 4/" in m else None)
    assert state.exists()
    train.train(cfg, tmp_path / "c.pt", resume=True, log=log)
    c = _ckpt(tmp_path / "c.pt")
    for k in a["ema"]:
        assert torch.equal(a["ema"][k], c["ema"][k]), k
    assert torch.equal(a["meta"]["losses"], c["meta"]["losses"])


def test_shipped_classifier_is_accurate_on_held_out_digits():
    acc = classifier.accuracy(classifier.load(), data.load("test"))
    assert acc >= 0.97


def test_digits_split_is_fixed_and_disjoint():
    tr, te = data.load("train"), data.load("test")
    assert len(tr.labels) + len(te.labels) == 1797
    assert tr.images.shape[1:] == (1, 16, 16) and tr.images.min() >= -1 and tr.images.max() <= 1
    flat_tr = {tuple(x.flatten().tolist()) for x in data.downsample(tr.images[:200])}
    assert all(tuple(x.flatten().tolist()) not in flat_tr for x in data.downsample(te.images[:50]))


@pytest.mark.parametrize("argv,msg", [
    (["--cfg-scale", "0.5"], "cfg_scale"),
    (["--model", "no-such-model"], "unknown model"),
    (["--ckpt", "/nonexistent/x.pt"], "does not exist"),
    (["--classes", "1,x"], "comma-separated"),
    (["--per-class", "0"], "--per-class"),
    (["--num-sampling-steps", "0"], "num_steps"),
])
def test_sample_cli_errors(argv, msg, tmp_path, capsys):
    assert run_cli(sample.main, argv + ["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err


def test_sample_cli_writes_a_grid_for_a_checkpoint(tmp_path):
    from smoothness.models import build
    torch.manual_seed(0)
    m = build("DiT-Mini/2", input_size=16, in_channels=1, num_classes=10)
    torch.save({"ema": m.state_dict()}, tmp_path / "m.pt")
    assert run_cli(sample.main, ["--ckpt", str(tmp_path / "m.pt"), "--num-sampling-steps", "3", "--per-class", "1",
                                 "--classes", "0,7", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "samples_m_DDIM-3.png").stat().st_size > 1000


def test_sample_names_its_chain_and_refuses_to_replace_another_configuration(tmp_path, capsys):
    from smoothness.models import build
    torch.manual_seed(0)
    m = build("DiT-Mini/2", input_size=16, in_channels=1, num_classes=10)
    torch.save({"ema": m.state_dict()}, tmp_path / "m.pt")
    argv = ["--ckpt", str(tmp_path / "m.pt"), "--num-sampling-steps", "2", "--per-class", "1", "--classes", "0",
            "--out", str(tmp_path)]
    assert run_cli(sample.main, argv) == 0
    png = tmp_path / "samples_m_DDIM-2.png"                      # the default chain is DDIM
    first = png.read_bytes()
    assert "DDIM-2" in capsys.readouterr().out
    assert run_cli(sample.main, argv) == 0                       # the same configuration: written again
    assert run_cli(sample.main, argv + ["--seed", "1"]) == 2     # another configuration: refused, kept
    assert "different configuration" in capsys.readouterr().err and png.read_bytes() == first
    assert run_cli(sample.main, argv + ["--seed", "1", "--overwrite"]) == 0
    assert png.read_bytes() != first
    (tmp_path / f".{png.name}.abc123.tmp").write_bytes(b"half")   # left by a killed write
    assert run_cli(sample.main, argv + ["--seed", "1"]) == 0
    assert not list(tmp_path.glob(".*.tmp"))
    assert run_cli(sample.main, ["--ddpm-250", "--sampler", "ddim"] + argv) == 2
    assert "--ddpm-250 sets the chain" in capsys.readouterr().err
