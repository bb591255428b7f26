"""Latte / Latte-skip class-to-video: official key tables, strict loading, and the forward pass
against a frame-by-frame, token-by-token re-implementation of the official loop."""
import pytest
import torch

from smoothness import hooks
from smoothness.diffusion import Diffusion, SamplerConfig
from smoothness.models import (
    LATTE_DATASETS,
    CheckpointError,
    Latte,
    LatteConfig,
    build,
    infer_config,
    load_model,
)


def official_c2v_keys(skips: bool, classes: int) -> dict[str, tuple]:
    """Latte-XL/2 at 256x256 (32x32 latents, 16 frames), written out from the official module tree."""
    H, L = 1152, 28
    keys = {
        "pos_embed": (1, 256, H), "temp_embed": (1, 16, H),
        "x_embedder.proj.weight": (H, 4, 2, 2), "x_embedder.proj.bias": (H,),
        "t_embedder.mlp.0.weight": (H, 256), "t_embedder.mlp.0.bias": (H,),
        "t_embedder.mlp.2.weight": (H, H), "t_embedder.mlp.2.bias": (H,),
        "final_layer.linear.weight": (2 * 2 * 8, H), "final_layer.linear.bias": (2 * 2 * 8,),
        "final_layer.adaLN_modulation.1.weight": (2 * H, H), "final_layer.adaLN_modulation.1.bias": (2 * H,),
    }
    if classes:
        keys["y_embedder.embedding_table.weight"] = (classes + 1, H)
    for i in range(L):
        for name, shape in (("attn.qkv", (3 * H, H)), ("attn.proj", (H, H)), ("mlp.fc1", (4 * H, H)),
                            ("mlp.fc2", (H, 4 * H)), ("adaLN_modulation.1", (6 * H, H))):
            keys[f"blocks.{i}.{name}.weight"] = shape
            keys[f"blocks.{i}.{name}.bias"] = (shape[0],)
    if skips:
        for k in range(7):                                 # depth // 4 fusions
            keys[f"skip_norms.{k}.weight"] = keys[f"skip_norms.{k}.bias"] = (2 * H,)
            keys[f"skip_linears.{k}.linear.weight"] = (H, 2 * H)
            keys[f"skip_linears.{k}.linear.bias"] = (H,)
    return keys


@pytest.mark.parametrize("dataset", sorted(LATTE_DATASETS))
@pytest.mark.parametrize("skips", [False, True])
def test_full_size_keys_match_official(dataset, skips):
    name = "Latte-XL/2" + ("-skip" if skips else "")
    model = build(name, device="meta", **LATTE_DATASETS[dataset])
    have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert have == official_c2v_keys(skips, LATTE_DATASETS[dataset]["num_classes"])


def test_skip_pairing_is_pair_13_minus_p():
    model = build("Latte-XL/2-skip", device="meta")
    assert model.num_units == 14
    assert model.skip_into == {p: (13 - p, p - 7) for p in range(7, 14)}
    assert [model.block_kind(i) for i in model.unit_blocks(3)] == ["spatial", "temporal"]
    assert model.unit_blocks(3) == [6, 7]


def _reduced(skips, classes, frames=16):
    """Real width 1152 and 16 heads, 4 blocks (2 pairs), 4x4 latents: small enough for CPU."""
    torch.manual_seed(0)
    return Latte(LatteConfig(input_size=4, patch_size=2, hidden_size=1152, num_heads=16, depth=4,
                             num_frames=frames, num_classes=classes, skips=skips))


@pytest.mark.parametrize("skips,classes,suffix", [(True, 0, ".pt"), (True, 101, ".safetensors"), (False, 0, ".pt")])
def test_reduced_checkpoint_loads_strictly_and_runs(tmp_path, skips, classes, suffix):
    src = _reduced(skips, classes)
    for p in src.parameters():                     # adaLN-Zero init would hide a wrong load
        if not p.any():
            p.data.normal_(0, 0.02, generator=torch.Generator().manual_seed(p.numel()))
    path = tmp_path / f"latte{suffix}"
    if suffix == ".pt":
        torch.save({"ema": src.state_dict()}, path)
    else:
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    model = load_model(path)
    assert isinstance(model, Latte) and model.config == src.config
    x = torch.randn(2, 4, 3, 4, 4, generator=torch.Generator().manual_seed(1))   # 3 of 16 frames
    y = torch.tensor([5, 101]) if classes else None
    with torch.no_grad():
        assert torch.equal(model(x, torch.tensor([10, 900]), y), src.eval()(x, torch.tensor([10, 900]), y))


def test_inference_reads_frames_classes_and_skips():
    sd = build("Latte-XL/2-skip", device="meta", num_classes=101, num_frames=8).state_dict()
    cfg = infer_config(sd)
    assert isinstance(cfg, LatteConfig)
    assert (cfg.num_frames, cfg.num_classes, cfg.skips, cfg.depth, cfg.num_heads) == (8, 101, True, 28, 16)
    sd = build("Latte-XL/2", device="meta").state_dict()
    assert (infer_config(sd).num_classes, infer_config(sd).skips) == (0, False)


