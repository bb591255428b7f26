"""The new caching methods against hand-worked examples: Delta-DiT's two stages, DBCache / FBCache's
per-row residual rule, MagCache's accumulated ratio error, TeaCache's accumulated rescaled change,
TaylorSeer / FoCa forecasts, and the calibration file (fits, checks, errors)."""
from types import SimpleNamespace

import numpy as np
import xarray as xr
import pytest
import torch

from smoothness import hooks
from smoothness.cache import CacheConfig, apply_cache, calibrate as cal_mod, forecast
from smoothness.cache.calibrate import Calibration, calibrate, load_calibration, weights_sha256
from smoothness.diffusion import Diffusion, SamplerConfig

pytestmark = pytest.mark.usefixtures("single_thread")   # conftest: one thread for tiny models


@pytest.fixture(scope="module")
def skip4(make_model):
    return make_model("DiT-Mini/2-skip", seed=1)         # depth 4: units 2, 3 fuse the skips of 1, 0


@pytest.fixture(scope="module")
def plain4(make_model):
    return make_model("DiT-Mini/2", seed=2)


def _raw(model, x, t, y):
    """Independent pieces on the raw modules: tokens, conditioning, fuse(j, deep, skip)."""
    h = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder(y)
    fuse = lambda j, deep, skip: model.skip_linears[j](model.skip_norms[j](torch.cat([deep, skip], -1)))
    head = lambda h: model.unpatchify(model.final_layer(h, c))
    return h, c, fuse, head


def _pair_of_calls(model, cfg, t):
    g = torch.Generator().manual_seed(4)
    x1, x2 = torch.randn(2, 2, 8, 8, generator=g), torch.randn(2, 2, 8, 8, generator=g)
    tt, y = torch.full((2,), t), torch.tensor([0, 2])
    with torch.no_grad(), apply_cache(model, cfg) as state:
        model(x1, tt, y)
        out2 = model(x2, tt, y)
    return state, (x1, x2, tt, y), out2


# ----------------------------------------------------------------------- Delta-DiT
def test_delta_dit_rear_stage_adds_the_rear_deviation(skip4):
    state, (x1, x2, t, y), out = _pair_of_calls(skip4, CacheConfig(method="delta-dit", interval=2, k=1), 700)
    assert [c.rows for c in state.calls] == [{"full": 2}, {"rear": 2}]
    b = skip4.blocks
    with torch.no_grad():
        h, c, fuse, head = _raw(skip4, x1, t, y)            # full call: rear deviation of unit 3 (pre-fusion input)
        o0 = b[0](h, c); o1 = b[1](o0, c); o2 = b[2](fuse(0, o1, o1), c)
        rear = b[3](fuse(1, o2, o0), c) - o2
        h, c, fuse, head = _raw(skip4, x2, t, y)            # cached: units 0..2 fresh, then + rear
        o0 = b[0](h, c); o1 = b[1](o0, c); o2 = b[2](fuse(0, o1, o1), c)
        want = head(o2 + rear)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)


def test_delta_dit_front_stage_adds_the_front_deviation(skip4):
    state, (x1, x2, t, y), out = _pair_of_calls(skip4, CacheConfig(method="delta-dit", interval=2, k=1), 300)
    assert [c.rows for c in state.calls] == [{"full": 2}, {"front": 2}]
    b = skip4.blocks
    with torch.no_grad():
        h, c, fuse, head = _raw(skip4, x1, t, y)
        old0 = b[0](h, c)
        front = old0 - h                                    # deviation of unit 0; its skip is kept too
        h, c, fuse, head = _raw(skip4, x2, t, y)
        o0 = h + front
        o1 = b[1](o0, c); o2 = b[2](fuse(0, o1, o1), c)
        want = head(b[3](fuse(1, o2, old0), c))            # unit 3 fuses the stale skip of unit 0
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)


