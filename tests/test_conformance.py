"""Every registered caching method passes the public conformance suite (smoothness.cache.conformance),
and the suite itself can fail: deliberately broken methods are caught, one check each."""
import pytest
import torch

from smoothness import hooks
from smoothness.cache import REGISTRY, CacheConfig, Method, apply_cache, conformance, register
from smoothness.cache.base import CacheState, method_names

pytestmark = pytest.mark.usefixtures("single_thread")   # conftest: one thread for tiny models


@pytest.fixture(scope="module")
def skip_dit(make_model):
    return make_model("DiT-Mini/2-skip", seed=1)


@pytest.fixture(scope="module")
def dit(make_model):
    return make_model("DiT-Mini/2", seed=2)


@pytest.mark.parametrize("check", list(conformance.CHECKS))
@pytest.mark.parametrize("name", method_names())
def test_every_method_conforms_on_skip_dit(skip_dit, name, check):
    assert conformance.run(skip_dit, name, checks=[check]) == {}


@pytest.mark.parametrize("name", [n for n in method_names() if n != "skip-cache"])
def test_every_method_conforms_on_dit(dit, name):
    assert conformance.run(dit, name, checks=["disabled_is_plain", "caches", "batch_is_rows",
                                              "macs_match_counted"]) == {}


@pytest.mark.parametrize("forecast", ["taylor1", "taylor2", "foca"])
@pytest.mark.parametrize("name", [n for n in method_names() if "forecast" in REGISTRY[n].uses])
def test_forecasting_variants_conform(skip_dit, name, forecast):
    setup = conformance.Setup(settings=(("forecast", forecast),))
    assert conformance.run(skip_dit, name, setup, checks=["disabled_is_plain", "caches", "reused_equals_fresh",
                                                         "batch_is_rows", "exception_leaves_nothing"]) == {}


@pytest.mark.parametrize("name", [n for n in method_names() if "forecast" in REGISTRY[n].uses])
def test_forecasting_changes_what_a_method_reuses(skip_dit, name):
    """With two full steps behind a cached one, a forecast differs from plain reuse (it is wired in)."""
    reuse = conformance.configs(skip_dit, name)[1]
    fore = conformance.configs(skip_dit, name, conformance.Setup(settings=(("forecast", "taylor1"),)))[1]
    a, _ = conformance._sample(skip_dit, conformance.Setup(), reuse)
    b, state = conformance._sample(skip_dit, conformance.Setup(), fore)
    assert state.num_cached > 0 and not torch.equal(a, b)


# ------------------------------------------------------------ the suite can fail
class _Broken(Method):
    """Skip-Cache's schedule; ``flaw`` picks what goes wrong."""

    uses = ("interval", "window")
    disabled = {"interval": 1}
    example = {"interval": 2, "t_stop": -1}
    flaw = ""

    def forward(self, model, state, x, t, y, full):
        if self.flaw == "leak" and not full:
            x = x + x.mean(0, keepdim=True)                   # rows see each other
        if self.flaw == "stale" and state.payload is not None and not full:
            x = x + 0.1 * state.payload["x"]
        out = super().forward(model, state, x, t, y, full)
        if full and self.flaw == "stale":
            state.payload["x"] = x
        if self.flaw == "always-different":
            out = out + 1e-3
        return out

    def call_macs(self, shape, config, kind):
        return shape.full_call() // (2 if self.flaw == "macs" and kind == "cached" else 1)


@pytest.fixture
def broken():
    made = []

    def make(flaw):
        cls = type(f"Broken_{flaw}", (_Broken,), {"name": f"broken-{flaw}", "flaw": flaw})
        register(cls)
        made.append(cls.name)
        return cls.name
    yield make
    for name in made:
        del REGISTRY[name]


@pytest.mark.parametrize("flaw,check", [("leak", "batch_is_rows"), ("leak", "cfg_halves_isolated"),
                                        ("macs", "macs_match_counted"), ("always-different", "disabled_is_plain")])
def test_the_suite_catches_a_broken_method(skip_dit, broken, flaw, check):
    name = broken(flaw)
    failures = conformance.run(skip_dit, name, checks=[check])
    assert list(failures) == [check] and name in failures[check]
    assert conformance.run(skip_dit, "skip-cache", checks=[check]) == {}


def test_the_suite_catches_state_that_survives_a_reset(skip_dit, broken):
    """A payload that outlives its chain (the step-1 reset switched off) fails reused_equals_fresh."""
    name = broken("stale")
    begin = CacheState.begin

    def no_reset(self, t, batch):
        calls, self.calls = self.calls, []
        try:
            return begin(self, t, batch)
        finally:
            self.calls = calls
    CacheState.begin = no_reset
    try:
        failures = conformance.run(skip_dit, name, checks=["reused_equals_fresh"])
    finally:
        CacheState.begin = begin
    assert list(failures) == ["reused_equals_fresh"]
    assert conformance.run(skip_dit, name, checks=["reused_equals_fresh"]) == {}     # with the reset: fine


def test_an_exception_mid_chain_resets_the_state(skip_dit):
    with pytest.raises(RuntimeError):
        with torch.no_grad(), apply_cache(skip_dit, CacheConfig(method="dbcache", threshold=0.5, warmup=0)) as state:
            skip_dit(torch.randn(2, 2, 8, 8), torch.full((2,), 500), torch.tensor([0, 1]))
            assert state.rows is not None
            raise RuntimeError("boom")
    assert state.rows is None and state.calls == [] and hooks.leftover_hooks(skip_dit) == []
