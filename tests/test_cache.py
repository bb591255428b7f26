"""Skip-Cache, baselines and schedules: exactness, call counts, official step patterns, state reset."""
import copy

import pytest
import torch

from smoothness import hooks
from smoothness.cache import (
    CacheConfig,
    CacheRule,
    Schedule,
    apply_cache,
    apply_skip_cache,
    preset,
)
from smoothness.diffusion import Diffusion, SamplerConfig, space_timesteps
from smoothness.models import build

METHODS = ["skip-cache", "deep-reuse", "delta", "fora", "none"]


def tiny(skips=True, depth=8, seed=0):
    """A small random DiT; weights re-drawn N(0, 0.02) because DiT init zeroes adaLN and the head."""
    m = build("DiT-Mini/2" + ("-skip" if skips else ""), input_size=8, in_channels=1, num_classes=10, depth=depth)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return m.eval()


pytestmark = pytest.mark.usefixtures("single_thread")   # conftest: one thread for tiny models


@pytest.fixture(scope="module")
def skip_model():
    return tiny(True, depth=4)


@pytest.fixture(scope="module")
def deep_model():
    return tiny(True, depth=8)


@pytest.fixture(scope="module")
def plain_model():
    return tiny(False, depth=4)


SC = SamplerConfig(num_steps=12, cfg_scale=2.0)
DIFF = Diffusion.for_config(SC)
Y = torch.tensor([1, 7])
SHAPE = (2, 1, 8, 8)


def run(model, config=None, seed=0):
    with torch.no_grad():
        if config is None:
            return DIFF.sample(model, SHAPE, Y, SC, seed=seed)
        with apply_cache(model, config):
            return DIFF.sample(model, SHAPE, Y, SC, seed=seed)


# ------------------------------------------------------------------ exactness
@pytest.mark.parametrize("method", METHODS)
def test_interval_one_is_bit_identical(skip_model, method):
    ref = run(skip_model)
    assert torch.equal(run(skip_model, CacheConfig(method=method, interval=1, k=1)), ref)
    assert hooks.leftover_hooks(skip_model) == []


@pytest.mark.parametrize("method,window", [("skip-cache", (-1, 0)), ("skip-cache", (999, 1000)),
                                           ("deep-reuse", (-1, 0)), ("delta", (999, 1000)), ("fora", (-1, 0))])
def test_window_excluding_every_step_is_bit_identical(skip_model, method, window):
    ref = run(skip_model)
    cfg = CacheConfig(method=method, interval=3, k=1, t_stop=window[0], t_start=window[1])
    with torch.no_grad(), apply_cache(skip_model, cfg) as state:
        out = DIFF.sample(skip_model, SHAPE, Y, SC, seed=0)
    assert state.num_cached == 0 and state.num_full == SC.num_steps
    assert torch.equal(out, ref)


@pytest.mark.parametrize("method", ["skip-cache", "deep-reuse", "delta", "fora"])
def test_caching_changes_the_output(skip_model, method):
    out = run(skip_model, CacheConfig(method=method, interval=3, k=1, t_stop=100))
    assert not torch.equal(out, run(skip_model))


# ----------------------------------------------------------- which blocks run
EXPECTED_BLOCKS = {  # depth 8, k = 2
    "skip-cache": [0, 1, 6, 7], "deep-reuse": [6, 7], "delta": [0, 1, 6, 7],
    "fora": list(range(8)), "none": list(range(8)),
}


def _two_calls(model, cfg):
    """One full then one cached call at t = 500 with a CFG-sized batch; per-site call counts of call 2."""
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.randn((4, 1, 8, 8), generator=g), torch.randn((4, 1, 8, 8), generator=g)
    t, y = torch.full((4,), 500), torch.tensor([1, 2, 10, 10])
    counts = {"qkv": 0, "fc1": 0}
    bump = lambda key: (lambda *a: counts.__setitem__(key, counts[key] + 1))
    handles = [b.attn.qkv.register_forward_hook(bump("qkv")) for b in model.blocks]
    handles += [b.mlp.fc1.register_forward_hook(bump("fc1")) for b in model.blocks]
    try:
        with torch.no_grad(), apply_cache(model, cfg) as state:
            first = model(x1, t, y)
            counts.update(qkv=0, fc1=0)
            with hooks.record(model, ["blocks.*", "skips.*"]) as rec:
                second = model(x2, t, y)
    finally:
        for h in handles:
            h.remove()
    return state, rec, counts, first, second, (x1, x2, t, y)


