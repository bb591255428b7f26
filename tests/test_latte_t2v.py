"""Latte / LatteT2V-skip text-to-video: the official diffusers key table, strict loading through
config inference, the forward pass against a frame-by-frame, position-by-position re-implementation
written from raw weights, caption files, DDIM-50 + CFG sampling, Skip-Cache on pairs, and errors."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from smoothness import hooks
from smoothness.analysis import cli as correlate_cli
from smoothness.cache import CacheConfig, apply_cache
from smoothness.cli import run_cli
from smoothness.data import sample
from smoothness.diffusion import Diffusion, SamplerConfig
from smoothness.models import (
    CheckpointError,
    LatteT2V,
    LatteT2VConfig,
    build,
    infer_config,
    load_caption_embeds,
    load_model,
)
from smoothness.surface import cli as surface_cli

pytestmark = pytest.mark.usefixtures("single_thread")


def official_t2v_keys() -> dict[str, tuple]:
    """Latte-skip T2V (Latte-0 LatteTransformer3DModel + 14 fusions), from paper-spec 1.5 and the
    Latte-0 config: 28 layers, 1152 = 16 x 72, patch 2, in 4 / out 8, T5 captions 4096 wide."""
    H, L, C = 1152, 28, 4096
    keys = {
        "pos_embed.proj.weight": (H, 4, 2, 2), "pos_embed.proj.bias": (H,),
        "adaln_single.emb.timestep_embedder.linear_1.weight": (H, 256),
        "adaln_single.emb.timestep_embedder.linear_1.bias": (H,),
        "adaln_single.emb.timestep_embedder.linear_2.weight": (H, H),
        "adaln_single.emb.timestep_embedder.linear_2.bias": (H,),
        "adaln_single.linear.weight": (6 * H, H), "adaln_single.linear.bias": (6 * H,),
        "caption_projection.linear_1.weight": (H, C), "caption_projection.linear_1.bias": (H,),
        "caption_projection.linear_2.weight": (H, H), "caption_projection.linear_2.bias": (H,),
        "caption_projection.y_embedding": (120, C),          # PixArt's learned null caption (a buffer)
        "proj_out.weight": (2 * 2 * 8, H), "proj_out.bias": (2 * 2 * 8,),
        "scale_shift_table": (2, H),
    }
    for stack, attns in (("transformer_blocks", ("attn1", "attn2")), ("temporal_transformer_blocks", ("attn1",))):
        for i in range(L):
            b = f"{stack}.{i}"
            for a in attns:
                for lin in ("to_q", "to_k", "to_v", "to_out.0"):
                    keys[f"{b}.{a}.{lin}.weight"] = (H, H)
                    keys[f"{b}.{a}.{lin}.bias"] = (H,)
            keys[f"{b}.ff.net.0.proj.weight"], keys[f"{b}.ff.net.0.proj.bias"] = (4 * H, H), (4 * H,)
            keys[f"{b}.ff.net.2.weight"], keys[f"{b}.ff.net.2.bias"] = (H, 4 * H), (H,)
            keys[f"{b}.scale_shift_table"] = (6, H)
    for k in range(14):
        keys[f"skip_norms.{k}.weight"] = keys[f"skip_norms.{k}.bias"] = (2 * H,)
        keys[f"skip_linears.{k}.linear.weight"], keys[f"skip_linears.{k}.linear.bias"] = (H, 2 * H), (H,)
    return keys


@pytest.fixture(scope="module")
def full_meta():
    return build("LatteT2V-XL/2-skip", device="meta")


def test_full_size_keys_match_official(full_meta):
    have = {k: tuple(v.shape) for k, v in full_meta.state_dict().items()}
    assert have == official_t2v_keys()


def test_pairs_sites_and_inference_of_the_full_size(full_meta):
    m = full_meta
    assert m.num_units == 28 and len(m.blocks) == 56
    assert m.skip_into == {i: (27 - i, i - 14) for i in range(14, 28)}      # pair i receives pair 27 - i
    sites = m.sites()
    assert sites["blocks.6"] == "transformer_blocks.3" and sites["blocks.7"] == "temporal_transformer_blocks.3"
    assert sites["blocks.6.cross"] == "transformer_blocks.3.hook_cross" and "blocks.7.cross" not in sites
    assert [m.block_kind(i) for i in m.unit_blocks(3)] == ["spatial", "temporal"] and m.unit_blocks(3) == [6, 7]
    cfg = infer_config(m.state_dict())
    assert isinstance(cfg, LatteT2VConfig) and cfg == m.config
    assert (cfg.depth, cfg.caption_channels, cfg.num_heads, cfg.skips, cfg.out_channels) == (56, 4096, 16, True, 8)


def _randomize(model, std=0.05, seed=0):
    """Redraw every parameter (the skip branches are zero-initialised, as the official code)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            mean = 1.0 if name.startswith("skip_norms") and name.endswith("weight") else 0.0
            p.copy_(mean + std * torch.randn(p.shape, generator=g))
    return model


