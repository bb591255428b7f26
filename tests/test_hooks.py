"""Named sites, record / inject / override, hook hygiene, and the sampler context seen by hooks."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from smoothness.diffusion import Diffusion, SamplerConfig
from smoothness.hooks import (
    hooked,
    inject,
    leftover_hooks,
    override,
    record,
    resolve_sites,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def manual_blocks(model, x, t, y, replace: dict[int, torch.Tensor] | None = None):
    """Block outputs and model output of a plain or Skip-DiT, written as a loop; ``replace[i]``
    substitutes block i's output (for the deep path and, if it is a skip source, the skip)."""
    replace = replace or {}
    cfg = model.config
    half, hid = cfg.depth // 2, cfg.hidden_size
    h = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder.embedding_table.weight[y]
    outs, stack = [], []
    for i in range(cfg.depth):
        if cfg.skips and i >= half:
            k = i - half
            z = F.layer_norm(torch.cat([h, stack.pop()], -1), (2 * hid,), model.skip_norms[k].weight,
                             model.skip_norms[k].bias, eps=1e-6)
            h = model.skip_linears[k](z)
        h = replace.get(i, model.blocks[i](h, c))
        if cfg.skips and i < half:
            stack.append(h)
        outs.append(h)
    out = model.unpatchify(model.final_layer(h, c))
    return outs, out


# ---------------------------------------------------------------------------------- record

def test_record_leaves_output_untouched_and_matches_manual_loop(tiny, tiny_inputs):
    with torch.no_grad():
        ref = tiny(*tiny_inputs)
        with record(tiny, "blocks.*") as rec:
            out = tiny(*tiny_inputs)
            tiny(*tiny_inputs)
        blocks, manual_out = manual_blocks(tiny, *tiny_inputs)
    assert torch.equal(out, ref)
    assert torch.equal(manual_out, ref)
    assert list(rec) == [f"blocks.{i}" for i in range(4)]
    for i, h in enumerate(blocks):
        assert len(rec[f"blocks.{i}"]) == 2                  # one entry per forward
        assert torch.equal(rec[f"blocks.{i}"][0], h)
        assert torch.equal(rec[f"blocks.{i}"][1], h)
        assert rec.meta[f"blocks.{i}"] == [(None, None), (None, None)]   # outside a sampler
    assert rec.stack("blocks.2").shape == (2, 2, 16, 64)
    assert leftover_hooks(tiny) == []


def test_record_keeps_copies(tiny, tiny_inputs):
    with torch.no_grad(), record(tiny, "output") as rec:
        out = tiny(*tiny_inputs)
    assert torch.equal(rec["output"][0], out)
    rec["output"][0].zero_()                       # editing the record must not touch the live tensor
    assert out.abs().max() > 0


def test_record_casts_copies(tiny, tiny_inputs):
    with torch.no_grad():
        ref = tiny(*tiny_inputs)
        with record(tiny, ["blocks.1", "output"], device="cpu", dtype=torch.bfloat16) as rec:
            out = tiny(*tiny_inputs)
        blocks, _ = manual_blocks(tiny, *tiny_inputs)
    assert out.dtype == torch.float32 and torch.equal(out, ref)          # the model's own output is fp32
    assert rec["blocks.1"][0].dtype == torch.bfloat16
    assert torch.equal(rec["blocks.1"][0], blocks[1].bfloat16())
    assert torch.equal(rec["output"][0], ref.bfloat16())


def test_recorded_sub_sites_add_up_to_the_block(tiny, tiny_inputs):
    # A block is h + attn branch + mlp branch; the attn/mlp sites see the gated branches.
    with torch.no_grad(), record(tiny, ["embed", "blocks.*", "blocks.*.attn", "blocks.*.mlp"]) as rec:
        tiny(*tiny_inputs)
    prev = rec["embed"][0]
    for i in range(4):
        h = rec[f"blocks.{i}"][0]
        attn, mlp = rec[f"blocks.{i}.attn"][0], rec[f"blocks.{i}.mlp"][0]
        assert attn.abs().max() > 0 and mlp.abs().max() > 0
        torch.testing.assert_close(prev + attn + mlp, h, rtol=1e-5, atol=1e-6)
        prev = h


