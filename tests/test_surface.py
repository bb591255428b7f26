"""Surface engine invariants: exact origin, agreement with the naive loop, hygiene, resume, CLI errors."""
from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch

from smoothness import hooks, surface
from smoothness.diffusion import SamplerConfig
from smoothness.surface import ModelEntry, SurfaceConfig, io
from smoothness.surface import cli as surface_cli
from smoothness.surface import dataset as surface_dataset
from smoothness.surface.engine import GridEngine, Perturbation, naive_forward
from smoothness.surface.perturb import DirectionSpec


def _tiny(skip: bool, seed: int = 0):
    from smoothness.models import build
    torch.manual_seed(seed)
    m = build("DiT-Mini/2" + ("-skip" if skip else ""), input_size=8, in_channels=1, num_classes=4)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    return m.eval()


@pytest.fixture(scope="module")
def pair():
    return [ModelEntry("plain", _tiny(False)), ModelEntry("skip", _tiny(True, 1))]


def _cfg(**kw):
    base = SurfaceConfig(steps=(2, 6), sampler=SamplerConfig(num_steps=6, clip_denoised=True),
                         alpha="-0.3:0.3:5", beta="-0.2:0.2:3", readouts=("output", "blocks.2"), seeds=(0, 1),
                         batch_size=4)
    return replace(base, **kw)


def _inputs(model, rows=2):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(rows, 1, 8, 8, generator=g)
    return x, torch.full((rows,), 400), torch.arange(rows) % 4


@pytest.mark.parametrize("mode,site", [("weights", None), ("features", "blocks.1"), ("features", "blocks.2.mlp"),
                                       ("features", "embed"), ("latent", None)])
def test_origin_reproduces_model_and_grid_points_differ(pair, mode, site):
    model = pair[1].model
    x, t, y = _inputs(model)
    engine = GridEngine(model, Perturbation(mode, DirectionSpec(params="all") if mode == "weights" else DirectionSpec(),
                                            site))
    with torch.no_grad():
        out = engine.forward(x, t, y, (torch.tensor([0.0, 0.2]), torch.tensor([0.0, -0.1])))
        ref = model(x, t, y)
    torch.testing.assert_close(out[0], ref, rtol=1e-5, atol=1e-6)
    assert (out[1] - ref).abs().max() > 1e-4


