"""Feature dynamics against a naive recording of every block output, on images and on video."""
import matplotlib
import numpy as np
import pytest
import torch
from _toy_models import ToyVideo

from smoothness import hooks
from smoothness.analysis import dynamics
from smoothness.diffusion import Diffusion, SamplerConfig
from smoothness.plots.analysis import dynamics_heatmap

pytestmark = pytest.mark.usefixtures("single_thread")

SAMPLER = SamplerConfig(num_steps=6, cfg_scale=2.5, clip_denoised=True)


def _naive(model, sampler, seed, y, shape):
    """Record every block output of the whole chain, then compare consecutive steps by hand."""
    diff = Diffusion.for_config(sampler)
    with torch.no_grad(), hooks.record(model, "blocks.*", half="cond") as rec:
        diff.sample(model, shape, y, sampler, seed=seed)
    out = {}
    for site, feats in rec.items():
        i = int(site.split(".")[1])
        for s in range(1, len(feats)):
            a, b = feats[s].double().numpy().ravel(), feats[s - 1].double().numpy().ravel()
            rel = np.linalg.norm(a - b) / np.linalg.norm(b)
            cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
            out[(i, s + 1)] = (rel, 1 - cos)
    return out


def test_changes_equal_a_naive_recording(make_model):
    models = {"dit": make_model("DiT-Mini/2"), "skip": make_model("DiT-Mini/2-skip", seed=1)}
    ds = dynamics.compute(models, dynamics.DynamicsConfig(sampler=SAMPLER, seeds=(0, 3), class_label=2))
    assert ds.change.dims == ("model", "metric", "block", "step", "seed")
    assert ds.step.values.tolist() == [2, 3, 4, 5, 6]
    chain = Diffusion.for_config(SAMPLER).chain
    assert ds.timestep.values.tolist() == chain[1:] and ds.timestep_prev.values.tolist() == chain[:-1]
    for label, model in models.items():
        for seed in (0, 3):
            want = _naive(model, SAMPLER, seed, torch.tensor([2]), (1, 2, 8, 8))
            for (i, s), (rel, cd) in want.items():
                got = ds.change.sel(model=label, block=i, step=s, seed=seed)
                np.testing.assert_allclose(got.sel(metric="rel_l2"), rel, rtol=1e-9)
                np.testing.assert_allclose(got.sel(metric="cosine_distance"), cd, rtol=1e-6, atol=1e-12)
        assert hooks.leftover_hooks(model) == []
    for key in ("config", "chain", "seeds", "class_label", "flatten"):
        assert key in ds.attrs


def test_unconditional_video_model():
    model = ToyVideo().eval()
    sampler = SamplerConfig(num_steps=5)
    ds = dynamics.compute({"toy": model}, dynamics.DynamicsConfig(sampler=sampler))
    want = _naive(model, sampler, 0, None, (1, 1, 3, 4, 4))
    for (i, s), (rel, _) in want.items():
        np.testing.assert_allclose(ds.change.sel(model="toy", block=i, step=s, seed=0, metric="rel_l2"), rel, rtol=1e-9)
    assert ds.unit.sel(model="toy").values.tolist() == [0, 1, 2, 3]


def test_heatmap_is_a_figure_and_checks_its_arguments(make_model):
    ds = dynamics.compute({"dit": make_model("DiT-Mini/2")}, dynamics.DynamicsConfig(sampler=SamplerConfig(num_steps=4)))
    fig = dynamics_heatmap(ds, metric="cosine_distance")
    assert isinstance(fig, matplotlib.figure.Figure)
    assert fig.axes[0].get_xlim()[0] > fig.axes[0].get_xlim()[1]        # t decreases to the right
    with pytest.raises(ValueError, match="unknown metric 'l1'; allowed: rel_l2, cosine_distance"):
        dynamics_heatmap(ds, metric="l1")
    with pytest.raises(ValueError, match="unknown seed 9; allowed: 0"):
        dynamics_heatmap(ds, seed=9)


def test_bad_settings_are_rejected(make_model):
    with pytest.raises(ValueError, match="num_steps=1 leaves no consecutive steps"):
        dynamics.DynamicsConfig(sampler=SamplerConfig(num_steps=1))
    with pytest.raises(ValueError, match="repeat"):
        dynamics.DynamicsConfig(seeds=(1, 1))
    model = make_model("DiT-Mini/2")
    with pytest.raises(ValueError, match="unknown site 'blocks.9'"):
        dynamics.compute({"m": model}, dynamics.DynamicsConfig(sampler=SamplerConfig(num_steps=3), sites="blocks.9"))
    with pytest.raises(ValueError, match="is not a block output"):
        dynamics.compute({"m": model}, dynamics.DynamicsConfig(sampler=SamplerConfig(num_steps=3), sites="embed"))
    with pytest.raises(ValueError, match="class label 7 is not allowed"):
        dynamics.compute({"m": model}, dynamics.DynamicsConfig(sampler=SamplerConfig(num_steps=3), class_label=7))
    assert hooks.leftover_hooks(model) == []