def test_record_skip_sites(tiny_skip, tiny_inputs):
    x, t, y = tiny_inputs
    with torch.no_grad(), record(tiny_skip, ["skips.*", "blocks.1", "blocks.2"]) as rec:
        tiny_skip(x, t, y)
    with torch.no_grad():
        blocks, _ = manual_blocks(tiny_skip, x, t, y)
        h0, h1 = blocks[0], blocks[1]
        # Fusion 0 feeds block 2 from block 1 (deep = block 1's output too); fusion 1 feeds block 3 from block 0.
        torch.testing.assert_close(rec["skips.0"][0], tiny_skip.fuse(0, h1, h1))
        torch.testing.assert_close(rec["skips.1"][0], tiny_skip.fuse(1, blocks[2], h0))
    torch.testing.assert_close(rec["blocks.2"][0], blocks[2])


# ----------------------------------------------------------------------------------- sites

def test_sites_list(tiny, tiny_skip):
    blocks = [f"blocks.{i}{s}" for i in range(4) for s in ("", ".attn", ".mlp")]
    assert list(tiny.sites()) == ["input", "embed", *blocks, "output"]
    assert list(tiny_skip.sites()) == ["input", "embed", *blocks, "skips.0", "skips.1", "output"]
    for model in (tiny, tiny_skip):
        for path in model.sites().values():
            model.get_submodule(path)                                # every site names a real module


@pytest.mark.parametrize("patterns, want", [
    ("blocks.*", [f"blocks.{i}" for i in range(4)]),
    ("blocks.0-2", ["blocks.0", "blocks.1", "blocks.2"]),
    ("blocks.*.attn", [f"blocks.{i}.attn" for i in range(4)]),
    ("skips.*", ["skips.0", "skips.1"]),
    (["output", "blocks.3", "input", "blocks.1-3"], ["input", "blocks.1", "blocks.3", "blocks.2", "output"]),
    (["blocks.1", "blocks.1", "blocks.0-1"], ["blocks.0", "blocks.1"]),
    ("blocks.1-1.mlp", ["blocks.1.mlp"]),
])
def test_resolve_sites(tiny_skip, patterns, want):
    order = list(tiny_skip.sites())
    assert resolve_sites(tiny_skip, patterns) == sorted(want, key=order.index)


def test_resolve_sites_errors(tiny):
    with pytest.raises(ValueError, match=r"unknown site 'blocks\.9'.*allowed: .*blocks\.\{i\}"):
        resolve_sites(tiny, "blocks.9")
    with pytest.raises(ValueError, match=r"unknown site 'skips\.\*'"):
        resolve_sites(tiny, "skips.*")                               # no skips on a plain DiT
    with pytest.raises(ValueError, match=r"unknown site 'block\.1'"):
        resolve_sites(tiny, "block.1")
    with pytest.raises(ValueError, match=r"'3-1' .*inverted"):
        resolve_sites(tiny, "blocks.3-1")
    with pytest.raises(ValueError, match=r"unknown site"):
        with record(tiny, ["blocks.0", "nowhere"]):
            pass
    with pytest.raises(ValueError, match=r"half='both'"):
        with record(tiny, "blocks.0", half="both"):
            pass
    assert leftover_hooks(tiny) == []


# --------------------------------------------------------------------------------- hygiene

def test_leftover_hooks_sees_live_hooks(tiny):
    with record(tiny, ["blocks.1", "output"]):
        assert sorted(leftover_hooks(tiny)) == ["blocks.1", "hook_output"]
    assert leftover_hooks(tiny) == []


def test_hooks_removed_when_the_body_raises(tiny, tiny_inputs):
    with pytest.raises(KeyError):
        with record(tiny, "blocks.*"):
            raise KeyError("boom")
    assert leftover_hooks(tiny) == []
    x, t, y = tiny_inputs
    with pytest.raises(RuntimeError):
        with record(tiny, ["blocks.*", "input"]):
            tiny(torch.zeros(2, 5, 8, 8), t, y)                      # wrong channel count: conv raises
    assert leftover_hooks(tiny) == []


def test_hooks_removed_when_a_hook_raises(tiny, tiny_inputs):
    def bad(h, ctx):
        raise ZeroDivisionError(ctx.site)

    with pytest.raises(ZeroDivisionError, match="blocks.2"):
        with inject(tiny, {"blocks.2": bad}):
            tiny(*tiny_inputs)
    assert leftover_hooks(tiny) == []
    with pytest.raises(ZeroDivisionError):
        with hooked(tiny, {"embed": bad}):
            tiny(*tiny_inputs)
    assert leftover_hooks(tiny) == []


