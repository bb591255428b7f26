"""Analytic MAC counts against a hand count and torch's FlopCounterMode (FLOPs = 2 x MACs)."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from smoothness.cache import CacheConfig, apply_cache, flops
from smoothness.diffusion import space_timesteps
from smoothness.models import build

pytestmark = pytest.mark.usefixtures("single_thread")   # conftest: one thread for tiny models


def mini(depth=4, skips=True):
    return build("DiT-Mini/2" + ("-skip" if skips else ""), input_size=8, in_channels=1, num_classes=10,
                 depth=depth).eval()


def test_hand_count_dit_mini():
    # DiT-Mini/2 on 8x8x1: T = 16 tokens, H = 64, MLP 256, p = 2, C_out = 2 (learned sigma)
    c = flops.components(flops.Shape.of(mini()))
    assert c == {
        "x_embedder": 16 * 64 * 4,                  # 4 096
        "t_embedder": 256 * 64 + 64 * 64,           # 20 480
        "y_embedder": 0,
        "block.adaLN": 64 * 384,                    # 24 576
        "block.attn.qkv": 16 * 64 * 192,            # 196 608
        "block.attn.scores": 16 * 16 * 64,          # 16 384
        "block.attn.values": 16 * 16 * 64,          # 16 384
        "block.attn.proj": 16 * 64 * 64,            # 65 536
        "block.mlp": 2 * 16 * 64 * 256,             # 524 288
        "fusion": 16 * 128 * 64,                    # 131 072
        "final.adaLN": 64 * 128,                    # 8 192
        "final.linear": 16 * 64 * 8,                # 8 192
    }
    shape = flops.Shape.of(mini())
    assert flops.block_macs(shape) == 843_776
    assert flops.call_macs(shape) == 4096 + 20480 + 4 * 843_776 + 2 * 131_072 + 8192 + 8192   # 3 678 208
    assert flops.call_macs(shape, "skip-cache", k=1, full=False) == 4096 + 20480 + 2 * 843_776 + 131_072 + 16384


def test_dit_xl_matches_the_dit_paper():
    shape = flops.Shape.of(build("DiT-XL/2", device="meta"))
    assert flops.call_macs(shape) / 1e9 == pytest.approx(118.6, abs=0.05)       # DiT paper: 118.6 Gflops (MACs)
    skip = flops.Shape.of(build("DiT-XL/2-skip", device="meta"))
    assert flops.components(skip)["fusion"] == 2 * 256 * 1152 ** 2
    assert flops.call_macs(skip) / flops.call_macs(shape) == pytest.approx(1.080, abs=0.001)   # spec: +8.0 %


def _sdpa_counted() -> bool:
    q = torch.randn(1, 1, 4, 8)
    with FlopCounterMode(display=False) as fc:
        F.scaled_dot_product_attention(q, q, q)
    return fc.get_total_flops() > 0


def test_attention_matmuls_by_hand_match():
    shape = flops.Shape.of(mini())
    c = flops.components(shape)
    q = torch.randn(2, 2, 16, 32)                     # (N, heads, T, H / heads), H = 64
    with FlopCounterMode(display=False) as fc:
        w = (q @ q.transpose(-1, -2)).softmax(-1)
        w @ q
    assert fc.get_total_flops() == 2 * 2 * (c["block.attn.scores"] + c["block.attn.values"])


def test_full_forward_matches_flop_counter():
    model = mini(depth=4)
    shape, c = flops.Shape.of(model), flops.components(flops.Shape.of(model))
    n = 3
    x, t, y = torch.randn(n, 1, 8, 8), torch.full((n,), 10), torch.tensor([1, 2, 10])
    with torch.no_grad(), FlopCounterMode(display=False, depth=None) as fc:
        model(x, t, y)
    counts = {k: sum(v.values()) for k, v in fc.get_flop_counts().items()}
    attn_mm = 0 if _sdpa_counted() else shape.depth * (c["block.attn.scores"] + c["block.attn.values"])
    assert counts["Global"] == 2 * n * (flops.call_macs(shape) - attn_mm)
    assert counts["DiT.blocks.0.mlp"] == 2 * n * c["block.mlp"]
    assert counts["DiT.blocks.1.adaLN_modulation"] == 2 * n * c["block.adaLN"]
    assert counts["DiT.skip_linears.0"] == 2 * n * c["fusion"]
    assert counts["DiT.x_embedder"] == 2 * n * c["x_embedder"]
    assert counts["DiT.t_embedder"] == 2 * n * c["t_embedder"]
    assert counts["DiT.final_layer"] == 2 * n * (c["final.adaLN"] + c["final.linear"])
    qkv_proj = c["block.attn.qkv"] + c["block.attn.proj"]
    assert counts["DiT.blocks.2.attn"] == 2 * n * (qkv_proj + (0 if attn_mm else c["block.attn.scores"] * 2))


@pytest.mark.parametrize("method,blocks_with_attention", [
    ("skip-cache", 4), ("deep-reuse", 2), ("delta", 4), ("fora", 0), ("none", 8)])
def test_cached_call_matches_flop_counter(method, blocks_with_attention):
    model = mini(depth=8)
    shape, c = flops.Shape.of(model), flops.components(flops.Shape.of(model))
    n, k = 2, 2
    x, t, y = torch.randn(n, 1, 8, 8), torch.full((n,), 500), torch.tensor([1, 10])
    with torch.no_grad(), apply_cache(model, CacheConfig(method=method, interval=2, k=k)) as state:
        model(x, t, y)
        with FlopCounterMode(display=False) as fc:
            model(x, t, y)
    full = state.calls[-1].full
    assert full == (method == "none")
    attn_mm = 0 if _sdpa_counted() else blocks_with_attention * (c["block.attn.scores"] + c["block.attn.values"])
    assert fc.get_total_flops() == 2 * n * (flops.call_macs(shape, method, k, full) - attn_mm)


def test_schedule_cost_and_speedup():
    model = build("DiT-XL/2-skip", device="meta")
    chain = space_timesteps(1000, "250")[::-1]
    shape = flops.Shape.of(model)
    full, cached = flops.call_macs(shape), flops.call_macs(shape, "skip-cache", 4, full=False)
    assert cached / full == pytest.approx(8 / 28, abs=0.02)          # spec: cached/full = 0.286
    cfg = CacheConfig.preset("dit-c2i", interval=2)
    ds = flops.schedule_cost(model, cfg, chain, batch=2)
    sched = cfg.schedule(chain)
    assert ds.attrs["full_steps"] == sched.num_full and ds.macs.dims == ("step",)
    assert ds.attrs["total_macs"] == 2 * (sched.num_full * full + sched.num_cached * cached)
    assert ds.attrs["theoretical_speedup"] == pytest.approx(250 * full / (sched.num_full * full
                                                                          + sched.num_cached * cached))
    speedups = [flops.theoretical_speedup(model, CacheConfig.preset("dit-c2i", n), chain) for n in range(2, 7)]
    assert speedups == sorted(speedups) and 1.5 < speedups[0] < 1.6
    assert flops.table(model).dims == ("component",)


# --------------------------------------------------------------------------- Latte (video)
def latte(depth=8):
    return build("Latte-Mini/2-skip", input_size=8, in_channels=1, num_frames=3, num_classes=0, depth=depth).eval()


def test_hand_count_latte_pair():
    # Latte-Mini/2 on 3 frames of 8x8x1: T = 16 tokens per frame, F = 3, H = 64, MLP 256, 4 pairs, 2 fusions
    shape = flops.Shape.of(latte())
    assert (shape.units, shape.fusions, shape.frames) == (4, 2, 3)
    c = flops.components(shape)
    assert c["x_embedder"] == 3 * 16 * 64 * 4
    assert c["spatial.adaLN"] == 3 * 64 * 384 and c["temporal.adaLN"] == 16 * 64 * 384
    assert c["spatial.attn.qkv"] == c["temporal.attn.qkv"] == 48 * 64 * 192
    assert c["spatial.attn.scores"] == 3 * 16 * 16 * 64          # 3 frames, 16 x 16 within each
    assert c["temporal.attn.scores"] == 16 * 3 * 3 * 64          # 16 positions, 3 x 3 across frames
    assert c["spatial.mlp"] == c["temporal.mlp"] == 2 * 48 * 64 * 256
    assert c["fusion"] == 48 * 128 * 64 and c["final.adaLN"] == 3 * 64 * 128
    assert flops.call_macs(shape, "skip-cache", k=1, full=False) == (
        c["x_embedder"] + c["t_embedder"] + c["final.adaLN"] + c["final.linear"]
        + 2 * flops.block_macs(shape) + c["fusion"])


def _attention_macs(c, spatial_blocks, temporal_blocks):
    if _sdpa_counted():
        return 0
    return (spatial_blocks * (c["spatial.attn.scores"] + c["spatial.attn.values"])
            + temporal_blocks * (c["temporal.attn.scores"] + c["temporal.attn.values"]))


@pytest.mark.parametrize("method,pairs_with_attention", [
    ("skip-cache", 2), ("deep-reuse", 1), ("fora", 0), ("none", 4)])
def test_latte_calls_match_flop_counter(method, pairs_with_attention):
    model = latte()
    shape, c = flops.Shape.of(model), flops.components(flops.Shape.of(model))
    n, k = 2, 1
    x, t = torch.randn(n, 1, 3, 8, 8), torch.full((n,), 500)
    with torch.no_grad(), apply_cache(model, CacheConfig(method=method, interval=2, k=k)) as state:
        model(x, t, None)
        with FlopCounterMode(display=False) as fc:
            model(x, t, None)
    full = state.calls[-1].full
    attn_mm = _attention_macs(c, pairs_with_attention, pairs_with_attention)
    assert fc.get_total_flops() == 2 * n * (flops.call_macs(shape, method, k, full) - attn_mm)


def t2v(depth=8):
    torch.manual_seed(0)
    return build("LatteT2V-Mini/2-skip", depth=depth, hidden_size=32, caption_channels=12, num_frames=3).eval()


def test_hand_count_text_to_video_mini():
    # 8x8x4 latents, 3 frames: T = 16, F = 3, H = 32, MLP 128, p = 2, C_out = 8; captions L = 5 of width 12
    c = flops.components(flops.Shape.of(t2v(depth=4), caption_tokens=5))
    n = 3 * 16                                       # tokens of a video
    assert c == {
        "x_embedder": n * 32 * 4 * 4,
        "t_embedder": 256 * 32 + 32 * 32,
        "adaln_single": 32 * 6 * 32,                 # once per sample; no per-block adaLN Linear
        "caption_projection": 5 * 12 * 32 + 5 * 32 * 32,
        "spatial.attn.qkv": n * 32 * 96,
        "spatial.attn.scores": 3 * 16 * 16 * 32,
        "spatial.attn.values": 3 * 16 * 16 * 32,
        "spatial.attn.proj": n * 32 * 32,
        "spatial.mlp": 2 * n * 32 * 128,
        "spatial.cross.q": n * 32 * 32,
        "spatial.cross.kv": 3 * 5 * 32 * 64,         # keys and values of the caption, for every frame
        "spatial.cross.scores": 3 * 16 * 5 * 32,
        "spatial.cross.values": 3 * 16 * 5 * 32,
        "spatial.cross.proj": n * 32 * 32,
        "temporal.attn.qkv": n * 32 * 96,
        "temporal.attn.scores": 16 * 3 * 3 * 32,
        "temporal.attn.values": 16 * 3 * 3 * 32,
        "temporal.attn.proj": n * 32 * 32,
        "temporal.mlp": 2 * n * 32 * 128,
        "fusion": n * 64 * 32,
        "final.linear": n * 32 * 4 * 8,
    }
    assert flops.Shape.of(t2v(depth=4)).caption_tokens == 120          # the Latte pipeline's padding
    with pytest.raises(ValueError, match="caption_tokens"):
        flops.Shape.of(t2v(depth=4), caption_tokens=0)
    with pytest.raises(ValueError, match="only for text-to-video"):
        flops.Shape.of(mini(), caption_tokens=5)


@pytest.mark.parametrize("method,pairs_with_branches", [
    ("skip-cache", 2), ("deep-reuse", 1), ("delta", 2), ("fora", 0), ("none", 4)])
def test_text_to_video_calls_match_flop_counter(method, pairs_with_branches):
    model = t2v()
    shape = flops.Shape.of(model, caption_tokens=5)
    c = flops.components(shape)
    n, k = 2, 1
    x, t = torch.randn(n, 4, 3, 8, 8), torch.full((n,), 500)
    y = torch.randn(n, 5, 12)
    with torch.no_grad(), apply_cache(model, CacheConfig(method=method, interval=2, k=k)) as state:
        model(x, t, y)
        with FlopCounterMode(display=False) as fc:
            model(x, t, y)
    attn_mm = 0 if _sdpa_counted() else pairs_with_branches * sum(
        c[f"{kind}.{part}"] for kind in ("spatial.attn", "spatial.cross", "temporal.attn") for part in ("scores", "values"))
    assert fc.get_total_flops() == 2 * n * (flops.call_macs(shape, method, k, state.calls[-1].full) - attn_mm)
    assert not state.calls[-1].full or method == "none"
