"""The cache planner (smoothness.plan): budget met exactly in MACs, a known optimum found, the DP
equal to exhaustive search, the profile's cost equal to counted forward passes, and one-line errors."""
import itertools

import numpy as np
import pytest
import torch
import xarray as xr

from smoothness.cache import CacheConfig
from smoothness.cache.flops import Shape, call_macs, schedule_cost
from smoothness.cli import run_cli
from smoothness.diffusion import Diffusion, SamplerConfig
from smoothness.models import ModelEntry
from smoothness.plan import Calibration, PlanConfig, ProfileConfig, best_mask, check_profile, plan, profile
from smoothness.plan.cli import main
from smoothness.plan.planner import check_budget, proxy
from smoothness.plan.references import Context, REFERENCES, measure_edges

pytestmark = pytest.mark.usefixtures("single_thread")
SHORT = SamplerConfig(num_steps=6, cfg_scale=2.0, clip_denoised=True)


def synthetic_profile(change, units=4, gain=1.0, steps_label=None) -> xr.Dataset:
    """A profile with every unit changing by ``change[s]`` at step s (1-based) and a constant gain."""
    S = len(change)
    ch = np.repeat(np.asarray(change, float)[:, None, None], units, axis=1)       # (step, unit, seed)
    ds = xr.Dataset({"change": (("step", "unit", "seed"), ch),
                     "gain": (("step", "unit", "seed"), np.full((S, units, 1), gain))},
                    coords={"step": np.arange(1, S + 1), "unit": np.arange(units), "seed": [0]})
    ds.attrs.update(sampler="ddpm", chain=steps_label or f"DDPM-{S}", cfg_scale=1.0, model="synthetic")
    return ds


def naive_cost(cost, mask):
    """Sum of cost[last full, s] over cached s, written out independently of the planner."""
    total, last = 0.0, None
    for s, full in enumerate(mask):
        if full:
            last = s
        else:
            total += cost[last][s]
    return total


def exhaustive(cost, cached, max_run):
    S, best = cost.shape[0], (np.inf, None)
    for rest in itertools.product([True, False], repeat=S - 1):
        mask = (True,) + rest
        runs = "".join("F" if f else "c" for f in mask).split("F")
        if mask.count(False) != cached or max(len(r) for r in runs) > max_run:
            continue
        best = min(best, (naive_cost(cost, mask), mask))
    return best


# ------------------------------------------------------------------ budget and optimum
@pytest.mark.parametrize("budget", [1.2, 1.5, 1.65])
def test_planner_meets_the_budget_exactly_in_macs(tiny_skip, budget):
    S = 12
    prof = synthetic_profile(np.linspace(0.01, 0.1, S))
    p = plan(tiny_skip, prof, budget, Calibration(1.0, 1.0), PlanConfig(max_run=10))
    timesteps = Diffusion.respaced(S).chain
    macs = schedule_cost(tiny_skip, p.config, timesteps).attrs
    # independent count: per-step MACs from the per-call counts
    shape = Shape.of(tiny_skip)
    full, cached = call_macs(shape), call_macs(shape, "skip-cache", p.config.k, False)
    n_c = p.schedule.num_cached
    assert macs["total_macs"] == (S - n_c) * full + n_c * cached
    assert S * full / macs["total_macs"] >= budget
    assert S * full / ((S - n_c + 1) * full + (n_c - 1) * cached) < budget        # one cached step fewer misses it
    assert p.theoretical_speedup == pytest.approx(macs["theoretical_speedup"])


def test_planner_finds_the_known_optimum_of_a_synthetic_profile(tiny):
    # Features jump at steps 4 and 8: caching either costs ~5; every other step drifts by 0.01.
    change = [0.0, 0.01, 0.01, 5.0, 0.01, 0.01, 0.01, 5.0]
    prof = synthetic_profile(change)
    shape = Shape.of(tiny)
    full, cached = call_macs(shape), call_macs(shape, "fora", 1, False)
    budget = 8 * full / (3 * full + 5 * cached)                                     # exactly 5 cached steps
    p = plan(tiny, prof, budget, Calibration(1.0, 1.0), PlanConfig(method="fora"))
    assert p.schedule.mask == "FccFcccF"
    # the predicted error, by hand: 4 units x gain 1 x drift (0.01, 0.02 | 0.01, 0.02, 0.03)
    assert p.predicted_error == pytest.approx(4 * 0.09)