@pytest.mark.parametrize("method", METHODS)
def test_cached_step_calls_exactly_the_expected_blocks(deep_model, method):
    state, rec, counts, *_ = _two_calls(deep_model, CacheConfig(method=method, interval=2, k=2))
    full = [c.full for c in state.calls]
    assert full == ([True, True] if method == "none" else [True, False])
    blocks = sorted(int(s.split(".")[1]) for s in rec if s.startswith("blocks."))
    assert blocks == EXPECTED_BLOCKS[method]
    assert all(len(rec[s]) == 1 for s in rec)
    # fusions: unit 6 takes skips.2 (from block 1), unit 7 takes skips.3 (from block 0)
    fusions = sorted(s for s in rec if s.startswith("skips."))
    assert fusions == {"skip-cache": ["skips.2", "skips.3"], "deep-reuse": ["skips.2", "skips.3"],
                       "delta": ["skips.2", "skips.3"]}.get(method, [f"skips.{i}" for i in range(4)])
    real = 0 if method == "fora" else len(EXPECTED_BLOCKS[method])
    assert counts == {"qkv": real, "fc1": real}


def _manual_blocks(model, x, t, y, cache=None, k=2):
    """Independent Skip-DiT forward on the raw modules; returns (output, input of block L-k pre-fusion)."""
    L, half = len(model.blocks), len(model.blocks) // 2
    h = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder(y)
    fuse = lambda j, deep, skip: model.skip_linears[j](model.skip_norms[j](torch.cat([deep, skip], -1)))
    outs, stored = {}, None
    order = list(range(L)) if cache is None else list(range(k)) + list(range(L - k, L))
    for i in order:
        if i == L - k:
            stored = h
            if cache is not None:
                h = cache
        if i >= half:
            h = fuse(i - half, h, outs[L - 1 - i])
        h = model.blocks[i](h, c)
        outs[i] = h
    return model.unpatchify(model.final_layer(h, c)), stored


def test_cached_step_equals_an_independent_forward(deep_model):
    _, _, _, first, second, (x1, x2, t, y) = _two_calls(deep_model, CacheConfig(interval=2, k=2))
    with torch.no_grad():
        ref1, stored = _manual_blocks(deep_model, x1, t, y)
        ref2, _ = _manual_blocks(deep_model, x2, t, y, cache=stored)
    torch.testing.assert_close(first, ref1, rtol=0, atol=1e-6)
    torch.testing.assert_close(second, ref2, rtol=0, atol=1e-6)


# -------------------------------------------------------------------- presets
def official(timesteps, n, t_start, t_stop, less_equal):
    """The official code's loop, transcribed: returns the list of 'F'/'c' per model call."""
    cache_cont, cache_val, out = 0, None, []
    for t in timesteps:
        if cache_cont % n == 0 or cache_val is None or t >= t_start:
            out.append("F")
            cache_val = "features"
        else:
            out.append("c")
        cache_cont += 1
        if (t <= t_stop) if less_equal else (t < t_stop):
            cache_cont = 0
            cache_val = None
    return "".join(out)


DDPM250 = space_timesteps(1000, "250")[::-1]
DDIM50_LEADING = list(range(980, -1, -20))          # diffusers DDIM-50 "leading"


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6])
def test_dit_c2i_preset_matches_official(n):
    k, rule = preset("dit-c2i", n)
    assert k == 4
    assert Schedule.from_rule(rule, DDPM250).mask == official(DDPM250, n, 1000, 20, True)
    assert DDPM250[:3] == [999, 995, 991] and DDPM250[-1] == 0


def test_dit_c2i_stop_reset_happens_after_the_call():
    _, rule = preset("dit-c2i", 3)
    s = Schedule.from_rule(rule, DDPM250)
    tail = {t: f for t, f in zip(s.timesteps, s.full)}
    assert all(tail[t] for t in (16, 12, 8, 4, 0))    # after the t = 20 call everything is full
    assert tail[20] is False                             # ... but the t = 20 call itself is cached for N = 3


@pytest.mark.parametrize("chain", [DDPM250, DDIM50_LEADING])
@pytest.mark.parametrize("n", [2, 3, 4])
def test_latte_c2v_preset_matches_official(chain, n):
    k, rule = preset("latte-c2v", n)
    assert k == 1 and not rule.stop_inclusive
    assert Schedule.from_rule(rule, chain).mask == official(chain, n, 900, 50, False)


@pytest.mark.parametrize("spec,n", [("N2-700-50", 2), ("N3-800-50", 3), ("N4-700-50", 4)])
def test_t2v_spelling_matches_official(spec, n):
    k, rule = preset(spec)
    start = int(spec.split("-")[1])
    assert k == 1 and rule.interval == n
    s = Schedule.from_rule(rule, DDIM50_LEADING)
    assert s.mask == official(DDIM50_LEADING, n, start, 50, True)
    assert all(s.full[i] for i, t in enumerate(DDIM50_LEADING) if t >= start)