# ------------------------------------------------------------- DBCache / FBCache
def test_dbcache_decides_per_row_from_the_residual_change(plain4):
    """Row 0 barely changes (cached: front + stored R_mid, then the back unit), row 1 changes a lot
    (computed in full); d by hand is the rule's mean|r - r_ref| / mean|r_ref|."""
    g = torch.Generator().manual_seed(5)
    x1 = torch.randn(2, 2, 8, 8, generator=g)
    x2 = x1.clone()
    x2[0] += 1e-3 * torch.randn(2, 8, 8, generator=g)
    x2[1] = torch.randn(2, 8, 8, generator=g)
    t, y = torch.full((2,), 400), torch.tensor([1, 2])
    cfg = CacheConfig(method="dbcache", threshold=0.05, warmup=0)            # Fn = Bn = 1
    with torch.no_grad(), apply_cache(plain4, cfg) as state:
        plain4(x1, t, y)
        out = plain4(x2, t, y)
    b = plain4.blocks
    with torch.no_grad():
        h, c, _, head = _raw(plain4, x1, t, y)
        f1 = b[0](h, c); r1 = f1 - h
        mid1 = b[2](b[1](f1, c), c) - f1                    # R_mid = h_in(3) - h_out(0)
        h, c, _, head = _raw(plain4, x2, t, y)
        f2 = b[0](h, c); r2 = f2 - h
        d = (r2 - r1).abs().mean((1, 2)) / r1.abs().mean((1, 2))
        assert d[0] < 0.05 < d[1]
        cached_row0 = head(b[3](f2 + mid1, c))[0]
        full_row1 = plain4(x2, t, y)[1]
    assert state.calls[1].rows == {"full": 1, "cached": 1} and state.mask == "Fm"
    torch.testing.assert_close(out[0], cached_row0, rtol=0, atol=1e-6)
    torch.testing.assert_close(out[1], full_row1, rtol=0, atol=1e-6)


def test_max_cached_and_warmup_force_full_steps(plain4):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 2, 8, 8, generator=g)
    t, y = torch.full((2,), 400), torch.tensor([1, 2])

    def mask(**kw):
        with torch.no_grad(), apply_cache(plain4, CacheConfig(method="dbcache", threshold=10.0, **kw)) as state:
            for s in range(1, 8):
                with hooks.step_scope(s, 400):
                    plain4(x, t, y)
        return state.mask
    assert mask(warmup=0) == "Fcccccc"
    assert mask(warmup=0, max_cached=2) == "FccFccF"
    assert mask(warmup=3, max_cached=2) == "FFFccFc"


def test_fbcache_reuses_the_whole_tail(plain4):
    state, (x1, x2, t, y), out = _pair_of_calls(plain4, CacheConfig(method="fbcache", threshold=100.0), 400)
    b = plain4.blocks
    with torch.no_grad():
        h, c, _, head = _raw(plain4, x1, t, y)
        f1 = b[0](h, c)
        tail = b[3](b[2](b[1](f1, c), c), c) - f1
        h, c, _, head = _raw(plain4, x2, t, y)
        want = head(b[0](h, c) + tail)
    assert state.mask == "Fc"
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)


# --------------------------------------------------------------------- MagCache
def _chain(n=6):
    sampler = SamplerConfig(num_steps=n, cfg_scale=2.0)
    return sampler, Diffusion.for_config(sampler)


def _fake_calibration(model, diffusion, gammas=None, coefficients=(0.0, 0.0, 0.0, 1.0, 0.0)):
    gammas = gammas or [1.0] * len(diffusion.chain)
    return Calibration(weights_sha256(model), "DDPM-6", tuple(diffusion.chain), 2.0, 0, tuple(coefficients),
                       {"cond": gammas, "uncond": gammas})