def test_reduced_real_width_checkpoint_loads_strictly_and_runs(tmp_path):
    """Real width 1152, 16 heads, 4096-wide captions; 2 pairs (the fewest with a skip), 4x4 latents."""
    torch.manual_seed(0)
    src = LatteT2V(LatteT2VConfig(depth=4, skips=True)).eval()
    for lin in src.skip_linears:                        # zero-initialised, as the official code: wake them
        torch.nn.init.normal_(lin.linear.weight, std=0.02)
    src.half().float()                                  # stored as fp16 (a 190 MB file instead of 380)
    from safetensors.torch import save_file
    save_file({k: v.half().contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "t2v.safetensors"))
    model = load_model(tmp_path / "t2v.safetensors")
    assert isinstance(model, LatteT2V) and model.config == src.config and model.skip_into == {1: (0, 0)}
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 4, 2, 4, 4, generator=g), torch.randn(2, 3, 4096, generator=g)
    with torch.no_grad():
        out = model(x, torch.tensor([10, 900]), y)
        assert out.shape == (2, 8, 2, 4, 4) and torch.equal(out, src(x, torch.tensor([10, 900]), y))


def test_mismatched_checkpoint_names_the_keys(tmp_path):
    sd = build("LatteT2V-Mini/2-skip").state_dict()
    sd["skip_norms.1.weight"] = sd["skip_norms.0.weight"].clone()       # a fusion 2 pairs never have
    del sd["temporal_transformer_blocks.1.ff.net.2.bias"]
    torch.save({"ema": sd}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"missing: temporal_transformer_blocks\.1\.ff\.net\.2\.bias.*"
                                              r"unexpected: skip_norms\.1\.weight"):
        load_model(tmp_path / "bad.pt")
    sd = build("LatteT2V-Mini/2").state_dict()
    sd = {k: v for k, v in sd.items() if not k.startswith("temporal_transformer_blocks.1.")}
    torch.save(sd, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match="2 spatial transformer_blocks but 1 temporal"):
        load_model(tmp_path / "odd.pt")