def test_live_decisions_follow_the_preset(skip_model):
    sc = SamplerConfig(num_steps=40, sampler="ddim")
    diff = Diffusion.for_config(sc)
    cfg = CacheConfig.preset("latte-c2v", interval=3)
    with torch.no_grad(), apply_skip_cache(skip_model, cfg) as state:
        diff.sample(skip_model, (1, 1, 8, 8), torch.tensor([3]), sc, seed=0)
    assert state.schedule.mask == official(diff.chain, 3, 900, 50, False) == cfg.schedule(diff.chain).mask
    assert "c" in state.schedule.mask
    assert [c.step for c in state.calls] == list(range(1, 41))


# ---------------------------------------------------------- state and reuse
@pytest.mark.parametrize("method", ["skip-cache", "deep-reuse", "delta", "fora"])
def test_reused_model_equals_fresh_model(method):
    used = tiny(True, depth=4, seed=3)
    fresh = copy.deepcopy(used)
    cfg = CacheConfig(method=method, interval=3, k=1, t_stop=-1)   # no tail reset: state would go stale
    with torch.no_grad(), apply_cache(used, cfg) as state:
        for i, rec in enumerate(DIFF.sample_steps(used, SHAPE, Y, SC, seed=5)):
            if i == 4:
                break                                             # an interrupted generation
        a = DIFF.sample(used, SHAPE, Y, SC, seed=0)
        b = DIFF.sample(used, SHAPE, Y, SC, seed=0)
    assert state.resets >= 2
    assert torch.equal(a, b)
    assert torch.equal(a, run(fresh, cfg))
    assert torch.equal(run(used), run(fresh))                    # nothing left behind on the model


def test_reset_empties_the_state(skip_model):
    with torch.no_grad(), apply_cache(skip_model, CacheConfig(interval=2, k=1)) as state:
        for i, _ in enumerate(DIFF.sample_steps(skip_model, SHAPE, Y, SC, seed=0)):
            if i == 4:
                break
        assert state.calls and state.payload is not None
        state.reset()
        assert state.calls == [] and state.payload is None


def test_hooks_removed_on_exception(skip_model):
    with pytest.raises(RuntimeError):
        with apply_cache(skip_model, CacheConfig(method="fora")):
            raise RuntimeError("boom")
    assert hooks.leftover_hooks(skip_model) == []


# ------------------------------------------------------------------ schedules
def test_custom_mask_drives_the_cache(skip_model):
    mask = "FccF" + "cF" * 3 + "cF"
    cfg = CacheConfig(mask=Schedule.from_mask(mask), k=1)
    with torch.no_grad(), apply_cache(skip_model, cfg) as state:
        DIFF.sample(skip_model, SHAPE, Y, SC, seed=0)
    assert state.schedule.mask == mask
    assert state.num_full == mask.count("F") and state.num_cached == mask.count("c")


def test_schedule_round_trips():
    _, rule = preset("dit-c2i", 4)
    s = Schedule.from_rule(rule, DDPM250)
    assert Schedule.from_cache_dit(s.to_cache_dit(), DDPM250) == s
    assert Schedule.from_cache_dit([int(c) for c in s.to_cache_dit()]).full == s.full
    assert Schedule.from_json(s.to_json(("attn", "mlp")), timesteps=DDPM250) == s
    assert Schedule.from_mask(s.mask, DDPM250) == s
    assert s.num_full + s.num_cached == 250 and s.num_full == s.mask.count("F")
    assert str(s).endswith(f"({s.num_full} full, {s.num_cached} cached of 250)")
    assert Schedule.from_mask("1001").mask == "FccF"


# --------------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs,words", [
    (dict(interval=0), ["interval=0", ">= 1"]),
    (dict(t_start=100, t_stop=500), ["inverted", "t_stop=500", "t_start=100"]),
    (dict(method="warpcache"), ["'warpcache'", "skip-cache", "deep-reuse", "teacache"]),
    (dict(k=0), ["k=0"]),
])
def test_bad_config_raises(kwargs, words):
    with pytest.raises(ValueError) as e:
        CacheConfig(**kwargs)
    assert all(w in str(e.value) for w in words)


def test_k_larger_than_half_depth(skip_model):
    with pytest.raises(ValueError, match=r"k=3 .* 1\.\.2"):
        with apply_cache(skip_model, CacheConfig(k=3)):
            pass