def test_magcache_accumulates_the_ratio_error_by_hand(plain4):
    """gamma 0.95, 0.95, 0.8, 1, 1 after step 1, tau 0.15, K 2: R .95 E .05 (reuse), R .9025 E .1475
    (reuse), R .722 E .4255 (compute, reset), R 1 E 0 (reuse), n = 2 (reuse) -> FccFcc."""
    sampler, diffusion = _chain(6)
    cal = _fake_calibration(plain4, diffusion, [1.0, 0.95, 0.95, 0.8, 1.0, 1.0])
    cfg = CacheConfig(method="magcache", threshold=0.15, max_cached=2, retention=0.0, calibration=cal)
    with torch.no_grad(), apply_cache(plain4, cfg) as state:
        diffusion.sample(plain4, (2, 2, 8, 8), torch.tensor([0, 1]), sampler, seed=0)
    assert state.mask == "FccFcc"
    tight = CacheConfig(method="magcache", threshold=0.15, max_cached=1, retention=0.0, calibration=cal)
    with torch.no_grad(), apply_cache(plain4, tight) as state:
        diffusion.sample(plain4, (2, 2, 8, 8), torch.tensor([0, 1]), sampler, seed=0)
    assert state.mask == "FcFFcF"                          # n <= 1: every second step; step 4's error
    kept = CacheConfig(method="magcache", threshold=0.15, max_cached=2, retention=0.5, calibration=cal)
    with torch.no_grad(), apply_cache(plain4, kept) as state:
        diffusion.sample(plain4, (2, 2, 8, 8), torch.tensor([0, 1]), sampler, seed=0)
    assert state.mask == "FFFFcc"          # round(0.5 * 6) = 3 steps retained; step 4: R .8, E .2 > tau


def test_magcache_cached_call_is_input_plus_stored_residual(plain4):
    sampler, diffusion = _chain(6)
    cal = _fake_calibration(plain4, diffusion)
    g = torch.Generator().manual_seed(7)
    x1, x2 = torch.randn(4, 2, 8, 8, generator=g), torch.randn(4, 2, 8, 8, generator=g)
    y = torch.tensor([0, 1, 3, 3])
    cfg = CacheConfig(method="magcache", threshold=0.5, retention=0.0, calibration=cal)
    with torch.no_grad(), apply_cache(plain4, cfg) as state, hooks.cfg_scope(2):
        for s, x in ((1, x1), (2, x2)):
            t = torch.full((4,), diffusion.chain[s - 1])
            with hooks.step_scope(s, int(t[0])):
                out = plain4(x, t, y)
    with torch.no_grad():
        h, c, _, head = _raw(plain4, x1, torch.full((4,), diffusion.chain[0]), y)
        resid = plain4.blocks[3](plain4.blocks[2](plain4.blocks[1](plain4.blocks[0](h, c), c), c), c) - h
        h, c, _, head = _raw(plain4, x2, torch.full((4,), diffusion.chain[1]), y)
        want = head(h + resid)
    assert state.mask == "Fc"
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)


# --------------------------------------------------------------------- TeaCache
def test_teacache_accumulates_the_rescaled_change_by_hand(plain4):
    """A constant polynomial 0.1 and tau 0.25: the sum passes tau every third step; the first and
    the last step always compute."""
    sampler, diffusion = _chain(8)
    cal = _fake_calibration(plain4, diffusion, coefficients=(0.0, 0.0, 0.0, 0.0, 0.1))
    cfg = CacheConfig(method="teacache", threshold=0.25, calibration=cal)
    with torch.no_grad(), apply_cache(plain4, cfg) as state:
        diffusion.sample(plain4, (2, 2, 8, 8), torch.tensor([0, 1]), sampler, seed=0)
    assert state.mask == "FccFccFF"