# ------------------------------------------------------------------ independent forward
def _sincos(dim, pos):
    """1-D sin-cos of positions (M,) -> (M, dim): sin of the first half of the frequencies, then cos."""
    omega = torch.tensor([1.0 / 10000 ** (i / (dim / 2)) for i in range(dim // 2)], dtype=torch.float64)
    ang = pos.double()[:, None] * omega[None]
    return torch.cat([torch.sin(ang), torch.cos(ang)], dim=1).float()


def reference_forward(model: LatteT2V, x, t, y):
    """Latte T2V written out from raw weights: every spatial block runs frame by frame, every
    temporal block token position by position, attention with an explicit softmax."""
    W = dict(model.state_dict())
    cfg = model.config
    H, heads, p = cfg.hidden_size, cfg.num_heads, cfg.patch_size
    lin = lambda v, name: v @ W[f"{name}.weight"].T + W[f"{name}.bias"]
    ln = lambda v: F.layer_norm(v, (v.shape[-1],), eps=1e-6)

    def attn(v, ctx, name):                                              # v (T, H), ctx (L, H)
        q, k, val = lin(v, f"{name}.to_q"), lin(ctx, f"{name}.to_k"), lin(ctx, f"{name}.to_v")
        d = H // heads
        outs = []
        for hd in range(heads):
            s = slice(hd * d, (hd + 1) * d)
            a = torch.softmax(q[:, s] @ k[:, s].T / math.sqrt(d), dim=-1)
            outs.append(a @ val[:, s])
        return lin(torch.cat(outs, dim=1), f"{name}.to_out.0")

    def block(v, mod, name, ctx=None):                                   # mod (6, H)
        m = W[f"{name}.scale_shift_table"] + mod
        v = v + m[2] * attn(ln(v) * (1 + m[1]) + m[0], ln(v) * (1 + m[1]) + m[0], f"{name}.attn1")
        if ctx is not None:
            v = v + attn(v, ctx, f"{name}.attn2")
        u = ln(v) * (1 + m[4]) + m[3]
        return v + m[5] * lin(F.gelu(lin(u, f"{name}.ff.net.0.proj"), approximate="tanh"), f"{name}.ff.net.2")

    n, c, f, hh, ww = x.shape
    gh, gw = hh // p, ww // p
    base = cfg.input_size // p
    rows = torch.arange(gh).repeat_interleave(gw).float() * (base / gh)  # token r*gw + c sits at row r
    cols = torch.arange(gw).repeat(gh).float() * (base / gw)
    table = torch.cat([_sincos(H // 2, cols), _sincos(H // 2, rows)], dim=1)   # (T, H)
    half = torch.arange(128, dtype=torch.float32)
    ang = t.float()[:, None] * torch.exp(-math.log(10000) * half / 128)[None]
    emb = lin(F.silu(lin(torch.cat([torch.cos(ang), torch.sin(ang)], 1), "adaln_single.emb.timestep_embedder.linear_1")),
              "adaln_single.emb.timestep_embedder.linear_2")             # (N, H)
    mod = lin(F.silu(emb), "adaln_single.linear").reshape(n, 6, H)
    ctx = lin(F.gelu(lin(y, "caption_projection.linear_1"), approximate="tanh"), "caption_projection.linear_2")
    h = torch.stack([torch.stack([
        F.conv2d(x[b, :, j][None], W["pos_embed.proj.weight"], W["pos_embed.proj.bias"], stride=p)[0]
        .flatten(1).T + table for j in range(f)]) for b in range(n)])   # (N, F, T, H)
    pairs, stack = cfg.depth // 2, []
    for i in range(pairs):
        if cfg.skips and i >= pairs // 2:
            k = i - pairs // 2
            cat = torch.cat([h, stack.pop()], dim=-1)
            h = lin(F.layer_norm(cat, (2 * H,), W[f"skip_norms.{k}.weight"], W[f"skip_norms.{k}.bias"], 1e-6),
                    f"skip_linears.{k}.linear")
        h = torch.stack([torch.stack([block(h[b, j], mod[b], f"transformer_blocks.{i}", ctx[b]) for j in range(f)])
                         for b in range(n)])
        if i == 0 and f > 1:
            h = h + _sincos(H, torch.arange(f).float())[None, :, None]
        h = torch.stack([torch.stack([block(h[b, :, s], mod[b], f"temporal_transformer_blocks.{i}")
                                      for s in range(h.shape[2])], dim=1) for b in range(n)])
        if cfg.skips and i < pairs // 2:
            stack.append(h)
    shift, scale = W["scale_shift_table"][0] + emb, W["scale_shift_table"][1] + emb       # (N, H)
    out = torch.zeros(n, cfg.out_channels, f, hh, ww)
    for b in range(n):
        for j in range(f):
            o = lin(ln(h[b, j]) * (1 + scale[b]) + shift[b], "proj_out")  # (T, p*p*C)
            for tok in range(gh * gw):
                r, col = divmod(tok, gw)
                out[b, :, j, r * p:(r + 1) * p, col * p:(col + 1) * p] = o[tok].reshape(p, p, -1).permute(2, 0, 1)
    return out


@pytest.mark.parametrize("skips,frames,size", [(True, 3, (8, 4)), (False, 1, (8, 8))])
def test_forward_equals_frame_by_frame_reference(skips, frames, size):
    torch.manual_seed(0)
    model = _randomize(build("LatteT2V-Mini/2" + "-skip" * skips, depth=8, hidden_size=32, caption_channels=12).eval())
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, frames, *size, generator=g)                    # (8, 4): a non-square, rescaled grid
    y = torch.randn(2, 5, 12, generator=g)
    t = torch.tensor([1, 700])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), reference_forward(model, x, t, y), rtol=1e-4, atol=1e-5)


def test_block_sites_see_their_own_layout():
    model = build("LatteT2V-Mini/2").eval()
    x, y = torch.randn(2, 4, 3, 8, 8), torch.randn(2, 5, 32)
    with hooks.record(model, ["blocks.0", "blocks.1", "blocks.0.cross", "output"]) as rec, torch.no_grad():
        model(x, torch.tensor([5, 5]), y)
    assert rec["blocks.0"][0].shape == (2 * 3, 16, 64)      # spatial: (N*F, T, H)
    assert rec["blocks.1"][0].shape == (2 * 16, 3, 64)      # temporal: (N*T, F, H)
    assert rec["blocks.0.cross"][0].shape == (2 * 3, 16, 64)
    assert rec["output"][0].shape == (2, 8, 3, 8, 8)
    assert hooks.leftover_hooks(model) == []


def test_unit_api_and_tiled_trunks_reproduce_the_forward(tiny4):
    g = torch.Generator().manual_seed(4)
    x, y, t = torch.randn(2, 4, 2, 4, 4, generator=g), torch.randn(2, 4, 12, generator=g), torch.tensor([7, 7])
    with torch.no_grad():
        ref = tiny4(x, t, y)
        trunk = tiny4.embed(x, t, y).repeat(3)                           # group-major copies, as the surface engine
        for u in range(tiny4.num_units):
            tiny4.run_unit(u, trunk)
        torch.testing.assert_close(tiny4.head(trunk), ref.repeat(3, 1, 1, 1, 1), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ conditioning and errors
def test_errors_name_the_bad_value():
    model = build("LatteT2V-Mini/2").eval()
    x, t = torch.randn(1, 4, 2, 8, 8), torch.tensor([3])
    with pytest.raises(ValueError, match=r"width 16.*caption_channels=32"):
        model(x, t, torch.randn(1, 5, 16))
    with pytest.raises(ValueError, match="5 frames.*1..4"):
        model(torch.randn(1, 4, 5, 8, 8), t, torch.randn(1, 5, 32))
    with pytest.raises(ValueError, match="not class labels"):
        model(x, t, torch.tensor([1]))
    with pytest.raises(ValueError, match="text-conditioned"):
        model(x, t)
    with pytest.raises(ValueError, match="num_classes=3 is not allowed"):
        LatteT2VConfig(num_classes=3)
    with pytest.raises(ValueError, match="width 7"):
        model.set_negative_embeds(torch.zeros(5, 7))
    model.set_negative_embeds(torch.zeros(6, 32))
    with pytest.raises(ValueError, match="6 tokens but the captions have 5"):
        model.null_condition(torch.zeros(2, 5, 32))


def test_null_condition_is_zeros_or_the_negative_embedding():
    model = build("LatteT2V-Mini/2").eval()
    y = torch.randn(3, 5, 32)
    assert torch.equal(model.null_condition(y), torch.zeros_like(y))
    neg = torch.randn(5, 32)
    model.set_negative_embeds(neg)
    assert torch.equal(model.null_condition(y), neg.expand(3, 5, 32))


def test_caption_files(tmp_path):
    from safetensors.torch import save_file
    e = torch.randn(5, 32)
    torch.save(e, tmp_path / "one.pt")
    assert torch.equal(load_caption_embeds(tmp_path / "one.pt"), e[None])
    save_file({"prompt_embeds": torch.randn(2, 5, 32).half()}, str(tmp_path / "two.safetensors"))
    assert load_caption_embeds(tmp_path / "two.safetensors").shape == (2, 5, 32)
    torch.save({"a": e, "b": e}, tmp_path / "many.pt")
    with pytest.raises(ValueError, match="holds 2 tensors"):
        load_caption_embeds(tmp_path / "many.pt")
    torch.save(torch.arange(4), tmp_path / "ids.pt")
    with pytest.raises(ValueError, match=r"float tensor \(L, C\) or \(N, L, C\)"):
        load_caption_embeds(tmp_path / "ids.pt")


# ------------------------------------------------------------------ sampling and caching
@pytest.fixture(scope="module")
def tiny4():
    """4 pairs (2 fusions), hidden 32, random skip branches, so caching changes the result."""
    torch.manual_seed(0)
    return _randomize(build("LatteT2V-Mini/2-skip", depth=8, hidden_size=32, caption_channels=12, num_frames=3),
                      std=0.1).eval()


DDIM50 = SamplerConfig(num_steps=50, sampler="ddim", cfg_scale=4.0, spacing="leading")   # the T2V pipeline's chain


def test_ddim50_sampling_is_guided_by_the_null_condition(tiny4):
    y = torch.randn(1, 4, 12, generator=torch.Generator().manual_seed(0))
    diffusion = Diffusion.for_config(DDIM50)
    assert diffusion.chain[:2] == [980, 960] and diffusion.chain[-1] == 0
    with torch.no_grad():
        a = diffusion.sample(tiny4, (1, 4, 2, 4, 4), y, DDIM50, seed=3)
        plain = diffusion.sample(tiny4, (1, 4, 2, 4, 4), y, SamplerConfig(num_steps=50, sampler="ddim"), seed=3)
    assert a.shape == (1, 4, 2, 4, 4) and torch.isfinite(a).all() and not torch.allclose(a, plain)


def test_skip_cache_on_pairs_with_the_t2v_preset(tiny4):
    y = torch.randn(1, 4, 12, generator=torch.Generator().manual_seed(1))
    diffusion = Diffusion.for_config(DDIM50)
    shape = (1, 4, 2, 4, 4)
    with torch.no_grad():
        ref = diffusion.sample(tiny4, shape, y, DDIM50, seed=0)
        with apply_cache(tiny4, CacheConfig.preset("latte-t2v", interval=1)) as state:
            same = diffusion.sample(tiny4, shape, y, DDIM50, seed=0)
        assert torch.equal(same, ref) and state.num_cached == 0
        with apply_cache(tiny4, CacheConfig.preset("N2-700-50")) as state:
            cached = diffusion.sample(tiny4, shape, y, DDIM50, seed=0)
    # Full while t >= 700 (15 steps), then every other step, the t = 40 call cached, the last two full.
    assert state.schedule.mask == "F" * 15 + "cF" * 16 + "cFF" and state.num_cached == 17
    assert not torch.equal(cached, ref) and torch.isfinite(cached).all()
    assert hooks.leftover_hooks(tiny4) == []


def test_fora_reuses_self_attention_cross_attention_and_feed_forward(tiny4, monkeypatch):
    """FORA on text-to-video blocks: a cached call runs no attention or feed-forward at all, and on
    the full call's own input it reproduces that call bit for bit; interval 1 is plain sampling."""
    from smoothness.cache import Schedule
    from smoothness.models import latte_t2v
    calls = []
    for cls in (latte_t2v.Attention, latte_t2v.FeedForward):
        real = cls.forward
        monkeypatch.setattr(cls, "forward", lambda self, *a, _real=real, **k: calls.append(self) or _real(self, *a, **k))
    y = torch.randn(1, 4, 12, generator=torch.Generator().manual_seed(1))
    x = torch.randn(1, 4, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([500])
    diffusion, sampler = Diffusion.for_config(DDIM50), SamplerConfig(num_steps=50, sampler="ddim")
    with torch.no_grad():
        plain = diffusion.model_output(tiny4, x, t, y, sampler)
        per_call = len(calls)                      # 4 spatial blocks: attn1, attn2, ff; 4 temporal: attn1, ff
        assert per_call == 4 * 3 + 4 * 2
        with apply_cache(tiny4, CacheConfig(method="fora", mask=Schedule.from_mask("Fcc"))) as state:
            full = diffusion.model_output(tiny4, x, t, y, sampler)
            again = diffusion.model_output(tiny4, x, t, y, sampler)
            moved = diffusion.model_output(tiny4, x + 0.5, torch.tensor([300]), y, sampler)
        assert [c.full for c in state.calls] == [True, False, False] and len(calls) == 2 * per_call
        assert torch.equal(full, plain) and torch.equal(again, plain)
        assert not torch.equal(moved, diffusion.model_output(tiny4, x + 0.5, torch.tensor([300]), y, sampler))
        shape = (1, 4, 2, 4, 4)
        ref = diffusion.sample(tiny4, shape, y, DDIM50, seed=0)
        with apply_cache(tiny4, CacheConfig(method="fora", interval=1)):
            assert torch.equal(diffusion.sample(tiny4, shape, y, DDIM50, seed=0), ref)
    assert hooks.leftover_hooks(tiny4) == []


def test_sample_cli_text_to_video(tmp_path):
    torch.manual_seed(0)
    sd = build("LatteT2V-Mini/2-skip", num_frames=2).state_dict()
    torch.save({"ema": sd, "meta": {"input_size": 8, "num_frames": 2}}, tmp_path / "t2v.pt")
    torch.save(torch.randn(2, 3, 32), tmp_path / "caps.pt")
    torch.save(torch.randn(3, 32), tmp_path / "neg.pt")
    argv = ["--ckpt", str(tmp_path / "t2v.pt"), "--caption-embeds", str(tmp_path / "caps.pt"), "--negative-embeds",
            str(tmp_path / "neg.pt"), "--sampler", "ddim", "--num-sampling-steps", "3", "--per-class", "1",
            "--out", str(tmp_path)]
    assert run_cli(sample.main, argv) == 0
    # Latent size and frames are not in the state dict: the checkpoint's meta gives them (else 64 and 16).
    assert torch.load(tmp_path / "samples_t2v_DDIM-3.pt").shape == (2, 4, 2, 8, 8)
    assert (tmp_path / "samples_t2v_DDIM-3.png").stat().st_size > 1000
    torch.save(torch.randn(3, 7), tmp_path / "wide.pt")
    assert run_cli(sample.main, argv[:3] + [str(tmp_path / "wide.pt")] + argv[6:]) == 2
    learned = argv[:5] + ["learned"] + argv[6:] + ["--cfg-scale", "2", "--overwrite"]   # another configuration
    assert run_cli(sample.main, learned) == 2                      # Mini's y_embedding has 4 tokens, captions 3
    torch.save(torch.randn(2, 4, 32), tmp_path / "caps.pt")
    assert run_cli(sample.main, learned) == 0


def test_cache_sweep_cli_text_to_video(tmp_path, capsys):
    """Skip-Cache and FORA swept on a text-to-video checkpoint: captions condition the chains, MACs
    count the caption length, and the caption file is recorded."""
    import xarray as xr

    from smoothness.cache import flops
    from smoothness.cache.cli import main as sweep_main
    torch.manual_seed(0)
    model = _randomize(build("LatteT2V-Mini/2-skip", depth=8, num_frames=2), std=0.1)   # hidden 64, captions of width 32
    torch.save({"ema": model.state_dict(), "meta": {"input_size": 8, "num_frames": 2}}, tmp_path / "t2v.pt")
    torch.save(torch.randn(2, 5, 32), tmp_path / "caps.pt")
    argv = ["--ckpt", str(tmp_path / "t2v.pt"), "--num-sampling-steps", "4", "--sampler", "ddim", "--intervals", "2",
            "--k", "1", "--per-class", "1", "--methods", "skip-cache,fora", "--out", str(tmp_path), "--name", "s"]
    assert run_cli(sweep_main, argv + ["--caption-embeds", str(tmp_path / "caps.pt")]) == 0
    ds = xr.open_dataset(tmp_path / "s.nc", engine="h5netcdf")
    assert ds.attrs["captions"] == 2 and ds.attrs["caption_tokens"] == 5 and ds.attrs["cfg_scale"] == 7.5
    assert len(ds.attrs["caption_sha256"]) == 64 and "classes" not in ds.attrs
    assert (ds.attrs["spacing"], ds.attrs["steps_offset"], ds.attrs["cfg_channels"]) == ("leading", 0, -1)   # the T2V pipeline's
    cached = ds.sel({"method": "skip-cache"}).squeeze()
    assert int(cached.full_steps) == 2 and np.isfinite(float(cached.psnr))
    from smoothness.cache import CacheConfig
    from smoothness.diffusion import Diffusion
    want = flops.theoretical_speedup(model, CacheConfig(method="skip-cache", interval=2, k=1),
                                     Diffusion.respaced(4, "leading").chain, caption_tokens=5)
    assert float(cached.theoretical_speedup) == pytest.approx(want) and want > 1.2
    ds.close()
    capsys.readouterr()
    assert run_cli(sweep_main, argv) == 2                                       # no captions
    assert "text-to-video model: pass --caption-embeds" in capsys.readouterr().err
    assert run_cli(sweep_main, argv + ["--caption-embeds", str(tmp_path / "caps.pt"), "--classes", "1"]) == 2
    assert run_cli(sweep_main, ["--model", "digits-dit", "--caption-embeds", str(tmp_path / "caps.pt"),
                                "--out", str(tmp_path)]) == 2


def test_dynamics_spectral_and_correlation_take_a_caption(tiny4, tmp_path):
    """The analysis tools condition every chain on one caption file, record it, and refuse a
    text-to-video model without one."""
    from smoothness.analysis import correlate, dynamics, spectral
    from smoothness.analysis.correlate import CorrelateConfig
    from smoothness.surface import SurfaceConfig
    g = torch.Generator().manual_seed(5)
    torch.save(torch.randn(4, 12, generator=g), tmp_path / "a.pt")
    torch.save(torch.randn(4, 12, generator=g), tmp_path / "b.pt")
    a, b = str(tmp_path / "a.pt"), str(tmp_path / "b.pt")
    sampler = SamplerConfig(num_steps=4, sampler="ddim", cfg_scale=3.0)
    dyn = lambda cap: dynamics.compute({"t2v": tiny4}, dynamics.DynamicsConfig(sampler=sampler, caption_embeds=cap))
    with_a = dyn(a)
    assert np.isfinite(with_a.change.values).all() and len(with_a.attrs["caption_sha256"]) == 64
    assert not np.allclose(with_a.change.values, dyn(b).change.values)      # the caption conditions the chain
    with pytest.raises(ValueError, match="text-to-video model"):
        dyn("")
    spec = spectral.compute({"t2v": tiny4}, spectral.SpectralConfig(steps=(2,), sampler=sampler, maps=("unit",),
                                                                    iterations=4, caption_embeds=a))
    assert np.isfinite(spec.sigma_unit.values).all() and spec.attrs["caption_embeds"] == a
    surf = SurfaceConfig(steps=(2, 3), sampler=sampler, alpha="-0.2:0.2:3", beta="-0.2:0.2:3", seeds=(0, 1),
                         caption_embeds=a)
    ds = correlate.compute({"t2v": tiny4}, CorrelateConfig(surface=surf, k=1, window=1, n_resamples=10), log=None)
    assert np.isfinite(ds.caching_error.values).all() and ds.attrs["caption_sha256"] == with_a.attrs["caption_sha256"]
    assert run_cli(correlate_cli.main, ["--model", "digits-dit", "--caption-embeds", a, "--out", str(tmp_path)]) == 2


def test_block_patterns_select_through_the_block_paths(tiny4):
    from smoothness.surface.perturb import DirectionSpec, select_parameters
    names = [n for n, p in tiny4.named_parameters() if p.requires_grad and p.dim() > 1]
    stacks = ("transformer_blocks.", "temporal_transformer_blocks.")
    assert select_parameters(tiny4, DirectionSpec()) == [n for n in names if n.startswith(stacks)]
    # blocks.{i} is the i-th block in execution order: odd ones are temporal
    assert select_parameters(tiny4, DirectionSpec(params="blocks.3")) == [
        n for n in names if n.startswith("temporal_transformer_blocks.1.")]
    assert set(select_parameters(tiny4, DirectionSpec(params="blocks.0-1"))) == {
        n for n in names if n.startswith(("transformer_blocks.0.", "temporal_transformer_blocks.0."))}
    # the module paths themselves still work
    assert select_parameters(tiny4, DirectionSpec(params="temporal_transformer_blocks.*")) == [
        n for n in names if n.startswith("temporal_transformer_blocks.")]
    with pytest.raises(ValueError, match="'blocks.9' matches nothing"):
        select_parameters(tiny4, DirectionSpec(params="blocks.9"))


# ------------------------------------------------------- caption-conditioned surfaces
def test_engine_equals_naive_loop_with_captions(tiny4):
    from smoothness.surface.engine import GridEngine, Perturbation, naive_forward
    from smoothness.surface.perturb import DirectionSpec
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(1, 4, 3, 4, 4, generator=g), torch.randn(1, 5, 12, generator=g)
    t = torch.tensor([400])
    spec = DirectionSpec(seed=1)
    coef = (torch.tensor([0.0, 0.3, -0.2]), torch.tensor([0.0, 0.1, 0.25]))
    with torch.no_grad():
        out = GridEngine(tiny4, Perturbation("weights", spec)).forward(x, t, y, coef)
        for i in range(3):
            ref = naive_forward(tiny4, spec, float(coef[0][i]), float(coef[1][i]), x, t, y)
            torch.testing.assert_close(out[i], ref, rtol=1e-4, atol=1e-5)
    assert hooks.leftover_hooks(tiny4) == []


def test_surface_on_a_caption(tiny4, tmp_path):
    from smoothness.surface import ModelEntry, SurfaceConfig, compute
    torch.save(torch.randn(5, 12, generator=torch.Generator().manual_seed(3)), tmp_path / "cap.pt")
    torch.save(torch.randn(5, 12, generator=torch.Generator().manual_seed(4)), tmp_path / "other.pt")
    base = SurfaceConfig(steps=(2, 3), sampler=SamplerConfig(num_steps=3, sampler="ddim", cfg_scale=4.0),
                         alpha="-0.3:0.3:3", beta="-0.3:0.3:3", readouts=("output", "blocks.2.cross"),
                         caption_embeds=str(tmp_path / "cap.pt"))
    entry = ModelEntry("t2v", tiny4)
    ds = compute([entry], base, progress=False, log=lambda *_: None)
    s = ds["surface"]
    assert (s.sel(alpha=0, beta=0) == 1).all() and bool(s.notnull().all())
    assert float(s.min()) < 0.9999
    other = compute([entry], SurfaceConfig(**{**base.__dict__, "caption_embeds": str(tmp_path / "other.pt")}),
                    progress=False, log=lambda *_: None)
    assert not np.allclose(other["surface"].values, s.values)
    from smoothness.models import sha256
    assert ds.attrs["caption_sha256"] == sha256(tmp_path / "cap.pt")
    with pytest.raises(ValueError, match="text-to-video model: give one caption"):
        compute([entry], SurfaceConfig(**{**base.__dict__, "caption_embeds": ""}), progress=False)
    torch.save(torch.randn(2, 5, 12), tmp_path / "two.pt")
    with pytest.raises(ValueError, match=r"hold 2 captions"):
        compute([entry], SurfaceConfig(**{**base.__dict__, "caption_embeds": str(tmp_path / "two.pt")}),
                progress=False)


def test_surface_cli_with_caption_embeds(tmp_path):
    torch.manual_seed(0)
    sd = build("LatteT2V-Mini/2-skip", num_frames=2).state_dict()
    torch.save({"ema": sd, "meta": {"input_size": 8, "num_frames": 2}}, tmp_path / "t2v.pt")
    torch.save(torch.randn(3, 32), tmp_path / "cap.pt")
    argv = ["--ckpt", str(tmp_path / "t2v.pt"), "--num-steps", "3", "--sampler", "ddim", "--steps", "3",
            "--grid=-0.2:0.2:3", "--out", str(tmp_path / "out")]
    assert run_cli(surface_cli.main, argv + ["--caption-embeds", str(tmp_path / "cap.pt")]) == 0
    import xarray as xr
    with xr.open_dataset(tmp_path / "out" / "surface_t2v_step3.nc", engine="h5netcdf") as ds:
        assert ds.attrs["spacing"] == "leading" and ds.timestep.values.tolist() == [0]   # DDIM-3 leading: 666, 333, 0
    assert run_cli(surface_cli.main, argv + ["--out", str(tmp_path / "none")]) == 2          # no caption
    assert not list((tmp_path / "none").glob("*.nc"))
    assert run_cli(surface_cli.main, ["--model", "digits-dit", "--caption-embeds", str(tmp_path / "cap.pt"),
                                  "--out", str(tmp_path / "img")]) == 2


# ------------------------------------------------------------- the learned null caption (y_embedding)
def test_plain_layout_keys_are_the_official_ones_without_skips():
    want = {k: v for k, v in official_t2v_keys().items() if not k.startswith(("skip_norms", "skip_linears"))}
    have = {k: tuple(v.shape) for k, v in build("LatteT2V-XL/2", device="meta").state_dict().items()}
    assert have == want and "caption_projection.y_embedding" in have


@pytest.mark.parametrize("skips", [False, True])
def test_y_embedding_loads_strictly_and_is_the_learned_negative(tmp_path, skips):
    src = build("LatteT2V-Mini/2" + ("-skip" if skips else ""), caption_tokens=5).eval()
    sd = src.state_dict()
    assert sd["caption_projection.y_embedding"].shape == (5, 32)
    torch.save({"ema": sd}, tmp_path / "t2v.pt")
    model = load_model(tmp_path / "t2v.pt")
    assert model.config.caption_tokens == 5 and model.config.skips == skips
    assert torch.equal(model.caption_projection.y_embedding, sd["caption_projection.y_embedding"])
    y = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    model.set_negative_embeds("learned")
    null = model.null_condition(y)
    assert torch.equal(null, sd["caption_projection.y_embedding"].expand(2, 5, 32))
    # CFG's unconditional half is the model on y_embedding: one guided call against two plain ones.
    x, t = torch.randn(2, 4, 2, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([500, 500])
    with torch.no_grad():
        got = Diffusion.respaced(2).model_output(model, x, t, y, SamplerConfig(num_steps=2, cfg_scale=3.0))
        cond, uncond = model(x, t, y), model(x, t, null)
    want = torch.cat([uncond[:, :4] + 3.0 * (cond[:, :4] - uncond[:, :4]), cond[:, 4:]], dim=1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="negative embeddings have 5 tokens but the captions have 3"):
        model.null_condition(y[:, :3])


def test_checkpoint_without_y_embedding_loads_and_refuses_learned(tmp_path):
    sd = build("LatteT2V-Mini/2").state_dict()
    del sd["caption_projection.y_embedding"]
    torch.save(sd, tmp_path / "old.pt")
    model = load_model(tmp_path / "old.pt")
    assert model.config.caption_tokens == 0 and not hasattr(model.caption_projection, "y_embedding")
    with pytest.raises(ValueError, match="'learned' needs a checkpoint with caption_projection.y_embedding"):
        model.set_negative_embeds("learned")


def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path):
    sd = build("LatteT2V-Mini/2").state_dict()
    sd["transformer_blocks.1.attn2.to_v.weight"][0, 3] = float("nan")
    sd["proj_out.bias"][0] = float("inf")
    torch.save(sd, tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match=r"tensor 'transformer_blocks\.1\.attn2\.to_v\.weight' holds 1 NaN/Inf"):
        load_model(tmp_path / "nan.pt")