def test_skip_cache_on_vanilla_points_to_deep_reuse(plain_model):
    with pytest.raises(ValueError, match="deep-reuse"):
        with apply_skip_cache(plain_model, CacheConfig(k=2)):
            pass
    with torch.no_grad(), apply_cache(plain_model, CacheConfig(method="deep-reuse", k=1)):
        DIFF.sample(plain_model, SHAPE, Y, SC, seed=0)


def test_mask_of_wrong_length(skip_model):
    with pytest.raises(ValueError, match="3 steps .* 12"):
        Schedule.from_mask("FcF", DIFF.chain)
    with pytest.raises(ValueError, match="mask has 3 steps"):
        with torch.no_grad(), apply_cache(skip_model, CacheConfig(mask="FcF", k=1)):
            DIFF.sample(skip_model, SHAPE, Y, SC, seed=0)
    with pytest.raises(ValueError, match="'FxF'"):
        Schedule.from_mask("FxF")


def test_bad_preset_names():
    with pytest.raises(ValueError, match="'dit'"):
        preset("dit")
    with pytest.raises(ValueError, match="N2-700-50"):
        preset("N2-700")
    with pytest.raises(ValueError, match="inverted"):
        CacheRule(interval=2, t_start=50, t_stop=700)


# ------------------------------------------------------------------------ CLI
def test_cli_sweep_writes_labelled_outputs(tmp_path):
    import xarray as xr

    from smoothness.cache.cli import main
    ckpt = tmp_path / "mini-skip.pt"
    torch.save(tiny(True, depth=4).state_dict(), ckpt)
    main(["--ckpt", str(ckpt), "--num-sampling-steps", "4", "--intervals", "2", "--k", "1", "--classes", "1,2",
          "--per-class", "1", "--methods", "skip-cache,fora", "--out", str(tmp_path), "--name", "s"])
    ds = xr.open_dataset(tmp_path / "s.nc", engine="h5netcdf")
    assert ds.psnr.dims == ("model", "method", "setting", "seed")
    assert ds.config.sel({"method": "skip-cache", "setting": 0}).item() == "skip-cache_N2_20<t<1000_k1"
    assert list(ds.method.values) == ["skip-cache", "fora"] and ds.attrs["num_sampling_steps"] == 4
    assert int(ds.full_steps.sel({"method": "skip-cache"}).item()) == 2
    assert ds.step_cosine.dims[-1] == "step" and list(ds.timestep.values) == Diffusion.respaced(4).chain
    assert (tmp_path / "s.png").stat().st_size > 0 and b"plotly" in (tmp_path / "s.html").read_bytes()[:200000]
    ds.close()


@pytest.mark.parametrize("argv,words", [
    (["--intervals", "0"], "interval=0"),
    (["--k", "x"], "--k 'x'"),
    (["--methods", "warpcache"], "'warpcache'"),
    (["--windows", "700-50"], "inverted"),
    (["--windows", "20to1000"], "STOP-START"),
    (["--preset", "dit"], "unknown preset 'dit'"),
    (["--threads", "0"], "--threads=0"),
])
def test_cli_bad_input_exits_2(argv, words, capsys):
    from smoothness.cache.cli import main
    from smoothness.cli import run_cli
    assert run_cli(main, argv) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and err.count("\n") == 1


def test_a_one_sample_sweep_skips_the_frechet_distance_before_any_work(tmp_path, capsys):
    """The Frechet distance needs two samples; a valid one-sample sweep used to fail after all its work."""
    import numpy as np
    import xarray as xr

    from smoothness.cache.cli import main as cache_main
    from smoothness.cli import run_cli
    argv = ["--methods", "skip-cache", "--intervals", "2", "--num-sampling-steps", "4", "--per-class", "1",
            "--classes", "0", "--model", "digits-skip-dit", "--out", str(tmp_path)]
    assert run_cli(cache_main, argv) == 0
    out = capsys.readouterr().out
    assert out.index("skipping frechet") < out.index("uncached 4 steps")          # said before the work
    nc = tmp_path / "cache_sweep_digits-skip-dit_DDPM-4.nc"
    ds = xr.open_dataset(nc, engine="h5netcdf").load()
    assert "frechet" in ds.attrs["skipped_metrics"] and np.isnan(ds.frechet.values).all()
    assert np.isfinite(ds.psnr.values).all() and np.isfinite(ds.accuracy.values).all()
    assert ds.attrs["fingerprint"]
    assert run_cli(cache_main, argv + ["--seed", "1"]) == 2                        # another configuration
    assert "different configuration; pass --overwrite" in capsys.readouterr().err