def test_teacache_signal_is_the_relative_change_of_the_modulated_input(plain4):
    sampler, diffusion = _chain(8)
    cal = _fake_calibration(plain4, diffusion)                # identity polynomial: acc = sum of rel-L1
    g = torch.Generator().manual_seed(8)
    xs = [torch.randn(4, 2, 8, 8, generator=g) for _ in range(2)]
    y = torch.tensor([0, 1, 3, 3])
    with torch.no_grad(), apply_cache(plain4, CacheConfig(method="teacache", threshold=100.0,
                                                          calibration=cal)) as state, hooks.cfg_scope(2):
        for s, x in enumerate(xs, start=1):
            t = torch.full((4,), diffusion.chain[s - 1])
            with hooks.step_scope(s, int(t[0])):
                plain4(x, t, y)
        acc = state.rows["acc"].clone()
    with torch.no_grad():
        blk = plain4.blocks[0]
        ms = []
        for s, x in enumerate(xs, start=1):
            h, c, _, _ = _raw(plain4, x, torch.full((4,), diffusion.chain[s - 1]), y)
            shift, scale = blk.adaLN_modulation(c).chunk(6, dim=1)[:2]
            ms.append(blk.norm1(h) * (1 + scale[:, None]) + shift[:, None])
        rel = (ms[1] - ms[0]).abs().mean((1, 2)) / ms[0].abs().mean((1, 2))
    torch.testing.assert_close(acc, rel.double(), rtol=1e-6, atol=0)


# --------------------------------------------------------------------- forecasts
@pytest.mark.parametrize("how,want", [("reuse", 25.0), ("taylor1", 33.0), ("taylor2", 34.0), ("foca", 31.0)])
def test_forecasts_of_a_quadratic_by_hand(how, want):
    """F(s) = s^2 stored at steps 1, 3, 5, read at step 6: D1 = 8, D1' = 4, D2 = (8 - 4) / 2 = 2;
    taylor1 25 + 8, taylor2 25 + 8 + 2/2, foca 25 + (8 + 4)/2."""
    state = SimpleNamespace(config=SimpleNamespace(forecast=how), history={}, position=0)
    for s in (1, 3, 5):
        state.position = s
        forecast.remember(state, "h", torch.tensor(float(s * s)))
    state.position = 6
    assert forecast.recall(state, "h", torch.tensor(25.0)).item() == want


@pytest.mark.parametrize("how", ["reuse", "taylor1", "taylor2", "foca"])
def test_per_row_forecasts_follow_each_rows_own_full_steps(how):
    """Row 0 was full at steps 1, 3, 5 (F = s^2), row 1 only at steps 4, 5 (F = 10 s): at step 6 row 0
    gets the hand-worked quadratic forecast and row 1 its order-1 (or plain) one."""
    rows = {}
    for s in (1, 3, 4, 5):
        mask = torch.tensor([s in (1, 3, 5), s in (4, 5)])
        value = torch.tensor([[float(s * s)], [10.0 * s]])          # (N, 1)
        forecast.remember_rows(rows, "mid", value, mask, s)
    got = forecast.recall_rows(how, rows, "mid", torch.tensor([[25.0], [50.0]]), 6)
    want0 = {"reuse": 25.0, "taylor1": 33.0, "taylor2": 34.0, "foca": 31.0}[how]
    want1 = {"reuse": 50.0}.get(how, 60.0)                           # one slope: all orders reduce to order 1
    assert got[:, 0].tolist() == [want0, want1]


def test_forecasting_starts_after_two_full_steps(skip4):
    """Skip-Cache + taylor1 at N = 2: step 2 has one full step behind it (plain reuse), step 4 has
    two (a forecast), so the model outputs agree with plain reuse up to step 3 and differ at step 4."""
    sampler, diffusion = _chain(6)

    def outputs(cfg):
        with torch.no_grad(), apply_cache(skip4, cfg) as state:
            steps = list(diffusion.sample_steps(skip4, (2, 2, 8, 8), torch.tensor([0, 1]), sampler, seed=0))
        return [s.model_output for s in steps], state
    plain, _ = outputs(CacheConfig(method="skip-cache", interval=2, k=1, t_stop=-1))
    fore, state = outputs(CacheConfig(method="skip-cache", interval=2, k=1, t_stop=-1, forecast="taylor1"))
    assert [s for s, _ in state.history["h"]] == [1, 3, 5] and state.mask == "FcFcFc"
    assert all(torch.equal(a, b) for a, b in zip(plain[:3], fore[:3]))
    assert not torch.equal(plain[3], fore[3])