def test_dp_equals_exhaustive_search_on_random_costs():
    rng = np.random.default_rng(0)
    for S, max_run in ((7, 2), (9, 3), (8, 7)):
        cost = rng.random((S, S))
        for cached in range(0, S - -(-S // (max_run + 1)) + 1):
            mask, total = best_mask(cost, cached, max_run)
            want, want_mask = exhaustive(cost, cached, max_run)
            assert total == pytest.approx(want)
            assert naive_cost(cost, mask) == pytest.approx(want)
            assert mask.count(False) == cached and mask[0]


def test_oracle_search_equals_exhaustive_search_on_a_short_chain(tiny_skip):
    edges, passes = measure_edges(tiny_skip, "skip-cache", [1], SHORT, seed=0, class_label=1, max_run=5)
    cost = edges[1]
    assert passes == 6 + sum(1 + min(5, 6 - f) for f in range(1, 6))
    assert np.isfinite(cost[np.triu_indices(6, 1)]).all() and (cost[np.triu_indices(6, 1)] > 0).all()
    ctx = Context(tiny_skip, SHORT, PlanConfig(max_run=5), seed=0, class_label=1)
    ctx.measured, ctx.measured_passes = edges, passes
    shape = Shape.of(tiny_skip)
    full, cached = call_macs(shape), call_macs(shape, "skip-cache", 1, False)
    for n in range(1, 6):
        budget = 6 * full / ((6 - n) * full + n * cached)
        got = REFERENCES["oracle"].build(ctx, budget).configs[0]
        want, want_mask = exhaustive(cost, n, 5)
        assert naive_cost(cost, got.mask.full) == pytest.approx(want)


# ------------------------------------------------------------------ profile
def test_profile_cost_matches_counted_forward_passes(tiny_skip):
    cfg = ProfileConfig(sampler=SHORT, probes=2, calib_ks=(1,), calib_gaps=2, seeds=(0, 1), class_label=1)
    rows = []
    handle = tiny_skip.final_layer.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    try:
        ds = profile(ModelEntry("tiny", tiny_skip, "", "abc"), cfg)
    finally:
        handle.remove()
    passes = sum(rows) // 2                                                      # CFG: 2 rows per pass
    assert ds.attrs["cost_profile_passes"] + ds.attrs["cost_calibration_passes"] == passes
    assert ds.attrs["cost_chain_passes"] == 2 * 6
    assert ds.attrs["cost_probe_passes"] == 2 * 2 * 4 * 2                    # seeds x probes x units x alphas
    assert dict(ds.sizes) == {"step": 6, "unit": 4, "seed": 2, "probe_step": 2, "alpha": 2, "calib_k": 1, "gap": 2}
    assert np.isfinite(ds.change.isel(step=slice(1, None))).all() and np.isnan(ds.change.isel(step=0)).all()
    assert (ds.gain > 0).all()
    cal = Calibration.fit(ds)
    assert cal.b >= 0 and cal.points == 2 * 2


def test_default_profile_costs_at_most_three_chains_on_the_bundled_sizes():
    from smoothness.models import bundled
    for name in bundled.diffusion_models():
        model = bundled.load(name)
        sampler = ProfileConfig().sampler if model.config.num_classes else SamplerConfig(num_steps=50)
        cost = ProfileConfig(sampler=sampler).cost(model)
        assert cost["chain"] + cost["probes"] <= 3 * 50 and cost["calibration"] <= 50


def test_proxy_is_gain_times_summed_changes():
    prof = synthetic_profile([0.0, 0.1, 0.2, 0.3], units=4, gain=2.0)
    x = proxy(prof, "skip-cache", 1)                                            # site: unit 4 - 1 - 1 = 2
    assert x[0, 3] == pytest.approx(2.0 * (0.1 + 0.2 + 0.3))
    assert x[1, 2] == pytest.approx(2.0 * 0.2)
    assert np.isnan(x[2, 1])
    assert proxy(prof, "fora", 1)[0, 3] == pytest.approx(4 * x[0, 3])


def test_calibration_recovers_a_power_law():
    prof = synthetic_profile([0.0, 0.1, 0.2, 0.3, 0.4, 0.5], units=4, gain=1.5)
    x = proxy(prof, "skip-cache", 1)
    err = np.array([[[3.0 * x[f - 1, f - 1 + g] ** 0.5] for g in (1, 2)] for f in (1, 2, 3)])[None]
    prof["calib_error"] = (("calib_k", "probe_step", "gap", "seed"), err)
    prof = prof.assign_coords(calib_k=[1], probe_step=[1, 2, 3], gap=[1, 2])
    prof.attrs["calib_method"] = "skip-cache"
    cal = Calibration.fit(prof)
    assert (cal.a, cal.b) == (pytest.approx(3.0), pytest.approx(0.5))
    assert cal(np.array([4.0]))[0] == pytest.approx(6.0)


# ------------------------------------------------------------------ errors
def test_budget_errors_name_the_reachable_maximum(tiny_skip):
    with pytest.raises(ValueError, match="use a speedup >= 1"):
        check_budget(tiny_skip, 0.9, "skip-cache", [1], 50, 10)
    with pytest.raises(ValueError, match=r"at most \d+\.\d+x"):
        check_budget(tiny_skip, 50.0, "skip-cache", [1], 50, 10)


def test_profile_errors(tiny_skip):
    prof = synthetic_profile([0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
    prof.attrs.update(model_sha256="aaa", chain="DDPM-6", cfg_scale=2.0)
    check_profile(prof, ModelEntry("m", tiny_skip, "", "aaa"), SHORT)            # fits
    with pytest.raises(ValueError, match="another model"):
        check_profile(prof, ModelEntry("m", tiny_skip, "", "bbb"), SHORT)
    with pytest.raises(ValueError, match="another sampler chain"):
        check_profile(prof, ModelEntry("m", tiny_skip, "", "aaa"), SamplerConfig(num_steps=7, cfg_scale=2.0))
    with pytest.raises(ValueError, match="empty"):
        check_profile(prof.isel(step=slice(0, 0)), ModelEntry("m", tiny_skip, "", "aaa"), SHORT)


def test_cli_errors_are_one_line_exit_2(tmp_path, capsys):
    assert run_cli(main, ["--model", "digits-skip-dit", "--budget", "0.5", "--out", str(tmp_path)]) == 2
    assert run_cli(main, ["--model", "digits-skip-dit", "--budget", "99", "--out", str(tmp_path)]) == 2
    fake = synthetic_profile([0.0] + [0.1] * 49, units=12)
    fake.attrs.update(model_sha256="0" * 64, chain="DDPM-50", cfg_scale=3.0)
    fake.to_netcdf(tmp_path / "p.nc", engine="h5netcdf")
    assert run_cli(main, ["--model", "digits-skip-dit", "--budget", "2", "--profile", str(tmp_path / "p.nc"),
                          "--out", str(tmp_path)]) == 2
    fake.isel(step=slice(0, 0)).to_netcdf(tmp_path / "e.nc", engine="h5netcdf")
    assert run_cli(main, ["--model", "digits-skip-dit", "--budget", "2", "--profile", str(tmp_path / "e.nc"),
                          "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("error: ") for line in err)
    assert "at most 3.98" in err[1] and "another model" in err[2] and "empty" in err[3]


def test_evaluate_runs_every_row_and_writes_table_and_figure(make_model, tmp_path):
    from smoothness.plan.cli import write_evaluation
    from smoothness.plan.evaluate import EvaluateConfig, evaluate
    entries = [ModelEntry("plain", make_model("DiT-Mini/2", in_channels=1)),
               ModelEntry("skip", make_model("DiT-Mini/2-skip", seed=1, in_channels=1))]
    cfg = EvaluateConfig(budgets=(1.3,), seeds=(1, 2), classes=(0, 1),
                         profile=ProfileConfig(sampler=SHORT, probes=2, calib_gaps=2), plan=PlanConfig(max_run=3),
                         references=("oracle", "uniform", "magcache", "dbcache"))
    ds = evaluate(entries, cfg, log=None)
    assert list(ds.planner.values) == ["planner", "planner-other", "oracle", "uniform", "magcache", "dbcache"]
    static = ds.sel(planner=["planner", "planner-other", "oracle", "uniform"])
    assert np.isfinite(static.psnr).all() and (static.theoretical_speedup >= 1.3).all()
    assert (static.k.sel(model="plain") == -1).all()                             # FORA on the vanilla model
    for m in ("plain", "skip"):                      # counted on the calls made = the schedule's MACs, CFG rows
        r = ds.sel(model=m, planner="oracle", budget=1.3)
        cache = CacheConfig(method="fora" if m == "plain" else "skip-cache", k=max(int(r.k), 1), mask=r.mask.item())
        want = schedule_cost(entries[m == "skip"].model, cache, Diffusion.respaced(6).chain, batch=4)
        assert float(r.theoretical_speedup[0]) == pytest.approx(want.attrs["theoretical_speedup"])
    assert np.isfinite(ds.psnr.sel(planner="magcache")).all() and np.isfinite(ds.threshold.sel(planner="magcache")).all()
    assert np.isnan(ds.psnr.sel(planner="dbcache")).all()                        # warm-up 8 > 6 steps: never caches
    assert all("reaches at most 1.000x" in str(n) for n in ds.note.sel(planner="dbcache").values.ravel())
    oracle = ds.calibration_passes.sel(planner="oracle", model="skip").item()
    assert oracle == 6 + sum(1 + min(3, 6 - f) for f in range(1, 6))
    paths = write_evaluation(ds, tmp_path, "ev")
    text = paths[1].read_text()
    assert all(p.is_file() for p in paths) and "| skip | 1.3x | oracle |" in text
    assert "| skip | 1.3x | dbcache | - | not run: dbcache reaches at most 1.000x" in text


def test_cli_plans_and_exports_every_format(tmp_path, capsys):
    import json
    from smoothness.cache import Schedule
    args = ["--model", "digits-skip-dit", "--budget", "1.5", "--num-sampling-steps", "8", "--probes", "2",
            "--calib-gaps", "2", "--out", str(tmp_path)]
    assert run_cli(main, args) == 0
    out = capsys.readouterr().out
    mask = next(line.split()[2] for line in out.splitlines() if line.startswith("skip-cache k="))
    dit = next(line.split()[-1] for line in out.splitlines() if "steps_computation_mask" in line)
    sched = Schedule.from_json((tmp_path / "plan_digits-skip-dit.json").read_text())
    assert sched.mask == mask and sched.to_cache_dit() == dit and len(sched) == 8
    assert (tmp_path / "profile_digits-skip-dit.nc").is_file()
    assert run_cli(main, args + ["--profile", str(tmp_path / "profile_digits-skip-dit.nc")]) == 0   # reuses it
    assert mask in capsys.readouterr().out