@pytest.mark.parametrize("cfg_scale", [1.0, 2.5])
def test_batched_weights_engine_equals_naive_loop(pair, cfg_scale):
    from smoothness.diffusion import guide
    model = pair[1].model
    spec = DirectionSpec(seed=7, params="all", include_1d=True)
    engine = GridEngine(model, Perturbation("weights", spec))
    x, t, y = _inputs(model)
    alphas, betas = torch.tensor([0.0, 0.15, -0.1, 0.05]), torch.tensor([0.1, 0.0, -0.2, 0.05])
    with torch.no_grad():
        got = engine.forward(x, t, y, (alphas, betas), cfg_scale=cfg_scale)
        for g in range(4):
            if cfg_scale == 1.0:
                want = naive_forward(model, spec, float(alphas[g]), float(betas[g]), x, t, y)
            else:
                null = torch.full_like(y, model.config.num_classes)
                both = naive_forward(model, spec, float(alphas[g]), float(betas[g]),
                                     torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
                want = guide(both[:2], both[2:], cfg_scale, 1)
            torch.testing.assert_close(got[g], want, rtol=1e-4, atol=1e-5)


def test_feature_direction_is_scaled_per_token(pair):
    from smoothness.surface.perturb import feature_direction
    h = torch.randn(16, 64) * torch.linspace(0.1, 5, 16)[:, None]
    d = feature_direction(h, seed=0, which=1, site="blocks.1")
    torch.testing.assert_close(torch.linalg.vector_norm(d, dim=-1), torch.linalg.vector_norm(h, dim=-1))


@pytest.mark.parametrize("metric,origin", [("cosine", 1.0), ("rel_l2", 0.0), ("rel_l1", 0.0)])
def test_origin_is_exact_and_nothing_is_left_behind(pair, metric, origin):
    before = [copy.deepcopy(e.model.state_dict()) for e in pair]
    ds = surface.compute(pair, _cfg(metric=metric), progress=False, log=lambda *_: None)
    at0 = ds["surface"].sel(alpha=0.0, beta=0.0).values
    assert (at0 == origin).all()                            # exactly, not approximately
    assert not np.isnan(ds["surface"].values).any()
    off = ds["surface"].sel(readout="output").isel(alpha=0).values
    assert (off != origin).all()
    for e, sd in zip(pair, before):
        assert hooks.leftover_hooks(e.model) == []
        for k, v in e.model.state_dict().items():
            assert torch.equal(v, sd[k]), k


def test_dataset_is_labelled_and_round_trips(pair, tmp_path):
    cfg = _cfg()
    ds = surface.compute(pair, cfg, progress=False, log=lambda *_: None)
    assert ds["surface"].dims == ("model", "step", "readout", "seed", "alpha", "beta")
    assert list(ds.step.values) == [2, 6]
    from smoothness.diffusion import Diffusion
    chain = Diffusion.for_config(cfg.sampler).chain
    assert list(ds.timestep.values) == [chain[1], chain[5]]
    assert 0.0 in ds.alpha.values and 0.0 in ds.beta.values
    for key in ("config", "direction_seed", "norm", "params", "metric", "chain", "versions", "model_sha256"):
        assert key in ds.attrs
    path = io.save(ds, tmp_path / "s.nc")
    back = io.load(path)
    np.testing.assert_array_equal(back["surface"].values, ds["surface"].values)
    assert back.attrs["config"] == cfg.to_json()


def test_resume_is_bit_identical(pair, tmp_path):
    cfg = _cfg()
    full = surface.compute(pair, cfg, progress=False, log=lambda *_: None)
    partial = tmp_path / "run.partial.nc"
    calls = []

    def stop_after_two(msg):
        calls.append(msg)
        if len(calls) == 4:                                  # two readouts per block: stop after 2 blocks
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        surface.compute(pair, cfg, partial=partial, progress=False, log=stop_after_two)
    saved = io.load(partial)
    done = ~np.isnan(saved["surface"].values).any(axis=(2, 3, 4, 5))
    assert done.sum() == 2 and not done.all()
    resumed = surface.compute(pair, cfg, partial=partial, resume_from=io.resumable(partial, full),
                              progress=False, log=lambda *_: None)
    np.testing.assert_array_equal(resumed["surface"].values, full["surface"].values)


def test_resume_inside_a_model_redoes_no_finished_chunk_and_is_bit_identical(pair, tmp_path, monkeypatch):
    cfg = _cfg()
    full = surface.compute(pair, cfg, progress=False, log=lambda *_: None)
    partial = tmp_path / "run.partial.nc"
    real_save, saves = io.save, []

    def save_then_stop(ds, path):
        real_save(ds, path)
        saves.append(path)
        if len(saves) == 2:                                  # two of model 0's four chunks are saved
            raise KeyboardInterrupt
    monkeypatch.setattr(io, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        surface.compute(pair, cfg, partial=partial, progress=False, log=lambda *_: None)
    monkeypatch.setattr(io, "save", real_save)
    saved = io.load(partial)["surface"].values
    assert 0 < np.isnan(saved[0]).mean() < 1 and np.isnan(saved[1]).all()
    finished = ~np.isnan(saved)
    np.testing.assert_array_equal(saved[finished], full["surface"].values[finished])
    evaluated = []
    real_local = surface_dataset.local
    monkeypatch.setattr(surface_dataset, "local", lambda *a: evaluated.append(len(a[5][0])) or real_local(*a))
    resumed = surface.compute(pair, cfg, partial=partial, resume_from=io.resumable(partial, full),
                              progress=False, log=lambda *_: None)
    np.testing.assert_array_equal(resumed["surface"].values, full["surface"].values)
    assert len(evaluated) == 1 + 2 + 4                      # the origin chunk again, model 0's last two, model 1


@pytest.mark.parametrize("mode,site,cfg_scale", [("weights", None, 1.0), ("weights", None, 2.5),
                                                 ("features", "blocks.1", 1.0), ("latent", None, 1.0)])
def test_steps_evaluated_together_equal_each_step_alone(pair, mode, site, cfg_scale):
    """Local mode stacks every step's x_t as rows of one forward; each step alone gives the same."""
    directions = DirectionSpec(params="all") if mode == "weights" else DirectionSpec()
    cfg = _cfg(perturbation=Perturbation(mode, directions, site),
               sampler=SamplerConfig(num_steps=6, clip_denoised=True, cfg_scale=cfg_scale))
    quiet = dict(progress=False, log=lambda *_: None)
    together = surface.compute(pair[1:], cfg, **quiet)["surface"]
    for step in cfg.steps:
        alone = surface.compute(pair[1:], replace(cfg, steps=(step,)), **quiet)["surface"]
        np.testing.assert_allclose(together.sel(step=[step]).values, alone.values, rtol=1e-5, atol=1e-6)
    assert np.ptp(together.values) > 1e-4


def test_resume_refuses_a_different_run(pair, tmp_path):
    ds = surface.compute(pair, _cfg(), progress=False, log=lambda *_: None)
    io.save(ds, tmp_path / "p.nc")
    other = surface.empty_dataset(pair, _cfg(metric="rel_l2"))
    with pytest.raises(ValueError, match="different run"):
        io.resumable(tmp_path / "p.nc", other)


def test_trajectory_at_first_step_equals_local(pair):
    """Step 1's input is x_T in both modes, so the two evaluations must agree there."""
    cfg = _cfg(steps=(1,), readouts=("output",), seeds=(0,))
    local = surface.compute(pair[:1], cfg, progress=False, log=lambda *_: None)
    traj = surface.compute(pair[:1], replace(cfg, evaluation="trajectory"), progress=False, log=lambda *_: None)
    np.testing.assert_allclose(traj["surface"].values, local["surface"].values, rtol=0, atol=1e-9)
    later = surface.compute(pair[:1], replace(cfg, steps=(6,), evaluation="trajectory"), progress=False,
                            log=lambda *_: None)
    assert (later["surface"].sel(alpha=0.0, beta=0.0).values == 1.0).all()


def test_non_finite_output_is_a_clear_error(pair):
    cfg = _cfg(alpha="-1e30:1e30:3", beta="-1e30:1e30:3", perturbation=Perturbation("latent"))
    with pytest.raises(ValueError, match="non-finite"):
        surface.compute(pair[:1], cfg, progress=False, log=lambda *_: None)


@pytest.mark.parametrize("kw,msg", [
    (dict(steps=(7,)), "outside the chain"),
    (dict(steps=(0,)), "outside the chain"),
    (dict(alpha="1:-1:5"), "inverted"),
    (dict(beta="-1:1:0"), "empty"),
    (dict(alpha="abc"), "min:max:count"),
    (dict(metric="l3"), "unknown metric"),
    (dict(evaluation="global"), "unknown evaluation"),
])
def test_config_errors_name_the_value(kw, msg):
    with pytest.raises(ValueError, match=msg):
        _cfg(**kw)


def test_unknown_site_and_norm_are_errors(pair):
    with pytest.raises(ValueError, match="unknown site"):
        GridEngine(pair[0].model, Perturbation("features", DirectionSpec(), "blocks.99"))
    with pytest.raises(ValueError, match="unknown normalization"):
        DirectionSpec(norm="batch")


def _save_ckpt(model, path):
    torch.save({"ema": model.state_dict()}, path)
    return str(path)


def test_cli_writes_outputs_and_rejects_bad_input(pair, tmp_path, capsys):
    from smoothness.cli import run_cli
    a = _save_ckpt(pair[0].model, tmp_path / "a.pt")
    b = _save_ckpt(pair[1].model, tmp_path / "b.pt")
    common = ["--ckpt", a, "--ckpt", b, "--num-steps", "4", "--grid=-0.1:0.1:3", "--batch-size", "9"]
    out = tmp_path / "res"
    assert run_cli(surface_cli.main, common + ["--out", str(out)]) == 0          # default steps: 4 (min(10, 4)) and 4
    stem = "surface_a_b_step4"                                # the default name describes the run
    for suffix in (".nc", ".png", "_contour.png", "_heatmap.png", ".html"):
        assert (out / f"{stem}{suffix}").is_file(), suffix
    assert not (out / f"{stem}.partial.nc").exists()
    assert io.load(out / f"{stem}.nc")["surface"].sizes["model"] == 2
    capsys.readouterr()
    bad = [(["--step", "5"], "outside the chain"), (["--step", "2", "--metric", "l2"], "invalid choice"), (["--grid=1:-1:3"], "inverted"),
           (["--readout", "blocks.77"], "unknown site"), (["--mode", "features", "--site", "nowhere"], "unknown site")]
    for extra, msg in bad:
        assert run_cli(surface_cli.main, common + ["--out", str(tmp_path / "x")] + extra) == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        import os
        if os.access(ro, os.W_OK):                           # running as root: permissions are not enforced
            blocker = tmp_path / "file"
            blocker.write_text("x")
            target = blocker / "sub"
        else:
            target = ro / "sub"
        assert run_cli(surface_cli.main, common + ["--out", str(target)]) == 2
        assert "not writable" in capsys.readouterr().err
    finally:
        ro.chmod(0o700)


def test_class_label_outside_the_model_is_refused_naming_the_model():
    from smoothness.models import build
    model = build("DiT-Mini/2", input_size=8, in_channels=1, num_classes=3).eval()
    cfg = surface.SurfaceConfig(steps=(1,), sampler=SamplerConfig(num_steps=2), alpha="-0.1:0.1:3",
                                beta="-0.1:0.1:3", class_label=5)
    with pytest.raises(ValueError, match=r"class label 5 is not allowed for tiny; use 0\.\.2"):
        surface.compute([surface.ModelEntry("tiny", model)], cfg, progress=False)


def test_cli_refuses_to_replace_a_result_of_another_configuration(pair, tmp_path, capsys):
    from smoothness.cli import run_cli
    a = _save_ckpt(pair[0].model, tmp_path / "a.pt")
    argv = ["--ckpt", a, "--num-steps", "3", "--grid=-0.1:0.1:3", "--step", "3", "--out", str(tmp_path / "o"),
            "--name", "run"]
    assert run_cli(surface_cli.main, argv) == 0
    first = io.load(tmp_path / "o" / "run.nc")
    assert run_cli(surface_cli.main, argv) == 0                           # the same configuration: fine
    assert run_cli(surface_cli.main, argv + ["--direction-seed", "7"]) == 2
    assert "different configuration; pass --overwrite" in capsys.readouterr().err
    np.testing.assert_array_equal(io.load(tmp_path / "o" / "run.nc")["surface"].values, first["surface"].values)
    stale = tmp_path / "o" / ".run.nc.k3j2h1.tmp"                      # a final save that was killed
    stale.write_bytes(b"half a file")
    assert run_cli(surface_cli.main, argv + ["--direction-seed", "7", "--overwrite"]) == 0
    assert not stale.exists() and "removed" in capsys.readouterr().out
    assert io.load(tmp_path / "o" / "run.nc").attrs["direction_seed"] == 7


def test_two_default_runs_of_different_models_do_not_overwrite_each_other(pair, tmp_path):
    from smoothness.cli import run_cli
    a, b = _save_ckpt(pair[0].model, tmp_path / "a.pt"), _save_ckpt(pair[1].model, tmp_path / "b.pt")
    common = ["--num-steps", "3", "--grid=-0.1:0.1:3", "--step", "3", "--out", str(tmp_path / "o")]
    assert run_cli(surface_cli.main, ["--ckpt", a] + common) == 0
    assert run_cli(surface_cli.main, ["--ckpt", b] + common) == 0
    assert sorted(p.name for p in (tmp_path / "o").glob("*.nc")) == ["surface_a_step3.nc", "surface_b_step3.nc"]


def test_a_checkpoint_with_non_finite_weights_is_named_before_any_perturbation(tmp_path):
    from smoothness.models import build
    model = build("DiT-Mini/2", input_size=8, in_channels=1, num_classes=3).eval()
    with torch.no_grad():
        model.blocks[0].mlp.fc1.weight[0, 0] = float("nan")
    cfg = surface.SurfaceConfig(steps=(2,), sampler=SamplerConfig(num_steps=2), alpha="-0.1:0.1:3", beta="-0.1:0.1:3")
    with pytest.raises(ValueError, match=r"nan: the unperturbed model's output is not finite at step 1 \(t=999\)"):
        surface.compute([surface.ModelEntry("nan", model)], cfg, progress=False, log=None)