def test_wrong_fusion_count_is_refused(tmp_path):
    src = build("Latte-Mini/2-skip", input_size=8, in_channels=1, num_frames=4)
    sd = src.state_dict()
    sd["skip_norms.1.weight"] = sd["skip_norms.0.weight"].clone()   # a second fusion Latte-skip never has
    path = tmp_path / "bad.pt"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match="unexpected"):
        load_model(path)


def reference_forward(model: Latte, x, t, y=None):
    """The official loop written independently: per-frame spatial blocks, per-position temporal blocks."""
    n, c, f, hh, ww = x.shape
    cond = model.t_embedder(t) + (model.y_embedder(y) if y is not None else 0)        # (N, H)
    frames = [model.x_embedder(x[:, :, j]) + model.pos_embed for j in range(f)]       # F x (N, T, H)
    h = torch.stack(frames, dim=1)                                                    # (N, F, T, H)
    skips = []
    pairs = model.config.depth // 2
    for p in range(pairs):
        if model.config.skips and p >= pairs // 2:
            k = p - pairs // 2
            h = model.skip_linears[k](model.skip_norms[k](torch.cat([h, skips.pop()], dim=-1)))
        spatial, temporal = model.blocks[2 * p], model.blocks[2 * p + 1]
        h = torch.stack([spatial(h[:, j], cond) for j in range(f)], dim=1)
        if p == 0:
            h = h + model.temp_embed[:, :f].unsqueeze(2)                              # (1, F, 1, H)
        h = torch.stack([temporal(h[:, :, s], cond) for s in range(h.shape[2])], dim=2)
        if model.config.skips and p < pairs // 2:
            skips.append(h)
    out = [model.unpatchify(model.final_layer(h[:, j], cond)) for j in range(f)]     # F x (N, 2C, H, W)
    return torch.stack(out, dim=2)                                                    # (N, 2C, F, H, W)


@pytest.mark.parametrize("name,classes", [("Latte-Mini/2", 0), ("Latte-Mini/2-skip", 7), ("Latte-D/2-skip", 0)])
def test_forward_equals_frame_by_frame_reference(name, classes):
    torch.manual_seed(0)
    model = build(name, input_size=8, in_channels=2, num_frames=6, num_classes=classes).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel() + 1))
    x = torch.randn(3, 2, 5, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([1, 500, 999])
    y = torch.tensor([0, 6, 7]) if classes else None
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), reference_forward(model, x, t, y), rtol=1e-4, atol=1e-5)


def test_block_sites_see_their_own_layout():
    model = build("Latte-Mini/2", input_size=8, in_channels=1, num_frames=4).eval()
    x = torch.randn(2, 1, 3, 8, 8)
    with hooks.record(model, ["blocks.0", "blocks.1", "output"]) as rec, torch.no_grad():
        model(x, torch.tensor([5, 5]))
    assert rec["blocks.0"][0].shape == (2 * 3, 16, 64)      # spatial: (N*F, T, H)
    assert rec["blocks.1"][0].shape == (2 * 16, 3, 64)      # temporal: (N*T, F, H)
    assert rec["output"][0].shape == (2, 2, 3, 8, 8)


def test_errors_name_the_bad_value():
    model = build("Latte-Mini/2", input_size=8, in_channels=1, num_frames=4).eval()
    with pytest.raises(ValueError, match="5 frames.*1..4"):
        model(torch.randn(1, 1, 5, 8, 8), torch.tensor([3]))
    with pytest.raises(ValueError, match="unconditional"):
        model(torch.randn(1, 1, 2, 8, 8), torch.tensor([3]), torch.tensor([1]))
    with pytest.raises(ValueError, match=r"videos \(N, C, F, H, W\)"):
        model(torch.randn(1, 1, 8, 8), torch.tensor([3]))
    cond = build("Latte-Mini/2", input_size=8, in_channels=1, num_frames=4, num_classes=3).eval()
    with pytest.raises(ValueError, match="class-conditional"):
        cond(torch.randn(1, 1, 2, 8, 8), torch.tensor([3]))
    with pytest.raises(ValueError, match="multiple of 4"):
        LatteConfig(depth=6, hidden_size=64, num_heads=2, skips=True)


def test_unconditional_sampling_runs_and_is_seeded():
    model = build("Latte-Mini/2-skip", input_size=8, in_channels=1, num_frames=4).eval()
    diffusion = Diffusion.for_config(SamplerConfig(num_steps=5))
    with torch.no_grad():
        a = diffusion.sample(model, (2, 1, 4, 8, 8), None, SamplerConfig(num_steps=5), seed=3)
        b = diffusion.sample(model, (2, 1, 4, 8, 8), None, SamplerConfig(num_steps=5), seed=3)
    assert a.shape == (2, 1, 4, 8, 8) and torch.equal(a, b)
