"""HunYuan-DiT through diffusers' HunyuanDiT2DModel: the adapter against the class's own forward, the
Tencent layout against key tables written here from the official code, the native long skips, the
``hunyuan`` Skip-Cache preset against a simulation of the official rule, caption files and the CLIs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from _diffusers_models import HY, caption_parts, hunyuan  # noqa: E402

from smoothness import hooks  # noqa: E402
from smoothness.cache import CacheConfig, apply_cache  # noqa: E402
from smoothness.cache.schedule import Schedule  # noqa: E402
from smoothness.cli import run_cli  # noqa: E402
from smoothness.diffusion import Diffusion, SamplerConfig, space_timesteps  # noqa: E402
from smoothness.models import load_model  # noqa: E402
from smoothness.models.captions import load_caption_embeds  # noqa: E402
from smoothness.models.hunyuan import crop_region, infer_kwargs, pack_captions, to_diffusers  # noqa: E402
from smoothness.models.protocol import family_of, is_model, wrap  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


def class_forward(inner, x, t, parts):
    """The class's own forward with the inputs HunyuanDiTPipeline builds (RoPE, style 0, meta size)."""
    from diffusers.models.embeddings import get_2d_rotary_pos_embed
    c = inner.config
    gh, gw = x.shape[-2] // c.patch_size, x.shape[-1] // c.patch_size
    rope = get_2d_rotary_pos_embed(inner.inner_dim // inner.num_heads, crop_region((gh, gw), 512 // 8 // c.patch_size),
                                   (gh, gw), output_type="pt")
    n, px = x.shape[0], (x.shape[-2] * 8, x.shape[-1] * 8)
    meta = torch.tensor([[*px, *px, 0, 0]], dtype=torch.float32).repeat(n, 1) if c.use_style_cond_and_image_meta_size else None
    style = torch.zeros(n, dtype=torch.long) if c.use_style_cond_and_image_meta_size else None
    rep = {k: v.repeat(n, *([1] * (v.dim() - 1))) if v.shape[0] == 1 else v for k, v in parts.items()}
    return inner(x, t.float(), encoder_hidden_states=rep["prompt_embeds"], text_embedding_mask=rep["prompt_attention_mask"],
                 encoder_hidden_states_t5=rep["prompt_embeds_2"], text_embedding_mask_t5=rep["prompt_attention_mask_2"],
                 image_meta_size=meta, style=style, image_rotary_emb=rope, return_dict=False)[0]


@pytest.fixture(scope="module")
def tiny():
    return hunyuan()


@pytest.mark.parametrize("style,size", [(True, (8, 8)), (False, (8, 8)), (True, (8, 12)), (False, (12, 4))])
def test_adapter_forward_equals_the_class_forward(style, size):
    inner = hunyuan(seed=3, use_style_cond_and_image_meta_size=style)
    model = wrap(inner)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, *size, generator=g), torch.tensor([700, 700])
    parts = caption_parts(2)
    with torch.no_grad():
        ref = class_forward(inner, x, t, parts)
        out = model(x, t, pack_captions(parts))
    assert ref.abs().max() > 0.1                                       # randomized: not the zero output
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    assert is_model(model) and family_of(model).prediction == "v" and family_of(model).schedule == "scaled_linear"
    assert model.state_dict().keys() == inner.state_dict().keys()


def test_native_long_skips_pair_block_i_with_depth_minus_one_minus_i(tiny):
    """Which block output each fusing block receives, observed in the class's own forward."""
    model, outs, got = wrap(tiny), {}, {}
    handles = []
    for i, block in enumerate(tiny.blocks):
        handles.append(block.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o)))
        handles.append(block.register_forward_pre_hook(
            lambda m, a, kw, i=i: got.__setitem__(i, kw.get("skip")), with_kwargs=True))
    with torch.no_grad():
        class_forward(tiny, torch.randn(1, 4, 8, 8), torch.tensor([500]), caption_parts(1))
    for h in handles:
        h.remove()
    pairs = {i: next(j for j, o in outs.items() if got[i] is o) for i in got if got[i] is not None}
    assert pairs == {i: 7 - i for i in range(5, 8)}                       # depth 8: 5<-2, 6<-1, 7<-0
    assert {u: src for u, (src, _) in model.skip_into.items()} == pairs
    assert model.skip_sources == frozenset({0, 1, 2})                      # blocks 3 and 4 neither push nor pop
    assert [s for s in model.sites() if s.startswith("skips.")] == ["skips.0", "skips.1", "skips.2"]
    assert model.sites()["skips.0"] == "blocks.5.skip_linear"