# ------------------------------------------------------------------ calibration
def test_calibration_fits_by_hand_and_round_trips(plain4, tmp_path):
    sampler, diffusion = _chain(6)
    y = torch.tensor([0, 1])
    cal = calibrate(plain4, diffusion, (2, 2, 8, 8), y, sampler, seed=3, budgets=(0.5,))
    with torch.no_grad(), hooks.record(plain4, ["embed", "blocks.3", "output"]) as rec:
        diffusion.sample(plain4, (2, 2, 8, 8), y, sampler, seed=3)
    r = [b - e for b, e in zip(rec["blocks.3"], rec["embed"])]             # (4, T, H) per step, [cond; uncond]
    for half, rows in (("cond", slice(0, 2)), ("uncond", slice(2, 4))):
        want = [1.0] + [float((r[s][rows].norm(dim=-1) / r[s - 1][rows].norm(dim=-1)).mean()) for s in range(1, 6)]
        np.testing.assert_allclose(cal.magcache[half], want, rtol=1e-5)
    assert cal.timesteps == tuple(diffusion.chain) and cal.seed == 3 and cal.model_sha256 == weights_sha256(plain4)
    assert len(cal.teacache) == 5 and cal.masks["0.5"]["mask"][0] == "1" and cal.masks["0.5"]["mask"].count("1") <= 3
    back = load_calibration(cal.save(tmp_path / "c.json"))
    assert back == cal
    assert CacheConfig(method="magcache", calibration=str(tmp_path / "c.json")).calibration == cal   # read once
    with pytest.raises(ValueError, match="cannot be read"):
        CacheConfig(method="magcache", calibration=str(tmp_path / "missing.json"))
    sched = back.schedule(0.5)                                  # the mask drives any static method
    with torch.no_grad(), apply_cache(plain4, CacheConfig(method="fora", mask=sched)) as state:
        diffusion.sample(plain4, (2, 2, 8, 8), y, sampler, seed=3)
    assert state.schedule.full == sched.full
    with pytest.raises(ValueError, match="budget 0.3 is not in the calibration file"):
        back.schedule(0.3)


def test_mask_budgets_by_hand():
    """r_s = s: the error of reusing step j at step s is (s - j) / j. Budget 0.5 of 6 steps: alpha 1/3
    computes 1, 2, 3 (1 > 1/3, 1/2 > 1/3) and more; alpha 1/2 computes 1, 2 (1), 4 ((4-2)/2 = 1), not 3
    (1/2), 5 (1/4) or 6 (2/4): three steps."""
    rs = [torch.full((1, 2, 2), float(s)) for s in range(1, 7)]
    masks = cal_mod._masks(rs, 1, (0.5, 1.0))
    assert masks["0.5"] == {"mask": "110100", "alpha": 0.5}
    assert masks["1"]["mask"] == "111111"


def test_calibration_mismatch_is_one_line(plain4, skip4):
    sampler, diffusion = _chain(6)
    cal = _fake_calibration(plain4, diffusion)
    with pytest.raises(ValueError, match="calibration file made for model .* but this model is"):
        with apply_cache(skip4, CacheConfig(method="magcache", calibration=cal)):
            pass
    other_sampler, other = _chain(5)
    with pytest.raises(ValueError, match="made for chain DDPM-6"):
        with torch.no_grad(), apply_cache(plain4, CacheConfig(method="magcache", calibration=cal)):
            other.sample(plain4, (2, 2, 8, 8), torch.tensor([0, 1]), other_sampler, seed=0)
    with pytest.raises(ValueError, match="needs a calibration file"):
        CacheConfig(method="teacache").check(plain4)


