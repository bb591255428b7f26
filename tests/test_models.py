"""DiT / Skip-DiT structure, fusion semantics, registry and strict checkpoint loading.

Expected key tables and parameter counts are written out here from the spec (paper-spec.md 1.2,
1.3), not read back from the code under test.
"""
from __future__ import annotations

import math
import os
import re
import shlex
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from smoothness.models import (
    CheckpointError,
    build,
    checkpoint,
    config_for,
    infer_config,
    load_model,
    model_names,
)

pytestmark = pytest.mark.usefixtures("single_thread")

H = 1152          # DiT-XL/2 width
DEPTH = 28


def official_xl_shapes(skips: bool) -> dict[str, tuple[int, ...]]:
    """The key table of the official DiT-XL-2-256x256.pt (+ DiT-XL-2-skip.pt's fusion rows)."""
    shapes = {
        "pos_embed": (1, 256, 1152),
        "x_embedder.proj.weight": (1152, 4, 2, 2),
        "x_embedder.proj.bias": (1152,),
        "t_embedder.mlp.0.weight": (1152, 256),
        "t_embedder.mlp.0.bias": (1152,),
        "t_embedder.mlp.2.weight": (1152, 1152),
        "t_embedder.mlp.2.bias": (1152,),
        "y_embedder.embedding_table.weight": (1001, 1152),
        "final_layer.linear.weight": (32, 1152),
        "final_layer.linear.bias": (32,),
        "final_layer.adaLN_modulation.1.weight": (2304, 1152),
        "final_layer.adaLN_modulation.1.bias": (2304,),
    }
    for i in range(DEPTH):
        shapes.update({
            f"blocks.{i}.attn.qkv.weight": (3456, 1152),
            f"blocks.{i}.attn.qkv.bias": (3456,),
            f"blocks.{i}.attn.proj.weight": (1152, 1152),
            f"blocks.{i}.attn.proj.bias": (1152,),
            f"blocks.{i}.mlp.fc1.weight": (4608, 1152),
            f"blocks.{i}.mlp.fc1.bias": (4608,),
            f"blocks.{i}.mlp.fc2.weight": (1152, 4608),
            f"blocks.{i}.mlp.fc2.bias": (1152,),
            f"blocks.{i}.adaLN_modulation.1.weight": (6912, 1152),
            f"blocks.{i}.adaLN_modulation.1.bias": (6912,),
        })
    if skips:
        for k in range(DEPTH // 2):
            shapes.update({
                f"skip_norms.{k}.weight": (2304,),
                f"skip_norms.{k}.bias": (2304,),
                f"skip_linears.{k}.linear.weight": (1152, 2304),
                f"skip_linears.{k}.linear.bias": (1152,),
            })
    return shapes


# ----------------------------------------------------------------------------------- structure

@pytest.mark.parametrize("skips", [False, True], ids=["DiT-XL/2", "DiT-XL/2-skip"])
def test_official_state_dict_keys_and_shapes(skips):
    model = build("DiT-XL/2" + ("-skip" if skips else ""), device="meta")
    have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = official_xl_shapes(skips)
    assert sorted(set(have) - set(want)) == [], "unexpected keys"
    assert sorted(set(want) - set(have)) == [], "missing keys"
    wrong = {k: (have[k], want[k]) for k in want if have[k] != want[k]}
    assert wrong == {}


def test_xl_parameter_count_matches_hand_computation():
    # Closed form from the table: a block is qkv 3H^2+3H, proj H^2+H, fc1 4H^2+4H, fc2 4H^2+H,
    # adaLN 6H^2+6H = 18H^2 + 15H.
    block = 18 * H * H + 15 * H
    stem = (256 * H                      # pos_embed (stored, not trained)
            + 4 * 2 * 2 * H + H          # patch embedding
            + 256 * H + H + H * H + H    # timestep MLP
            + 1001 * H)                  # class table incl. the null row
    head = 32 * H + 32 + 2 * H * H + 2 * H
    hand = stem + DEPTH * block + head
    assert hand == 675_129_632                         # the DiT paper's "675 M"
    assert hand == sum(math.prod(s) for s in official_xl_shapes(False).values())
    model = build("DiT-XL/2", device="meta")
    assert sum(p.numel() for p in model.parameters()) == hand
    assert not model.pos_embed.requires_grad

    fusion = 2 * (2 * H) + (2 * H) * H + H                # LayerNorm(2H) affine + Linear(2H -> H)
    assert fusion == 2_659_968                          # spec 1.2: parameters per fusion
    skip = build("DiT-XL/2-skip", device="meta")
    assert sum(p.numel() for p in skip.parameters()) == hand + (DEPTH // 2) * fusion


def test_infer_config_at_official_size():
    for name in ("DiT-XL/2", "DiT-XL/2-skip"):
        sd = build(name, device="meta").state_dict()
        assert infer_config(sd) == config_for(name)


def test_skip_pairing_depth_28():
    model = build("DiT-XL/2-skip", device="meta")
    assert model.skip_into == {14 + k: (13 - k, k) for k in range(14)}
    # Decoder block i receives block 27 - i; the outermost pair 0 -> 27 goes through fusion 13.
    for i, (src, k) in model.skip_into.items():
        assert src == 27 - i and k == i - 14
    assert model.skip_into[27] == (0, 13)
    assert model.skip_into[14] == (13, 0)
    assert model.skip_sources == frozenset(range(14))
    plain = build("DiT-XL/2", device="meta")
    assert plain.skip_into == {} and plain.skip_sources == frozenset()


def test_skip_needs_even_depth():
    with pytest.raises(ValueError, match="even depth"):
        build("DiT-Mini/2-skip", device="meta", depth=3)


def test_pos_embed_is_mae_sincos(tiny):
    # MAE/DiT: first half of the width encodes the column (w), second half the row (h);
    # each half is [sin(pos * w_j), cos(pos * w_j)] with w_j = 10000^(-j / (D/4)).
    pe = tiny.pos_embed[0].double()               # (16 tokens, 64)
    g, d = 4, 64
    for r in range(g):
        for c in range(g):
            n = r * g + c
            for j in (0, 1, 5):
                w = 10000.0 ** (-j / (d / 4))
                assert pe[n, j].item() == pytest.approx(math.sin(c * w), abs=1e-6)
                assert pe[n, d // 4 + j].item() == pytest.approx(math.cos(c * w), abs=1e-6)
                assert pe[n, d // 2 + j].item() == pytest.approx(math.sin(r * w), abs=1e-6)


def test_timestep_frequencies_cos_first(tiny):
    t = torch.tensor([0.0, 3.0])
    emb = tiny.t_embedder.frequencies(t, 256)
    freqs = np.exp(-math.log(10000.0) * np.arange(128) / 128)
    expect = np.concatenate([np.cos(3.0 * freqs), np.sin(3.0 * freqs)])
    np.testing.assert_allclose(emb[1].numpy(), expect, atol=1e-5)
    np.testing.assert_allclose(emb[0].numpy(), np.r_[np.ones(128), np.zeros(128)], atol=0)


# ---------------------------------------------------------------------------------- fusion

def test_fuse_is_linear_of_fp32_layernorm_of_deep_then_skip(tiny_skip):
    hidden = tiny_skip.config.hidden_size
    g = torch.Generator().manual_seed(5)
    deep, skip = torch.randn(2, 16, hidden, generator=g), torch.randn(2, 16, hidden, generator=g)
    for k in range(2):
        norm, lin = tiny_skip.skip_norms[k], tiny_skip.skip_linears[k].linear
        z = F.layer_norm(torch.cat([deep, skip], dim=-1), (2 * hidden,), norm.weight, norm.bias, eps=1e-6)
        want = F.linear(z, lin.weight, lin.bias)
        got = tiny_skip.fuse(k, deep, skip)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        # Order matters: swapping deep and skip must give something else.
        assert not torch.allclose(tiny_skip.fuse(k, skip, deep), want, atol=1e-3)


def test_fuse_layernorm_runs_in_fp32_for_bf16(tiny_skip):
    model = tiny_skip.to(torch.bfloat16)
    hidden = model.config.hidden_size
    g = torch.Generator().manual_seed(6)
    deep = torch.randn(2, 16, hidden, generator=g).bfloat16()
    skip = torch.randn(2, 16, hidden, generator=g).bfloat16()
    norm, lin = model.skip_norms[0], model.skip_linears[0].linear
    z32 = F.layer_norm(torch.cat([deep, skip], -1).float(), (2 * hidden,), norm.weight.float(), norm.bias.float(),
                       eps=1e-6)
    assert torch.equal(norm(torch.cat([deep, skip], -1)), z32.bfloat16())
    got = model.fuse(0, deep, skip)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, F.linear(z32.bfloat16(), lin.weight, lin.bias))


def naive_forward(model, x, t, y):
    """DiT / Skip-DiT forward written out: push blocks 0..L/2-1, pop into block L-1-i, no residual."""
    cfg = model.config
    L, half, hid, p, C = cfg.depth, cfg.depth // 2, cfg.hidden_size, cfg.patch_size, cfg.out_channels
    h = model.x_embedder.proj(x).flatten(2).transpose(1, 2) + model.pos_embed          # (N, T, H)
    c = model.t_embedder(t) + model.y_embedder.embedding_table.weight[y]               # (N, H)
    stack = []
    for i in range(L):
        if cfg.skips and i >= half:
            k = i - half
            src = stack.pop()                                   # output of block L-1-i
            z = F.layer_norm(torch.cat([h, src], -1), (2 * hid,), model.skip_norms[k].weight,
                             model.skip_norms[k].bias, eps=1e-6)
            h = F.linear(z, model.skip_linears[k].linear.weight, model.skip_linears[k].linear.bias)
        h = model.blocks[i](h, c)
        if cfg.skips and i < half:
            stack.append(h)
    assert stack == []
    shift, scale = model.final_layer.adaLN_modulation(c).chunk(2, dim=1)
    h = F.layer_norm(h, (hid,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    out = F.linear(h, model.final_layer.linear.weight, model.final_layer.linear.bias)  # (N, T, p*p*C)
    n, g = x.shape[0], x.shape[-1] // p
    out = out.reshape(n, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4)                      # (N, C, gh, p, gw, p)
    return out.reshape(n, C, g * p, g * p)


@pytest.mark.parametrize("which", ["tiny", "tiny_skip"])
def test_forward_matches_naive_loop(which, request, tiny_inputs):
    model = request.getfixturevalue(which)
    x, t, y = tiny_inputs
    with torch.no_grad():
        got, want = model(x, t, y), naive_forward(model, x, t, y)
    assert got.shape == (2, 4, 8, 8)
    assert want.abs().max() > 1e-3                       # a woken model, not the adaLN-zero identity
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_skip_branches_change_the_output(tiny_skip, tiny_inputs):
    # Same weights with the fusions bypassed (deep path only) must differ: the skips are live.
    x, t, y = tiny_inputs
    with torch.no_grad():
        full = tiny_skip(x, t, y)
        trunk = tiny_skip.embed(x, t, y)
        for u in range(tiny_skip.num_units):
            trunk.h = tiny_skip.run_blocks(u, trunk.h, trunk)
        plain = tiny_skip.head(trunk)
    assert not torch.allclose(full, plain, atol=1e-4)


# ------------------------------------------------------------------------ checkpoint round trips

@pytest.fixture(scope="module")
def wide(single_thread, tmp_path_factory):
    """Real width 1152 (num_heads inferred as 16), depth 2, 4 tokens, with and without the skip
    branch, each saved as a ``{"ema": sd}`` .pt and as .safetensors. One random draw serves both
    variants: the plain model takes the skip model's weights minus the fusion."""
    from safetensors.torch import save_file

    size = dict(input_size=4, in_channels=4, depth=2, num_classes=3)
    skip = build("DiT-XL/2-skip", device="meta", **size).to_empty(device="cpu").eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():                       # every weight N(0, 0.02): cheaper than the DiT init
        for p in skip.parameters():
            p.normal_(0.0, 0.02, generator=g)
    sd = skip.state_dict()
    plain = build("DiT-XL/2", device="meta", **size)
    plain.load_state_dict({k: v for k, v in sd.items() if not k.startswith("skip_")}, strict=True, assign=True)
    plain.eval()
    x, t, y = torch.randn(2, 4, 4, 4, generator=g), torch.tensor([999, 250]), torch.tensor([2, 3])
    d = tmp_path_factory.mktemp("wide")
    out = {}
    for name, model in (("dit", plain), ("skip", skip)):
        state = model.state_dict()
        torch.save({"ema": state}, d / f"{name}.pt")
        save_file(state, str(d / f"{name}.safetensors"))
        with torch.no_grad():
            out[name] = model(x, t, y)
    assert not torch.allclose(out["dit"], out["skip"], atol=1e-4)
    return SimpleNamespace(dir=d, x=x, t=t, y=y, out=out)


@pytest.mark.parametrize("variant", ["dit", "skip"])
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_wide_checkpoint_round_trip(wide, variant, suffix):
    model = load_model(wide.dir / f"{variant}{suffix}")
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_heads, cfg.depth, cfg.patch_size) == (1152, 16, 2, 2)
    assert (cfg.input_size, cfg.in_channels, cfg.num_classes) == (4, 4, 3)
    assert cfg.learn_sigma is True and cfg.mlp_ratio == 4.0
    assert cfg.skips is (variant == "skip")
    assert model.skip_into == ({1: (0, 0)} if variant == "skip" else {})
    assert not model.training
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    want = wide.out[variant]
    assert want.abs().max() > 1e-3
    with torch.no_grad():
        out = model(wide.x, wide.t, wide.y)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("wrap", ["model", "state_dict", "ema", None])
def test_wrappers_and_raw_state_dict(tiny, tiny_inputs, tmp_path, wrap):
    sd = tiny.state_dict()
    path = tmp_path / "ckpt.pth"
    torch.save(sd if wrap is None else {wrap: sd, "epoch": 3}, path)
    loaded = load_model(path)
    assert loaded.config == tiny.config
    with torch.no_grad():
        torch.testing.assert_close(loaded(*tiny_inputs), tiny(*tiny_inputs), rtol=1e-6, atol=1e-7)


def test_skip_checkpoint_inferred_as_skip(tiny_skip, tiny_inputs, tmp_path):
    torch.save({"ema": tiny_skip.state_dict()}, tmp_path / "skip.pt")
    loaded = load_model(tmp_path / "skip.pt")
    assert loaded.config.skips and loaded.skip_into == {2: (1, 0), 3: (0, 1)}
    with torch.no_grad():
        torch.testing.assert_close(loaded(*tiny_inputs), tiny_skip(*tiny_inputs), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------- errors

def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nowhere.pt")


def test_corrupt_file(tmp_path):
    path = tmp_path / "corrupt.pt"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(path)


def test_corrupt_safetensors(tmp_path):
    path = tmp_path / "corrupt.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_model(path)


def test_unknown_extension(tmp_path):
    path = tmp_path / "weights.npz"
    path.write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"\.safetensors"):
        load_model(path)


class _Payload:
    """Unpickling this runs a shell command."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


def test_code_running_pickle_is_refused(tiny, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"ema": tiny.state_dict(), "trap": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="weights-only"):
        load_model(path)
    assert not marker.exists(), "the pickle's command ran"
    # Control: the payload is real, an unsafe load does run it.
    torch.load(path, weights_only=False)
    assert marker.exists()


class _Custom:
    pass


def test_pickle_with_custom_class_is_refused(tiny, tmp_path):
    path = tmp_path / "custom.pt"
    torch.save({"ema": tiny.state_dict(), "extra": _Custom()}, path)
    with pytest.raises(CheckpointError, match="weights-only"):
        load_model(path)


def test_not_a_state_dict(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_model(tmp_path / "list.pt")
    torch.save({"ema": {"a": 1}}, tmp_path / "ints.pt")
    with pytest.raises(CheckpointError, match="state dict of tensors"):
        load_model(tmp_path / "ints.pt")


def test_mismatch_names_every_bad_key_and_the_closest_configuration(tmp_path):
    sd = build("DiT-Mini/2").state_dict()            # exactly the registry's DiT-Mini/2
    del sd["blocks.1.attn.proj.bias"]
    sd["blocks.0.extra.weight"] = torch.zeros(3)
    sd["blocks.2.mlp.fc2.bias"] = torch.zeros(63)
    torch.save({"ema": sd}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as info:
        load_model(tmp_path / "bad.pt")
    msg = str(info.value)
    assert re.search(r"1 missing: blocks\.1\.attn\.proj\.bias", msg), msg
    assert re.search(r"1 unexpected: blocks\.0\.extra\.weight", msg), msg
    assert re.search(r"1 mis-shaped: blocks\.2\.mlp\.fc2\.bias \(63,\) != \(64,\)", msg), msg
    assert re.search(r"closest configuration: DiT-Mini/2(?!-skip)\b", msg), msg


def test_unknown_width_needs_num_heads(make_model, tiny_inputs, tmp_path, monkeypatch):
    model = make_model("DiT-Mini/2", hidden_size=48, num_heads=4)   # no official size is 48 wide
    torch.save(model.state_dict(), tmp_path / "w48.pt")
    # The closest-configuration search is covered above; stub it here to keep the test fast.
    monkeypatch.setattr(checkpoint, "_closest", lambda sd: "<closest>")
    with pytest.raises(CheckpointError, match=r"hidden size 48.*pass num_heads.*closest configuration: <closest>"):
        load_model(tmp_path / "w48.pt")
    loaded = load_model(tmp_path / "w48.pt", num_heads=4)
    assert loaded.config.num_heads == 4 and loaded.config == model.config
    with torch.no_grad():
        want = model(*tiny_inputs)
        torch.testing.assert_close(loaded(*tiny_inputs), want, rtol=1e-6, atol=1e-7)
        # The override is really used: a different head count gives a different function.
        other = load_model(tmp_path / "w48.pt", num_heads=3)(*tiny_inputs)
    assert not torch.allclose(other, want, atol=1e-5)


def test_num_heads_override_at_known_width(tiny, tmp_path):
    torch.save(tiny.state_dict(), tmp_path / "t.pt")
    assert load_model(tmp_path / "t.pt").config.num_heads == 2          # from the registry width 64
    assert load_model(tmp_path / "t.pt", num_heads=4).config.num_heads == 4


# -------------------------------------------------------------------------------- registry

def test_unknown_model_name_lists_allowed():
    with pytest.raises(ValueError, match="unknown model 'DiT-Q/2'") as info:
        build("DiT-Q/2", device="meta")
    for name in model_names():
        assert name in str(info.value)


OFFICIAL = {"DiT-S": (12, 384, 6), "DiT-B": (12, 768, 12), "DiT-L": (24, 1024, 16), "DiT-XL": (28, 1152, 16)}


def test_every_registry_entry_builds_on_meta():
    names = model_names()
    assert {"DiT-S/2", "DiT-B/4", "DiT-L/8", "DiT-XL/2", "DiT-XL/2-skip"} <= set(names)
    for name in names:
        model = build(name, device="meta")
        cfg = model.config
        base = name.removesuffix("-skip")
        size, patch = base.split("/")
        assert cfg.patch_size == int(patch), name
        assert cfg.skips == name.endswith("-skip"), name
        assert bool(model.skip_into) == cfg.skips, name
        if size in OFFICIAL:
            assert (cfg.depth, cfg.hidden_size, cfg.num_heads) == OFFICIAL[size], name
        assert all(p.is_meta for p in model.parameters()), name


def test_a_bundled_checkpoint_missing_one_key_is_told_its_own_size(tmp_path):
    """The digits DiT-D/2 (16x16, one channel) with one key removed: its closest configuration is
    DiT-D/2, not the DiT-D/4 whose default 32x32 table happens to have as many tokens."""
    from smoothness.models import bundled, read_state_dict
    sd = {k: v.float() for k, v in read_state_dict(bundled.weight_path("digits-dit"))[0].items()}
    del sd["blocks.3.attn.proj.bias"]
    torch.save({"ema": sd}, tmp_path / "one_missing.pt")
    with pytest.raises(CheckpointError, match=r"closest configuration: DiT-D/2$"):
        load_model(tmp_path / "one_missing.pt")
    skip = {k: v.float() for k, v in read_state_dict(bundled.weight_path("digits-skip-dit"))[0].items()}
    del skip["skip_norms.2.bias"]
    torch.save({"ema": skip}, tmp_path / "skip_missing.pt")
    with pytest.raises(CheckpointError, match=r"closest configuration: DiT-D/2-skip$"):
        load_model(tmp_path / "skip_missing.pt")


@pytest.mark.parametrize("name", ["", "  "])
def test_an_empty_model_name_is_refused_by_name(name):
    from smoothness.models import bundled
    with pytest.raises(ValueError, match="the model name or checkpoint path is empty"):
        bundled.load(name)
