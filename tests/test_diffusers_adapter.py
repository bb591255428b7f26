"""diffusers transformers behind the protocol: each adapter against its class's own forward, the
native DiT and LatteT2V against diffusers as independent implementations, model folders (sharded
too) and their errors, and the tools (hooks, surfaces, caches, MAC counts) on adapter models."""
from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

pytest.importorskip("diffusers")

from _diffusers_models import caption_parts, dit, hunyuan, latte, pixart, randomize  # noqa: E402

from smoothness import hooks  # noqa: E402
from smoothness.cache import CacheConfig, apply_cache, flops  # noqa: E402
from smoothness.models import build, load_model  # noqa: E402
from smoothness.models.folders import FolderError  # noqa: E402
from smoothness.models.hunyuan import pack_captions  # noqa: E402
from smoothness.models.protocol import is_model, wrap  # noqa: E402
from smoothness.surface.engine import GridEngine, Perturbation, naive_forward  # noqa: E402
from smoothness.surface.perturb import DirectionSpec  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")
G = torch.Generator().manual_seed(0)
X = torch.randn(2, 4, 8, 8, generator=G)
T = torch.tensor([300, 300])
CAPS = torch.randn(2, 6, 12, generator=G)


def outputs(name):
    """(adapter output, the class's own forward) on the same random inputs."""
    if name == "dit":
        inner = dit()
        y = torch.tensor([1, 10])                                   # a class and the null class
        return wrap(inner)(X, T, y), inner(X, T, class_labels=y).sample
    if name == "pixart":
        inner = pixart()
        added = {"resolution": None, "aspect_ratio": None}
        return wrap(inner)(X, T, CAPS), inner(X, CAPS, T, added_cond_kwargs=added).sample
    inner = latte()
    video = torch.randn(2, 4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    return wrap(inner)(video, T, CAPS), inner(video, T, CAPS).sample


@pytest.mark.parametrize("name", ["dit", "pixart", "latte"])
def test_adapter_forward_equals_the_class_forward(name):
    with torch.no_grad():
        out, ref = outputs(name)
    assert ref.abs().max() > 0.1                                    # randomized weights: not the zero output
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("make", [dit, pixart, latte, hunyuan])
def test_protocol_members_and_state_dict(make):
    inner = make()
    model = wrap(inner)
    assert is_model(model) and model.state_dict().keys() == inner.state_dict().keys()
    assert len(model.blocks) == model.config.depth and hooks.resolve_sites(model, "blocks.*")
    model.to(torch.float64)                                         # the wrapped model's own parameters follow
    assert all(p.dtype == torch.float64 for p in inner.parameters())


def native_dit_from_diffusers(inner):
    """facebookresearch/DiT names from diffusers' (scripts/convert_dit_to_diffusers.py, reversed)."""
    sd, out = inner.state_dict(), {}
    emb = "transformer_blocks.0.norm1.emb."
    out |= {"x_embedder.proj.weight": sd["pos_embed.proj.weight"], "x_embedder.proj.bias": sd["pos_embed.proj.bias"],
            "y_embedder.embedding_table.weight": sd[emb + "class_embedder.embedding_table.weight"],
            "final_layer.adaLN_modulation.1.weight": sd["proj_out_1.weight"],
            "final_layer.adaLN_modulation.1.bias": sd["proj_out_1.bias"],
            "final_layer.linear.weight": sd["proj_out_2.weight"], "final_layer.linear.bias": sd["proj_out_2.bias"]}
    for i, j in (("0", "1"), ("2", "2")):
        for w in ("weight", "bias"):
            out[f"t_embedder.mlp.{i}.{w}"] = sd[emb + f"timestep_embedder.linear_{j}.{w}"]
    for b in range(len(inner.transformer_blocks)):
        p, q = f"transformer_blocks.{b}.", f"blocks.{b}."
        for w in ("weight", "bias"):
            out[q + f"attn.qkv.{w}"] = torch.cat([sd[p + f"attn1.to_{n}.{w}"] for n in "qkv"])
            out[q + f"attn.proj.{w}"] = sd[p + f"attn1.to_out.0.{w}"]
            out[q + f"mlp.fc1.{w}"] = sd[p + f"ff.net.0.proj.{w}"]
            out[q + f"mlp.fc2.{w}"] = sd[p + f"ff.net.2.{w}"]
            out[q + f"adaLN_modulation.1.{w}"] = sd[p + f"norm1.linear.{w}"]
    return out


def test_native_dit_equals_diffusers_dit_on_converted_weights():
    inner = dit(norm_eps=1e-6)
    with torch.no_grad():                                           # one timestep / label embedder, as DiT has
        for block in inner.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(inner.transformer_blocks[0].norm1.emb.state_dict())
    native = build("DiT-Mini/2", input_size=8, in_channels=4, hidden_size=16, num_heads=2, depth=3, num_classes=10).eval()
    sd = native_dit_from_diffusers(inner)
    sd["pos_embed"] = native.pos_embed.detach().clone()
    native.load_state_dict(sd, strict=True)
    torch.testing.assert_close(native.pos_embed[0], inner.pos_embed.pos_embed[0])   # the same sin-cos table
    y = torch.tensor([3, 7])
    with torch.no_grad():
        zero = torch.zeros(2, dtype=torch.long)                     # t = 0: sinusoid phases all zero
        torch.testing.assert_close(native(X, zero, y), wrap(inner)(X, zero, y), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(native(X, T, y), wrap(inner)(X, T, y), atol=1e-4)
        # diffusers' DiT spaces its timestep frequencies by half - 1 (downscale_freq_shift=1), DiT by half:
        # the only difference, as switching the shift off shows.
        for block in inner.transformer_blocks:
            block.norm1.emb.time_proj.downscale_freq_shift = 0
        torch.testing.assert_close(native(X, T, y), wrap(inner)(X, T, y), rtol=1e-5, atol=1e-5)


def test_native_latte_t2v_equals_diffusers_latte_on_the_same_state_dict():
    native = build("LatteT2V-Mini/2", input_size=8, num_frames=3, hidden_size=16, num_heads=2, caption_channels=12,
                   caption_tokens=0)                # diffusers keeps no learned null caption (y_embedding)
    randomize(native, seed=4)
    inner = latte().eval()
    inner.load_state_dict(native.state_dict(), strict=True)
    video = torch.randn(2, 4, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = inner(video, T, CAPS).sample
        torch.testing.assert_close(native(video, T, CAPS), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(wrap(inner)(video, T, CAPS), ref, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ folders
def test_folders_load_offline_strictly_sharded_too(tmp_path):
    inner = pixart()
    inner.save_pretrained(str(tmp_path / "one"), safe_serialization=True)
    inner.save_pretrained(str(tmp_path / "sharded"), safe_serialization=True, max_shard_size="20KB")
    index = json.loads((tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    with torch.no_grad():
        ref = wrap(inner)(X, T, CAPS)
        for name in ("one", "sharded"):
            model = load_model(tmp_path / name)
            assert type(model).__name__ == "PixArtAdapter" and not model.training
            torch.testing.assert_close(model(X, T, CAPS), ref, rtol=0, atol=0)


def test_folder_errors_are_one_clear_line(tmp_path):
    inner = dit()
    inner.save_pretrained(str(tmp_path / "m"), safe_serialization=True, max_shard_size="20KB")
    shard = sorted((tmp_path / "m").glob("*-00001-of-*.safetensors"))[0]
    shard.rename(tmp_path / "moved.safetensors")
    with pytest.raises(FolderError, match=rf"points at missing file\(s\): {shard.name}"):
        load_model(tmp_path / "m")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FolderError, match="has no config.json$"):
        load_model(tmp_path / "empty")
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    (tmp_path / "m").rename(tmp_path / "pipe" / "transformer")
    with pytest.raises(FolderError, match="it is a pipeline folder: pass its transformer"):
        load_model(tmp_path / "pipe")
    (tmp_path / "empty" / "config.json").write_text(json.dumps({"_class_name": "DiTTransformer2DModel"}))
    with pytest.raises(FolderError, match="has no weights; allowed: diffusion_pytorch_model.safetensors"):
        load_model(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(FolderError, match="UNet2DConditionModel .* is not supported; supported: DiTTransformer2DModel, "
                                          "PixArtTransformer2DModel, LatteTransformer3DModel, HunyuanDiT2DModel"):
        load_model(tmp_path / "empty")
    with pytest.raises(ValueError, match="Linear is not supported; supported: DiTTransformer2DModel"):
        wrap(torch.nn.Linear(2, 2))


def test_missing_diffusers_names_the_extra(monkeypatch):
    import builtins

    from smoothness.models.diffusers_adapter import import_diffusers
    real = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name == "diffusers" else real(name, *a, **k))
    with pytest.raises(ValueError, match=r"needs the optional 'diffusers' package: pip install 'dit-smoothness\[diffusers\]'"):
        import_diffusers()


# ------------------------------------------------------------------ tools
def test_hooks_record_blocks_branches_and_output():
    model = wrap(pixart())
    sites = model.sites()
    assert sites["blocks.1"] == "transformer_blocks.1" and sites["blocks.1.attn"] == "transformer_blocks.1.attn1"
    assert sites["blocks.1.cross"] == "transformer_blocks.1.attn2" and sites["blocks.1.mlp"] == "transformer_blocks.1.ff"
    with torch.no_grad(), hooks.record(model, ["blocks.*", "blocks.0.mlp", "output"]) as rec:
        out = model(X, T, CAPS)
    assert len(rec["blocks.2"]) == 1 and rec["blocks.2"][0].shape == (2, 16, 16)
    torch.testing.assert_close(rec["output"][0], out)
    assert hooks.leftover_hooks(model) == []
    latte_model = wrap(latte())
    assert [latte_model.block_kind(i) for i in range(4)] == ["spatial", "temporal", "spatial", "temporal"]
    assert latte_model.sites()["blocks.3"] == "temporal_transformer_blocks.1"
    assert "blocks.3.cross" not in latte_model.sites()


@pytest.mark.parametrize("make", ["dit", "hunyuan", "pixart", "latte"])
def test_engine_equals_naive_loop(make):
    if make == "dit":
        model, x, y = wrap(dit()), X[:1], torch.tensor([2])
    elif make == "hunyuan":
        model, x, y = wrap(hunyuan()), X[:1], pack_captions(caption_parts(1))
    elif make == "pixart":                                           # blocks add their own scale_shift_table
        model, x, y = wrap(pixart()), X[:1], CAPS[:1]
    else:
        model, x, y = wrap(latte()), torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(8)), CAPS[:1]
    spec = DirectionSpec(seed=1)
    if make in ("pixart", "latte"):
        from smoothness.surface.perturb import select_parameters
        assert "transformer_blocks.0.scale_shift_table" in select_parameters(model, spec)
    coef = (torch.tensor([0.0, 0.3, -0.2]), torch.tensor([0.0, 0.1, 0.25]))
    t = torch.tensor([400])
    with torch.no_grad():
        out = GridEngine(model, Perturbation("weights", spec)).forward(x, t, y, coef)
        for i in range(3):
            ref = naive_forward(model, spec, float(coef[0][i]), float(coef[1][i]), x, t, y)
            torch.testing.assert_close(out[i], ref, rtol=1e-4, atol=1e-5)
    assert hooks.leftover_hooks(model) == []


def test_caches_without_skips_and_their_errors():
    model = wrap(dit(num_layers=4))
    y = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="Skip-Cache needs a model with skip branches"):
        with apply_cache(model, CacheConfig(method="skip-cache", k=1)):
            pass
    with torch.no_grad():
        ref = model(X, T, y)
        for method in ("deep-reuse", "delta", "fora"):
            with apply_cache(model, CacheConfig(method=method, interval=2, k=1, t_stop=0)) as state:
                first = model(X, T, y)                               # full
                second = model(X, T, y)                              # cached, same input
            assert [c.full for c in state.calls] == [True, False]
            torch.testing.assert_close(first, ref, rtol=0, atol=0)
            if method in ("delta", "fora"):                          # same input: reuse is exact
                torch.testing.assert_close(second, ref, rtol=1e-5, atol=1e-5)
            assert hooks.leftover_hooks(model) == []


def _sdpa_in_fc():
    q = torch.randn(1, 1, 4, 8)
    with flops._counter() as fc:
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    return fc.get_total_flops()


@pytest.mark.parametrize("name", ["dit", "pixart", "latte", "hunyuan"])
def test_measured_macs_sum_to_flop_counter_mode_of_the_class_forward(name):
    assert _sdpa_in_fc() == 2 * 2 * 4 * 4 * 8                     # CPU attention counted (QK^T and AV)
    inner = {"dit": dit, "pixart": pixart, "latte": latte, "hunyuan": hunyuan}[name]()
    model = wrap(inner)
    m = flops.measure(model, caption_tokens=6)
    x = torch.zeros(1, *model.sample_shape())
    t = torch.full((1,), 500)
    with torch.no_grad(), flops._counter() as fc:
        if name == "dit":
            inner(x, t, class_labels=torch.zeros(1, dtype=torch.long))
        elif name == "pixart":
            inner(x, torch.zeros(1, 6, 12), t, added_cond_kwargs={"resolution": None, "aspect_ratio": None})
        elif name == "latte":
            inner(x, t, torch.zeros(1, 6, 12))
        else:
            model(x, t, torch.zeros(1, model.config.caption_tokens, model.config.caption_channels))
    assert m.call() == fc.get_total_flops() // 2
    assert m.call("skip-cache", 1, False) == m.always + m.units[0] + m.units[-1]
    # the branches are all of an adaLN-single block (PixArt, Latte); DiT and HunYuan blocks also modulate
    assert 0 < sum(m.branches) <= sum(m.units) and (sum(m.branches) < sum(m.units)) == (name in ("dit", "hunyuan"))


def test_dit_adapter_macs_by_hand():
    """diffusers' DiT = DiT's analytic count plus one (timestep + label) embedding per block."""
    model = wrap(dit(num_layers=3))
    native = build("DiT-Mini/2", input_size=8, in_channels=4, hidden_size=16, num_heads=2, depth=3, num_classes=10)
    per_block_embed = 256 * 16 + 16 * 16
    assert flops.measure(model).call() == flops.call_macs(flops.Shape.of(native)) + 3 * per_block_embed
    shape = flops.Shape.of(model)                                   # a measured family: counted, not by formula
    assert isinstance(shape, flops.MeasuredShape) and shape.full_call() == flops.measure(model).call()
    with pytest.raises(ValueError, match="measured on the model"):
        flops.Shape.of(model.config)
    cost = flops.schedule_cost(model, CacheConfig(method="deep-reuse", interval=2, k=1, t_stop=0), [900, 800, 700, 600])
    assert cost.attrs["theoretical_speedup"] > 1.3


def test_pixart_with_size_conditioning_as_the_pipeline():
    """use_additional_conditions: resolution (H, W) in pixels and aspect ratio H / W, as PixArtAlphaPipeline."""
    inner = pixart(use_additional_conditions=True, num_attention_heads=3, cross_attention_dim=24)   # width 24 = 3 x 8
    x = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(6))
    added = {"resolution": torch.tensor([[64.0, 96.0]]).repeat(2, 1), "aspect_ratio": torch.tensor([[64 / 96]]).repeat(2, 1)}
    with torch.no_grad():
        torch.testing.assert_close(wrap(inner)(x, T, CAPS), inner(x, CAPS, T, added_cond_kwargs=added).sample,
                                   rtol=1e-6, atol=1e-6)


def test_feature_perturbation_at_a_unit_output_equals_the_hooked_forward():
    """The engine's tiled-prefix path (features at blocks.{i}) against the hook on the full batch."""
    model = wrap(hunyuan())
    x, y, t = X[:1], pack_captions(caption_parts(1)), torch.tensor([400])
    coef = (torch.tensor([0.0, 0.5]), torch.tensor([0.2, -0.3]))
    engine = GridEngine(model, Perturbation("features", DirectionSpec(seed=2), site="blocks.2"))
    tile = lambda v: v.repeat(2, *([1] * (v.dim() - 1)))
    with torch.no_grad():
        out = engine.forward(x, t, y, coef)
        ref = engine.run(tile(x), tile(t), tile(y), coef)
    torch.testing.assert_close(out.reshape(ref.shape), ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out[0], out[1])


def test_cli_on_a_broken_folder_exits_2(tmp_path, capsys):
    from smoothness.cli import run_cli
    from smoothness.surface.cli import main as surface_main
    (tmp_path / "m").mkdir()
    assert run_cli(surface_main, ["--ckpt", str(tmp_path / "m"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "has no config.json" in err and "Traceback" not in err


def test_a_diffusers_layout_hunyuan_file_loads_too(tmp_path):
    from safetensors.torch import save_file
    inner = hunyuan()
    save_file(inner.state_dict(), str(tmp_path / "hy.safetensors"))
    model = load_model(tmp_path / "hy.safetensors")
    assert model.config.input_size == 128 and model.sample_shape() == (4, 128, 128)   # 1024 px unless told
    y = pack_captions(caption_parts(1))
    with torch.no_grad():
        torch.testing.assert_close(model(X[:1], T[:1], y), wrap(inner)(X[:1], T[:1], y), rtol=0, atol=0)


def test_analyses_on_class_and_caption_conditioned_adapters(tmp_path):
    import numpy as np

    from smoothness.analysis import correlate, dynamics, spectral
    from smoothness.analysis.correlate import CorrelateConfig
    from smoothness.diffusion import SamplerConfig
    from smoothness.surface import SurfaceConfig
    sampler = SamplerConfig(num_steps=4, sampler="ddim", cfg_scale=2.0)
    model = wrap(dit(num_layers=4))
    dyn = dynamics.compute({"dit": model}, dynamics.DynamicsConfig(sampler=sampler))
    assert np.isfinite(dyn.change.values).all() and json.loads(dyn.attrs["model_family"]) == {"dit": "diffusers-dit"}
    spec = spectral.compute({"dit": model}, spectral.SpectralConfig(steps=(2,), sampler=sampler, maps=("block", "unit"),
                                                                    iterations=3))
    assert np.isfinite(spec.sigma_unit.values).all()
    torch.save(CAPS[0], tmp_path / "cap.pt")
    surf = SurfaceConfig(steps=(2, 3), sampler=sampler, alpha="-0.2:0.2:3", beta="-0.2:0.2:3", seeds=(0,),
                         caption_embeds=str(tmp_path / "cap.pt"))
    ds = correlate.compute({"pixart": wrap(pixart(num_layers=4))},
                           CorrelateConfig(surface=surf, k=1, window=1, n_resamples=10), log=None)
    assert np.isfinite(ds.caching_error.values).all()


def test_clis_on_a_class_conditional_folder(tmp_path):
    import xarray as xr

    from smoothness.cache.cli import main as cache_main
    from smoothness.cli import run_cli
    from smoothness.surface.cli import main as surface_main
    dit(num_layers=4).save_pretrained(str(tmp_path / "dit"), safe_serialization=True)
    assert run_cli(surface_main, ["--ckpt", str(tmp_path / "dit"), "--steps", "2", "--num-steps", "3", "--class-label", "4",
                                  "--grid=-0.1:0.1:3", "--out", str(tmp_path / "s")]) == 0
    assert run_cli(cache_main, ["--ckpt", str(tmp_path / "dit"), "--num-sampling-steps", "6", "--intervals", "2",
                                "--k", "1", "--classes", "1,2", "--per-class", "1", "--methods", "deep-reuse,delta,fora",
                                "--out", str(tmp_path / "c"), "--name", "c"]) == 0
    with xr.open_dataset(tmp_path / "c" / "c.nc", engine="h5netcdf") as ds:
        assert float(ds.theoretical_speedup.max()) > 1.2 and ds.attrs["cfg_scale"] == 3.0