@pytest.mark.parametrize("kwargs,words", [
    (dict(method="fbcache", threshold=-0.1), "threshold=-0.1"),
    (dict(method="skip-cache", forecast="taylor3"), "forecast='taylor3'"),
    (dict(method="magcache", forecast="taylor1"), "does not reuse features to forecast"),
    (dict(method="dbcache", mask="FcFc"), "cannot follow a fixed mask"),
    (dict(method="delta-dit", boundary=2000), "boundary=2000"),
])
def test_bad_settings_are_one_line(kwargs, words):
    with pytest.raises(ValueError) as e:
        CacheConfig(**kwargs)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_skip_dit_pairing_needs_bn_at_most_fn(skip4):
    with pytest.raises(ValueError, match="bn=2 > fn=1"):
        CacheConfig(method="dbcache", fn=1, bn=2).check(skip4)
    CacheConfig(method="dbcache", fn=2, bn=2).check(skip4)                # Fn = Bn = k: Skip-Cache's pattern


# --------------------------------------------------------------------------- CLI
def test_calibrate_cli_writes_a_file_the_sweep_reads_back(tmp_path, make_model, capsys):
    from smoothness.cache.cli import main
    from smoothness.cli import run_cli
    model = make_model("DiT-Mini/2", num_classes=3, in_channels=1)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    common = ["--num-sampling-steps", "5", "--classes", "0,1", "--per-class", "1"]
    assert run_cli(main, ["calibrate", "--ckpt", str(tmp_path / "m.pt"), *common, "--budgets", "0.5",
                          "--out", str(tmp_path / "cal.json")]) == 0
    cal = load_calibration(tmp_path / "cal.json")
    assert cal.chain == "DDPM-5" and cal.cfg_scale == 3.0 and list(cal.masks) == ["0.5"] and len(cal.file_sha256) == 64
    sweep = ["--ckpt", str(tmp_path / "m.pt"), *common, "--methods", "magcache,teacache", "--out", str(tmp_path),
             "--name", "s", "--calibration", str(tmp_path / "cal.json")]
    assert run_cli(main, sweep) == 0
    ds = xr.load_dataset(tmp_path / "s.nc", engine="h5netcdf")
    assert load_calibration_text(ds.attrs["calibration_m_seed0"]) == cal
    capsys.readouterr()
    assert run_cli(main, sweep[:1] + sweep[1:2] + ["--num-sampling-steps", "6"] + sweep[4:]) == 2    # other chain
    err = capsys.readouterr().err
    assert "made for chain DDPM-5" in err and err.count("\n") == 1
    other = make_model("DiT-Mini/2", num_classes=3, in_channels=1, seed=9)
    torch.save(other.state_dict(), tmp_path / "o.pt")
    assert run_cli(main, ["--ckpt", str(tmp_path / "o.pt")] + sweep[2:]) == 2                         # other model
    assert "calibration file made for model" in capsys.readouterr().err


def load_calibration_text(text):
    import json
    data = json.loads(text)
    data["timesteps"], data["teacache"] = tuple(data["timesteps"]), tuple(data["teacache"])
    return Calibration(**data)


@pytest.mark.parametrize("argv,words", [
    (["--methods", "skip-cache+taylor3"], "taylor3"),
    (["--thresholds", "-0.1"], "threshold -0.1"),
    (["--methods", "magcache+taylor1"], "does not reuse features to forecast"),
    (["calibrate", "--budgets", "1.5"], "budget 1.5"),
    (["calibrate", "--model", "digits-dit", "--model", "digits-skip-dit"], "one model"),
])
def test_cli_errors_are_one_line(argv, words, capsys, tmp_path):
    from smoothness.cache.cli import main
    from smoothness.cli import run_cli
    assert run_cli(main, argv + ["--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1 and "Traceback" not in err