def test_stages_and_fusion_reproduce_the_forward(tiny):
    """embed / run_unit / head, a tiled trunk, and fuse + run_blocks on a fused block (spectral's path)."""
    model = wrap(tiny)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([300, 300]), pack_captions(caption_parts(2))
    with torch.no_grad():
        ref = model(x, t, y)
        trunk = model.embed(x, t, y).repeat(2)
        for u in range(model.num_units):
            if u == 6:
                src, k = model.skip_into[u]
                fused = model.fuse(k, trunk.h, trunk.skips.pop(src))
                trunk.h = model.run_blocks(u, fused, trunk)
            else:
                model.run_unit(u, trunk)
        out = model.head(trunk)
    torch.testing.assert_close(out[:2], ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[2:], ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ Tencent layout, key tables
def official_keys(depth, hidden, heads, mlp_ratio, style_and_size=True, in_ch=4, patch=2, learn_sigma=True,
                  text_dim=1024, t5_dim=2048, text_len=77, t5_len=256) -> dict:
    """Keys and shapes of the official hydit ``HunYuanDiT`` (modules/models.py, models_cache.py)."""
    H, M, hd = hidden, int(hidden * mlp_ratio), hidden // heads
    out = in_ch * 2 if learn_sigma else in_ch
    extra = 1024 + (6 * 256 + H if style_and_size else 0)    # pooler output + size cond + style embedding
    k = {"mlp_t5.0.weight": (4 * t5_dim, t5_dim), "mlp_t5.0.bias": (4 * t5_dim,), "mlp_t5.2.weight": (text_dim, 4 * t5_dim),
         "mlp_t5.2.bias": (text_dim,), "text_embedding_padding": (text_len + t5_len, text_dim),
         "pooler.positional_embedding": (t5_len + 1, t5_dim), "pooler.c_proj.weight": (1024, t5_dim),
         "pooler.c_proj.bias": (1024,), "x_embedder.proj.weight": (H, in_ch, patch, patch), "x_embedder.proj.bias": (H,),
         "t_embedder.mlp.0.weight": (H, 256), "t_embedder.mlp.0.bias": (H,), "t_embedder.mlp.2.weight": (H, H),
         "t_embedder.mlp.2.bias": (H,), "extra_embedder.0.weight": (4 * H, extra), "extra_embedder.0.bias": (4 * H,),
         "extra_embedder.2.weight": (H, 4 * H), "extra_embedder.2.bias": (H,),
         "final_layer.linear.weight": (patch * patch * out, H), "final_layer.linear.bias": (patch * patch * out,),
         "final_layer.adaLN_modulation.1.weight": (2 * H, H), "final_layer.adaLN_modulation.1.bias": (2 * H,)}
    for p in ("k_proj", "q_proj", "v_proj"):
        k |= {f"pooler.{p}.weight": (t5_dim, t5_dim), f"pooler.{p}.bias": (t5_dim,)}
    if style_and_size:
        k["style_embedder.weight"] = (1, H)
    for i in range(depth):
        b = f"blocks.{i}."
        k |= {b + "norm1.weight": (H,), b + "norm1.bias": (H,), b + "attn1.Wqkv.weight": (3 * H, H),
              b + "attn1.Wqkv.bias": (3 * H,), b + "attn1.out_proj.weight": (H, H), b + "attn1.out_proj.bias": (H,),
              b + "norm2.weight": (H,), b + "norm2.bias": (H,), b + "mlp.fc1.weight": (M, H), b + "mlp.fc1.bias": (M,),
              b + "mlp.fc2.weight": (H, M), b + "mlp.fc2.bias": (H,), b + "default_modulation.1.weight": (H, H),
              b + "default_modulation.1.bias": (H,), b + "attn2.q_proj.weight": (H, H), b + "attn2.q_proj.bias": (H,),
              b + "attn2.kv_proj.weight": (2 * H, text_dim), b + "attn2.kv_proj.bias": (2 * H,),
              b + "attn2.out_proj.weight": (H, H), b + "attn2.out_proj.bias": (H,), b + "norm3.weight": (H,),
              b + "norm3.bias": (H,)}
        for a in ("attn1", "attn2"):
            k |= {b + f"{a}.{n}.{w}": (hd,) for n in ("q_norm", "k_norm") for w in ("weight", "bias")}
        if i > depth // 2:
            k |= {b + "skip_norm.weight": (2 * H,), b + "skip_norm.bias": (2 * H,), b + "skip_linear.weight": (H, 2 * H),
                  b + "skip_linear.bias": (H,)}
    return k


@pytest.mark.parametrize("size", [
    dict(depth=40, hidden=1408, heads=16, mlp_ratio=4.3637, diffusers=dict(num_layers=40, hidden_size=1408,
         attention_head_dim=88, mlp_ratio=4.3637)),                       # DiT-g/2: MLP int(1408 * 4.3637) = 6144
    dict(depth=28, hidden=1152, heads=16, mlp_ratio=4.0, diffusers=dict(num_layers=28, hidden_size=1152,
         attention_head_dim=72, mlp_ratio=4.0))])                         # the 28-block 1152-wide DiT-XL/2
@pytest.mark.parametrize("style", [True, False])
def test_official_key_tables_convert_onto_the_diffusers_class(size, style):
    from diffusers import HunyuanDiT2DModel
    table = official_keys(size["depth"], size["hidden"], size["heads"], size["mlp_ratio"], style)
    if size["depth"] == 40:
        assert table["blocks.0.mlp.fc1.weight"] == (6144, 1408) and table["blocks.0.attn1.q_norm.weight"] == (88,)
    official = {k: torch.empty(s, device="meta") for k, s in table.items()}
    converted = {k: tuple(v.shape) for k, v in to_diffusers(official).items()}
    with torch.device("meta"):                                           # the published diffusers configuration
        ref = HunyuanDiT2DModel(num_attention_heads=16, in_channels=4, patch_size=2, sample_size=128,
                                use_style_cond_and_image_meta_size=style, **size["diffusers"])
    assert converted == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    kw = infer_kwargs(to_diffusers(official))
    assert kw["num_layers"] == size["depth"] and kw["num_attention_heads"] == 16
    assert int(size["hidden"] * kw["mlp_ratio"]) == int(size["hidden"] * size["mlp_ratio"])
    with torch.device("meta"):
        model = wrap(HunyuanDiT2DModel(**kw))
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == converted
    d = size["depth"]
    assert model.skip_into == {i: (d - 1 - i, i - d // 2 - 1) for i in range(d // 2 + 1, d)}
    if d == 40:
        assert model.skip_into[21] == (18, 0) and model.skip_into[39] == (0, 18) and len(model.skip_into) == 19
        assert model.skip_sources == frozenset(range(19))


def tencent_state_dict(inner) -> dict:
    """The tiny diffusers model's weights in the official layout, written from the official module names."""
    sd, out = inner.state_dict(), {}
    H = inner.inner_dim
    top = {"pos_embed.proj.": "x_embedder.proj.", "time_extra_emb.timestep_embedder.linear_1.": "t_embedder.mlp.0.",
           "time_extra_emb.timestep_embedder.linear_2.": "t_embedder.mlp.2.", "time_extra_emb.pooler.": "pooler.",
           "time_extra_emb.extra_embedder.linear_1.": "extra_embedder.0.",
           "time_extra_emb.extra_embedder.linear_2.": "extra_embedder.2.",
           "time_extra_emb.style_embedder.": "style_embedder.", "text_embedder.linear_1.": "mlp_t5.0.",
           "text_embedder.linear_2.": "mlp_t5.2.", "proj_out.": "final_layer.linear.", "text_embedding_padding": "text_embedding_padding"}
    for k, v in sd.items():
        for a, b in top.items():
            if k.startswith(a):
                out[b + k[len(a):]] = v
    w = sd["norm_out.linear.weight"], sd["norm_out.linear.bias"]         # diffusers (scale, shift) -> (shift, scale)
    out["final_layer.adaLN_modulation.1.weight"] = torch.cat([w[0][H:], w[0][:H]])
    out["final_layer.adaLN_modulation.1.bias"] = torch.cat([w[1][H:], w[1][:H]])
    blk = {"norm1.norm.": "norm1.", "norm1.linear.": "default_modulation.1.", "norm2.": "norm3.", "norm3.": "norm2.",
           "attn1.norm_q.": "attn1.q_norm.", "attn1.norm_k.": "attn1.k_norm.", "attn1.to_out.0.": "attn1.out_proj.",
           "attn2.to_q.": "attn2.q_proj.", "attn2.norm_q.": "attn2.q_norm.", "attn2.norm_k.": "attn2.k_norm.",
           "attn2.to_out.0.": "attn2.out_proj.", "ff.net.0.proj.": "mlp.fc1.", "ff.net.2.": "mlp.fc2.",
           "skip_norm.": "skip_norm.", "skip_linear.": "skip_linear."}
    for i in range(len(inner.blocks)):
        p = f"blocks.{i}."
        for kind in ("weight", "bias"):
            out[p + f"attn1.Wqkv.{kind}"] = torch.cat([sd[p + f"attn1.to_{n}.{kind}"] for n in "qkv"])
            out[p + f"attn2.kv_proj.{kind}"] = torch.cat([sd[p + f"attn2.to_{n}.{kind}"] for n in "kv"])
        for k, v in sd.items():
            if k.startswith(p):
                rest = k[len(p):]
                for a, b in blk.items():
                    if rest.startswith(a):
                        out[p + b + rest[len(a):]] = v
    assert len(out) == len(sd) - 6 * len(inner.blocks)        # q,k,v -> Wqkv (-4 keys), k,v -> kv_proj (-2)
    return out


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    """The tiny model in both layouts and a caption file (one caption)."""
    root = tmp_path_factory.mktemp("hunyuan")
    tiny.save_pretrained(str(root / "diffusers"), safe_serialization=True)
    torch.save({"module": tencent_state_dict(tiny), "meta": {"input_size": 8}}, root / "tencent.pt")
    torch.save({k: v[0] for k, v in caption_parts(1).items()}, root / "caption.pt")
    return root


def test_both_layouts_load_strictly_and_agree(tiny, saved):
    a, b = load_model(saved / "diffusers"), load_model(saved / "tencent.pt")
    assert type(a).__name__ == type(b).__name__ == "HunyuanAdapter" and a.config == b.config
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([400])
    y = load_caption_embeds(saved / "caption.pt")
    assert y.shape == (1, 12, 17)
    with torch.no_grad():
        ref = class_forward(tiny, x, t, caption_parts(1))
        torch.testing.assert_close(a(x, t, y), ref, rtol=0, atol=0)
        torch.testing.assert_close(b(x, t, y), ref, rtol=0, atol=0)
    raw = tencent_state_dict(tiny)
    raw.pop("blocks.2.mlp.fc1.bias")
    torch.save({"ema": raw, "meta": {"input_size": 8}}, saved / "broken.pt")
    with pytest.raises(ValueError, match=r"does not fit HunyuanDiT2DModel \(1 missing: blocks.2.ff.net.0.proj.bias"):
        load_model(saved / "broken.pt")


def test_caption_file_errors(tmp_path, tiny):
    model = wrap(tiny)
    parts = {k: v[0] for k, v in caption_parts(1).items()}
    torch.save({k: v for k, v in parts.items() if k != "prompt_embeds_2"}, tmp_path / "half.pt")
    with pytest.raises(ValueError, match="lacks prompt_embeds_2"):
        load_caption_embeds(tmp_path / "half.pt")
    torch.save({**parts, "prompt_attention_mask": torch.ones(3)}, tmp_path / "mask.pt")
    with pytest.raises(ValueError, match="prompt_embeds has shape"):
        load_caption_embeds(tmp_path / "mask.pt")
    with pytest.raises(ValueError, match=r"HunYuan-DiT takes a caption file with prompt_embeds.*got shape \(1, 5, 12\)"):
        model(torch.randn(1, 4, 8, 8), torch.tensor([1]), torch.randn(1, 5, 12))
    y = pack_captions(caption_parts(1))
    assert (model.null_condition(y) == 0).all()                         # all masked: the learned padding


# ------------------------------------------------------------------ the hunyuan preset
def official_rule(timesteps, cache_step):
    """HunYuanDiT_cache.forward's decisions, written out from models_cache.py."""
    cont, out = 0, []
    for t in timesteps:
        out.append(cont % cache_step == 0 or t >= 700)
        cont += 1
        if t <= 50:
            cont = 0
    return out


def diffusers_chain(steps=100):
    from diffusers import DDPMScheduler
    s = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.02, steps_offset=1,
                      prediction_type="v_prediction")
    s.set_timesteps(steps)
    return [int(t) for t in s.timesteps]


@pytest.mark.parametrize("cache_step", [2, 3, 4, 5])
def test_preset_reproduces_the_official_rule_on_the_100_step_chain(cache_step):
    cfg = CacheConfig.preset("hunyuan", interval=cache_step)
    assert (cfg.method, cfg.k, cfg.t_start, cfg.t_stop, cfg.stop_inclusive) == ("skip-cache", 1, 700, 50, True)
    assert Diffusion(space_timesteps(1000, "leading100")).chain == diffusers_chain()
    for chain in (diffusers_chain(), Diffusion.respaced(100).chain):    # HunYuan's 991..1 and the even 999..0
        assert cfg.schedule(chain) == Schedule(tuple(official_rule(chain, cache_step)), tuple(chain))
    want = official_rule(diffusers_chain(), cache_step)
    assert want[:30] == [True] * 30 and diffusers_chain()[29:31] == [701, 691]   # t >= 700 is full
    assert sum(want) < 100


def official_cached_forward(inner, x, t, parts, state, cache_step, k):
    """HunYuanDiT_cache's block loop, on the diffusers blocks (state: cache_cont, cache_val)."""
    model = wrap(inner)
    trunk = model.embed(x, t, pack_captions(parts))
    h, skips, depth, cur = trunk.h, [], len(inner.blocks), int(t[0])
    kw = dict(encoder_hidden_states=trunk.batch["context"], temb=trunk.c, image_rotary_emb=trunk.fixed["rope"])
    full = state["cont"] % cache_step == 0 or cur >= 700
    for layer, block in enumerate(inner.blocks):
        if not full and not (layer < k or layer >= depth - k):
            continue
        if layer == depth - k:
            if full:
                state["val"] = h
            else:
                h = state["val"]
        h = block(h, skip=skips.pop(), **kw) if layer > depth // 2 else block(h, **kw)
        if layer < depth // 2 - 1:
            skips.append(h)
    state["cont"] += 1
    if cur <= 50:
        state["cont"], state["val"] = 0, None
    trunk.h = h
    return model.head(trunk), full


@pytest.mark.parametrize("k", [1, 2])
def test_cached_calls_equal_the_official_cached_forward(tiny, k):
    model = wrap(tiny)
    parts = caption_parts(1)
    y = pack_captions(parts)
    chain = [991, 891, 691, 591, 491, 391, 291, 191, 91, 41, 31]
    state, x = {"cont": 0, "val": None}, torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), apply_cache(model, CacheConfig(interval=3, k=k, t_start=700, t_stop=50)) as cs:
        for i, t in enumerate(chain):
            tt = torch.tensor([t])
            with hooks.step_scope(i + 1, t):
                out = model(x, tt, y)
            ref, full = official_cached_forward(tiny, x, tt, parts, state, 3, k)
            torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
            assert cs.calls[-1].full == full
            x = x - 0.01 * out[:, :4]
    assert [c.full for c in cs.calls] == official_rule(chain, 3) and cs.num_cached >= 3


def test_sampling_uses_v_prediction_and_scaled_linear(tiny):
    model = wrap(tiny)
    d = Diffusion.respaced(10)
    assert d.for_model(model).prediction == "v" and d.for_model(model).schedule == "scaled_linear"
    cfg = SamplerConfig(num_steps=10, cfg_scale=6.0)
    y = pack_captions(caption_parts(1))
    a = list(d.sample_steps(model, (1, 4, 8, 8), y, cfg, seed=0))
    b = list(Diffusion(list(d.timestep_map), prediction="v", schedule="scaled_linear").sample_steps(
        model, (1, 4, 8, 8), y, cfg, seed=0))
    torch.testing.assert_close(a[-1].x_next, b[-1].x_next, rtol=0, atol=0)
    c = list(Diffusion(list(d.timestep_map), prediction="epsilon", schedule="scaled_linear").sample_steps(
        model, (1, 4, 8, 8), y, cfg, seed=0))
    assert not torch.allclose(a[-1].x_next, c[-1].x_next)


# ------------------------------------------------------------------ the CLIs (done-when commands)
def test_surface_and_cache_clis_on_both_layouts(saved, tmp_path, capsys):
    import xarray as xr

    from smoothness.cache.cli import main as cache_main
    from smoothness.surface.cli import main as surface_main
    cap = str(saved / "caption.pt")
    results = {}
    for name, path in (("diffusers", saved / "diffusers"), ("tencent", saved / "tencent.pt")):
        out = tmp_path / name
        assert run_cli(surface_main, ["--ckpt", str(path), "--caption-embeds", cap, "--step", "50", "--num-steps", "100",
                                      "--grid=-0.2:0.2:3", "--out", str(out), "--name", "surface"]) == 0
        assert run_cli(cache_main, ["--ckpt", str(path), "--caption-embeds", cap, "--preset", "hunyuan",
                                    "--num-sampling-steps", "20", "--intervals", "2", "--per-class", "1",
                                    "--methods", "skip-cache,fora", "--out", str(out), "--name", "cache"]) == 0
        with xr.open_dataset(out / "surface.nc", engine="h5netcdf") as s, \
                xr.open_dataset(out / "cache.nc", engine="h5netcdf") as c:
            results[name] = (s["surface"].values.copy(), c["psnr"].values.copy(), c["theoretical_speedup"].values.copy())
    for a, b in zip(results["diffusers"], results["tencent"]):
        np.testing.assert_array_equal(a, b)
    with xr.open_dataset(tmp_path / "tencent" / "cache.nc", engine="h5netcdf") as c:
        assert c.attrs["cfg_scale"] == 6.0                              # HunYuan-DiT's own guidance by default
    surface, psnr, speedup = results["diffusers"]
    assert np.nanmin(surface) < 1 and np.isfinite(psnr).any() and np.nanmax(speedup) > 1.2
    capsys.readouterr()
    assert run_cli(surface_main, ["--ckpt", str(saved / "diffusers"), "--step", "50", "--num-steps", "100",
                                  "--out", str(tmp_path / "nocap")]) == 2
    assert "diffusers is a text-to-image model: give one caption's embeddings" in capsys.readouterr().err


def test_dynamics_spectral_and_correlation_on_hunyuan(tiny, saved):
    """The analyses drive the adapter through the protocol: native skips included (spectral's fused
    input path uses fuse + run_blocks)."""
    from smoothness.analysis import correlate, dynamics, spectral
    from smoothness.analysis.correlate import CorrelateConfig
    from smoothness.surface import SurfaceConfig
    model, cap = wrap(tiny), str(saved / "caption.pt")
    sampler = SamplerConfig(num_steps=4, sampler="ddim", cfg_scale=6.0)
    dyn = dynamics.compute({"hy": model}, dynamics.DynamicsConfig(sampler=sampler, caption_embeds=cap))
    assert np.isfinite(dyn.change.values).all() and len(dyn.attrs["caption_sha256"]) == 64
    spec = spectral.compute({"hy": model}, spectral.SpectralConfig(steps=(2,), sampler=sampler, maps=spectral.MAPS,
                                                                   iterations=3, caption_embeds=cap))
    for name in spec.data_vars:
        if name.startswith("sigma_"):
            assert np.isfinite(spec[name].values).any(), name
    surf = SurfaceConfig(steps=(2, 3), sampler=sampler, alpha="-0.2:0.2:3", beta="-0.2:0.2:3", seeds=(0,),
                         caption_embeds=cap)
    ds = correlate.compute({"hy": model}, CorrelateConfig(surface=surf, k=1, window=1, n_resamples=10), log=None)
    assert np.isfinite(ds.caching_error.values).all()


def test_results_record_the_family_and_its_process(saved, tmp_path):
    import json

    import xarray as xr

    from smoothness.surface.cli import main as surface_main
    assert run_cli(surface_main, ["--ckpt", str(saved / "tencent.pt"), "--caption-embeds", str(saved / "caption.pt"),
                                  "--steps", "2", "--num-steps", "3", "--grid=-0.1:0.1:3", "--out", str(tmp_path),
                                  "--name", "surface"]) == 0
    with xr.open_dataset(tmp_path / "surface.nc", engine="h5netcdf") as ds:
        assert json.loads(ds.attrs["model_family"]) == {"tencent": "hunyuan-dit"}
        assert json.loads(ds.attrs["diffusion_process"]) == {"tencent": "scaled_linear betas, v prediction"}


def test_dit_g2_macs_by_hand_on_meta():
    """DiT-g/2 at 1024 px (T = 4096 tokens, H = 1408, MLP 6144, 333 text tokens of 1024): each unit's
    counted MACs equal a hand count; a fused block adds its Linear(2H -> H)."""
    from diffusers import HunyuanDiT2DModel

    from smoothness.cache import flops
    with torch.device("meta"):
        model = wrap(HunyuanDiT2DModel(num_attention_heads=16, attention_head_dim=88, in_channels=4, patch_size=2,
                                       sample_size=128, hidden_size=1408, num_layers=40, mlp_ratio=4.3637))
    T, H, M, L, C = 4096, 1408, 6144, 77 + 256, 1024
    self_attn = 3 * T * H * H + 2 * T * T * H + T * H * H               # qkv, QK^T and AV, out
    cross = T * H * H + 2 * L * C * H + 2 * T * L * H + T * H * H        # q, kv of the text, QK^T and AV, out
    block = self_attn + cross + 2 * T * H * M + H * H                    # + MLP, + the shift modulation Linear
    m = flops.measure(model)
    assert m.units[0] == block == 171_635_785_728
    assert m.units[21] == m.units[39] == block + T * 2 * H * H
    assert m.branches[0] == self_attn + cross + 2 * T * H * M
    speedup = flops.theoretical_speedup(model, CacheConfig.preset("hunyuan", interval=2), diffusers_chain())
    assert speedup == pytest.approx(1.456, abs=1e-3)                    # 67 full, 33 cached of 100


def test_sample_cli_with_a_negative_caption(saved, tmp_path):
    from smoothness.data import sample
    neg = {k: v[0] for k, v in caption_parts(1, seed=9).items()}
    torch.save(neg, tmp_path / "neg.pt")
    argv = ["--ckpt", str(saved / "tencent.pt"), "--caption-embeds", str(saved / "caption.pt"), "--sampler", "ddim",
            "--num-sampling-steps", "3", "--per-class", "1", "--out", str(tmp_path)]
    assert run_cli(sample.main, argv + ["--negative-embeds", str(tmp_path / "neg.pt")]) == 0
    assert torch.load(tmp_path / "samples_tencent_DDIM-3.pt").shape == (1, 4, 8, 8)
    model = wrap(hunyuan())
    y = pack_captions(caption_parts(2))
    assert (model.null_condition(y) == 0).all()                         # default: every token masked
    model.set_negative_embeds(load_caption_embeds(tmp_path / "neg.pt"))
    torch.testing.assert_close(model.null_condition(y), pack_captions(caption_parts(1, seed=9)).expand(2, -1, -1))