def test_override_restores_forward_even_on_exceptions(tiny, tiny_inputs):
    block = tiny.blocks[0]
    with torch.no_grad():
        ref = tiny(*tiny_inputs)
        with pytest.raises(ValueError, match="inside"):
            with override({block: lambda x, c: torch.zeros_like(x)}):
                assert leftover_hooks(tiny) == ["blocks.0"]
                assert not torch.allclose(tiny(*tiny_inputs), ref)
                with pytest.raises(RuntimeError, match="already has an overridden forward"):
                    with override({block: lambda x, c: x}):
                        pass
                assert "forward" in block.__dict__                  # the outer override survives
                raise ValueError("inside")
        assert "forward" not in block.__dict__
        assert leftover_hooks(tiny) == []
        assert torch.equal(tiny(*tiny_inputs), ref)


# ---------------------------------------------------------------------------------- inject

def test_inject_zeros(tiny, tiny_inputs):
    x, t, y = tiny_inputs
    with torch.no_grad():
        ref = tiny(x, t, y)
        with inject(tiny, {"blocks.1": lambda h, ctx: torch.zeros_like(h)}):
            out = tiny(x, t, y)
        _, want = manual_blocks(tiny, x, t, y, replace={1: torch.zeros(2, 16, 64)})
    assert not torch.allclose(out, ref, atol=1e-4)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    assert leftover_hooks(tiny) == []
    with torch.no_grad():
        assert torch.equal(tiny(x, t, y), ref)


def test_inject_none_observes(tiny, tiny_inputs):
    seen = []
    with torch.no_grad():
        ref = tiny(*tiny_inputs)
        with inject(tiny, {"blocks.0-1": lambda h, ctx: seen.append(ctx.site)}):
            out = tiny(*tiny_inputs)
    assert seen == ["blocks.0", "blocks.1"] and torch.equal(out, ref)


def test_inject_at_a_skip_source_feeds_both_paths(tiny_skip, tiny_inputs):
    x, t, y = tiny_inputs
    with torch.no_grad():
        with inject(tiny_skip, {"blocks.0": lambda h, ctx: torch.zeros_like(h)}):
            out = tiny_skip(x, t, y)
        _, want = manual_blocks(tiny_skip, x, t, y, replace={0: torch.zeros(2, 16, 64)})
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- sampler context

SHAPE, Y = (2, 2, 8, 8), torch.tensor([1, 2])


def test_ctx_step_and_timestep_during_sampling(tiny, tiny_inputs):
    d = Diffusion.respaced(3)
    seen = []
    with record(tiny, "blocks.0") as rec, \
            hooked(tiny, {"blocks.3": lambda h, ctx: seen.append((ctx.step, ctx.timestep, ctx.cond_rows))}):
        for s in d.sample_steps(tiny, SHAPE, Y, SamplerConfig(num_steps=3), seed=0):
            with torch.no_grad():
                tiny(*tiny_inputs)                                   # a call between steps: no step
    chain = d.chain
    assert chain == [999, 500, 0]
    assert rec.meta["blocks.0"] == [(1, 999), (None, None), (2, 500), (None, None), (3, 0), (None, None)]
    assert seen == [(1, 999, None), (None, None, None), (2, 500, None), (None, None, None),
                    (3, 0, None), (None, None, None)]
    assert leftover_hooks(tiny) == []


def test_ctx_cfg_rows_and_half_selection(tiny):
    d = Diffusion.respaced(2)
    cfg = SamplerConfig(num_steps=2, cfg_scale=3.0)
    seen = []
    with record(tiny, ["blocks.1", "input"]) as everything, \
            record(tiny, ["blocks.1", "input"], half="cond") as cond, \
            record(tiny, "blocks.1", half="uncond") as uncond, \
            hooked(tiny, {"blocks.1": lambda h, ctx: seen.append((ctx.cond_rows, h.shape[0], ctx.step))}):
        steps = list(d.sample_steps(tiny, SHAPE, Y, cfg, seed=1))
    assert seen == [(2, 4, 1), (2, 4, 2)]
    for k, s in enumerate(steps):
        full = everything["blocks.1"][k]
        assert full.shape[0] == 4
        assert cond["blocks.1"][k].shape[0] == 2 and uncond["blocks.1"][k].shape[0] == 2
        assert torch.equal(cond["blocks.1"][k], full[:2])
        assert torch.equal(uncond["blocks.1"][k], full[2:])
        assert not torch.allclose(full[:2], full[2:])                # the labels differ, so do the halves
        assert torch.equal(cond["input"][k], s.x_t)                  # the conditional rows are this step's x_t
        assert torch.equal(everything["input"][k][2:], s.x_t)
    assert cond.meta["blocks.1"] == [(1, 999), (2, 0)]
