"""The conformance suite every registered caching method passes (and a method you write can run):

    from smoothness.cache import conformance
    failures = conformance.run(model, "my-cache")      # {} when the method conforms
    conformance.CHECKS                                   # the checks, by name

A method states two settings on its class: ``disabled`` (CacheConfig keywords that turn caching off:
interval 1, or threshold 0) and ``example`` (keywords that cache on a short chain). The checks, on
``model`` (a small random DiT is enough):

* ``disabled_is_plain``: the disabled setting gives bit-identical samples to plain sampling;
* ``caches``: the example setting serves some calls (or rows) from the cache and changes the sample;
* ``reused_equals_fresh``: a model used for an interrupted and a full chain, then a second full
  chain, gives the same samples as a fresh copy of the model (the state resets);
* ``batch_is_rows``: a batch of two samples gives each sample's output of the sample run alone, call by
  call (per-row rules decide per row; shared rules decide from the step only);
* ``cfg_halves_isolated``: in a guided batch [cond; uncond], changing the unconditional rows' input
  leaves the conditional rows' output unchanged;
* ``macs_match_counted``: the MACs the state accounts for the calls it made equal the multiply-adds
  torch's FlopCounterMode counts over the chain (CPU attention included);
* ``exception_leaves_nothing``: an exception in the middle of a chain leaves no hook, no overridden
  forward and an empty state.

Methods with a ``calibration`` are calibrated first on the same model and chain (calibrate.py).
``Setup(settings=(("forecast", "taylor2"),))`` runs the checks with more settings (a forecast).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from .. import hooks
from ..diffusion import Diffusion, SamplerConfig
from . import flops
from .base import CacheConfig, method_class
from .calibrate import calibrate
from .skip_cache import apply_cache


@dataclass(frozen=True)
class Setup:
    """The short chain the checks run."""

    sampler: SamplerConfig = SamplerConfig(num_steps=8, cfg_scale=2.0)   # guided, so both halves are there
    labels: tuple[int, ...] = (1, 2)      # one sample per label (class-conditional models)
    seed: int = 0                         # noise of the chain
    atol: float = 1e-5                    # batch vs alone: batched matmuls may differ in the last bits
    settings: tuple[tuple[str, object], ...] = ()   # CacheConfig keywords added to both configs, e.g. forecast


def _y(model, setup: Setup, n: int | None = None):
    labels = setup.labels[:n] if n else setup.labels
    return torch.tensor(labels) if model.config.num_classes else None


def _shape(model, setup: Setup, n: int | None = None):
    return (len(setup.labels[:n] if n else setup.labels), *model.sample_shape())


def configs(model, name: str, setup: Setup = Setup()) -> tuple[CacheConfig, CacheConfig]:
    """(disabled, example) configs of method ``name`` for ``model``, calibrated when it needs it."""
    cls = method_class(name)
    extra = {}
    if cls.calibration:
        diffusion = Diffusion.for_config(setup.sampler)
        extra["calibration"] = calibrate(model, diffusion, _shape(model, setup), _y(model, setup), setup.sampler,
                                         seed=setup.seed)
    extra.update(dict(setup.settings))
    return (CacheConfig(method=name, **{**cls.disabled, **extra}), CacheConfig(method=name, **{**cls.example, **extra}))


def _sample(model, setup: Setup, config: CacheConfig | None, seed: int | None = None):
    diffusion = Diffusion.for_config(setup.sampler)
    seed = setup.seed if seed is None else seed
    with torch.inference_mode():
        if config is None:
            return diffusion.sample(model, _shape(model, setup), _y(model, setup), setup.sampler, seed=seed), None
        with apply_cache(model, config) as state:
            x = diffusion.sample(model, _shape(model, setup), _y(model, setup), setup.sampler, seed=seed)
    return x, state


def _require(ok: bool, message: str):
    if not ok:
        raise AssertionError(message)


# ----------------------------------------------------------------------- checks
def disabled_is_plain(model, name, setup: Setup = Setup()):
    disabled, _ = configs(model, name, setup)
    ref, _ = _sample(model, setup, None)
    out, state = _sample(model, setup, disabled)
    _require(state.num_cached == 0, f"{disabled.name}: {state.num_cached} calls cached with caching disabled")
    _require(torch.equal(out, ref), f"{disabled.name}: the sample differs from plain sampling")


def caches(model, name, setup: Setup = Setup()):
    _, example = configs(model, name, setup)
    ref, _ = _sample(model, setup, None)
    out, state = _sample(model, setup, example)
    if name == "none":
        return
    _require(state.num_cached > 0, f"{example.name}: nothing was served from the cache ({state.mask})")
    _require(not torch.equal(out, ref), f"{example.name}: caching left the sample bit-identical")


def reused_equals_fresh(model, name, setup: Setup = Setup()):
    _, example = configs(model, name, setup)
    used, fresh = model, copy.deepcopy(model)
    diffusion = Diffusion.for_config(setup.sampler)
    with torch.inference_mode(), apply_cache(used, example):
        for i, _ in enumerate(diffusion.sample_steps(used, _shape(model, setup), _y(model, setup), setup.sampler,
                                                     seed=setup.seed + 7)):
            if i == setup.sampler.num_steps // 2:
                break                                                # an interrupted generation
        a = diffusion.sample(used, _shape(model, setup), _y(model, setup), setup.sampler, seed=setup.seed)
        b = diffusion.sample(used, _shape(model, setup), _y(model, setup), setup.sampler, seed=setup.seed)
    c, _ = _sample(fresh, setup, example)
    _require(torch.equal(a, b) and torch.equal(a, c), f"{example.name}: a reused model differs from a fresh one")
    _require(hooks.leftover_hooks(used) == [], f"{example.name}: hooks left: {hooks.leftover_hooks(used)}")


def _calls(model, config, xs, y, cond_rows, chain):
    """Drive the model call by call on fixed inputs ``xs`` (one per step of ``chain``); returns the outputs."""
    t_of = chain
    outs = []
    with torch.inference_mode(), apply_cache(model, config):
        for s, x in enumerate(xs, start=1):
            t = torch.full((x.shape[0],), t_of[s - 1])
            with hooks.step_scope(s, t_of[s - 1]), hooks.cfg_scope(cond_rows):
                outs.append(model(x, t, y))
    return outs


def _inputs(model, setup: Setup, rows: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, *model.sample_shape(), generator=g)
    # a slowly drifting input, as along a chain: step s sees base * (1 - s/S) + noise_s * s/S
    S = setup.sampler.num_steps
    return [base * (1 - s / (2 * S)) + torch.randn(base.shape, generator=g) * (s / (2 * S)) for s in range(S)]


def _guided(model, setup: Setup) -> bool:
    return setup.sampler.cfg_scale > 1 and bool(model.config.num_classes)


def _batch(model, setup: Setup, xs: list, labels: list):
    """Inputs and labels of the samples ``xs`` (lists of per-step inputs) as the sampler batches them:
    [cond rows; uncond rows] under guidance. Returns (per-step inputs, y, cond_rows)."""
    if not model.config.num_classes:
        return [torch.cat(step) for step in zip(*xs)], None, None
    y = torch.tensor(labels)
    if not _guided(model, setup):
        return [torch.cat(step) for step in zip(*xs)], y, None
    return [torch.cat(step + step) for step in zip(*xs)], torch.cat([y, model.null_condition(y)]), len(xs)


def batch_is_rows(model, name, setup: Setup = Setup()):
    _, example = configs(model, name, setup)
    chain = Diffusion.for_config(setup.sampler).chain
    xa, xb = _inputs(model, setup, 1, 1), _inputs(model, setup, 1, 2)
    labels = list(setup.labels[:2])
    both = _calls(model, example, *_batch(model, setup, [xa, xb], labels), chain=chain)
    alone = [_calls(model, example, *_batch(model, setup, [xs], labels[i:i + 1]), chain=chain)
             for i, xs in enumerate((xa, xb))]
    guided = _guided(model, setup) and bool(model.config.num_classes)
    for s, out in enumerate(both):
        a, b = alone[0][s], alone[1][s]
        want = torch.cat([a[:1], b[:1], a[1:], b[1:]]) if guided else torch.cat([a, b])
        _require(torch.allclose(out, want, atol=setup.atol, rtol=0),
                 f"{example.name}: at call {s + 1} a batch of two differs from the two alone by "
                 f"{(out - want).abs().max():.2e}")


def cfg_halves_isolated(model, name, setup: Setup = Setup()):
    _, example = configs(model, name, setup)
    chain = Diffusion.for_config(setup.sampler).chain
    cond, uncond, other = (_inputs(model, setup, 1, s) for s in (3, 4, 5))
    y = _y(model, setup, 1)
    y = None if y is None else torch.cat([y, model.null_condition(y)])
    if y is None or not _guided(model, setup):
        return                                                       # no guided batch on this model
    a = _calls(model, example, [torch.cat([c, u]) for c, u in zip(cond, uncond)], y, 1, chain)
    b = _calls(model, example, [torch.cat([c, u]) for c, u in zip(cond, other)], y, 1, chain)
    for s, (oa, ob) in enumerate(zip(a, b)):
        _require(torch.allclose(oa[:1], ob[:1], atol=setup.atol, rtol=0),
                 f"{example.name}: at call {s + 1} the unconditional rows changed the conditional output")


def _sdpa_flops(q, k, v, *args, out_shape=None, **kwargs):
    return flop_counter.sdpa_flop_count(q, k, v)


def macs_match_counted(model, name, setup: Setup = Setup()):
    _, example = configs(model, name, setup)
    sdpa = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}
    with FlopCounterMode(display=False, custom_mapping=sdpa) as counter:
        _, state = _sample(model, setup, example)
    want = 2 * state.macs(flops.Shape.of(model))
    got = counter.get_total_flops()
    _require(got == want, f"{example.name}: counted {got} FLOPs over the chain, the method accounts {want} "
                          f"(2 x MACs; calls {state.mask})")


def exception_leaves_nothing(model, name, setup: Setup = Setup()):
    _, example = configs(model, name, setup)
    diffusion = Diffusion.for_config(setup.sampler)
    state = None
    try:
        with torch.inference_mode(), apply_cache(model, example) as state:
            for i, _ in enumerate(diffusion.sample_steps(model, _shape(model, setup), _y(model, setup),
                                                         setup.sampler, seed=setup.seed)):
                if i == setup.sampler.num_steps // 2:
                    raise KeyboardInterrupt                      # the user stops the chain
    except KeyboardInterrupt:
        pass
    _require(hooks.leftover_hooks(model) == [], f"{example.name}: hooks left: {hooks.leftover_hooks(model)}")
    _require(state is not None and state.payload is None and state.rows is None and not state.history
             and not state.calls, f"{example.name}: the state kept cached tensors after an exception")


CHECKS = {f.__name__: f for f in (disabled_is_plain, caches, reused_equals_fresh, batch_is_rows,
                                   cfg_halves_isolated, macs_match_counted, exception_leaves_nothing)}


def run(model, name: str, setup: Setup = Setup(), checks=None) -> dict[str, str]:
    """Run the checks (all by default) on method ``name``; returns {check: failure message} (empty: conforms)."""
    failures = {}
    for check in checks or CHECKS:
        try:
            CHECKS[check](model, name, setup)
        except AssertionError as e:
            failures[check] = str(e)
    return failures
