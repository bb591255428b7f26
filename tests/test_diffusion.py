"""Schedules, respacing and the DDPM / DDIM samplers against a straightforward float64 re-derivation.

The reference below starts from the linear beta schedule (spec section 5), takes alpha_bar at the
timesteps the chain visits, and writes out the IDDPM posterior, the learned-range variance and the
DDIM update directly; it shares no code with ``smoothness.diffusion``.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from smoothness import hooks
from smoothness.diffusion import Diffusion, SamplerConfig

pytestmark = pytest.mark.usefixtures("single_thread")

SHAPE = (2, 2, 8, 8)                 # batch 2 for the tiny models (in_channels=2, 8x8)
Y = torch.tensor([0, 2])


def alpha_bar() -> np.ndarray:
    """alpha_bar_t for t = 0..999 of the linear schedule 1e-4 .. 0.02 (float64)."""
    return np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))


class Chain:
    """Float64 coefficients of a chain that visits ``timesteps`` (any order given)."""

    def __init__(self, timesteps):
        self.asc = sorted(timesteps)
        self.ab_all = alpha_bar()

    def ab(self, t):
        return self.ab_all[t]

    def ab_prev(self, t):
        j = self.asc.index(t)
        return self.ab_all[self.asc[j - 1]] if j > 0 else 1.0

    def beta(self, t):
        return 1.0 - self.ab(t) / self.ab_prev(t)

    def post_var(self, t):
        return self.beta(t) * (1.0 - self.ab_prev(t)) / (1.0 - self.ab(t))

    def min_log(self, t):
        # The posterior variance is 0 at the first timestep; IDDPM clips it to the next one's.
        j = self.asc.index(t)
        return math.log(self.post_var(self.asc[max(j, 1)]))

    def post_mean(self, x0, x_t, t):
        ab, ab_prev, beta = self.ab(t), self.ab_prev(t), self.beta(t)
        return (math.sqrt(ab_prev) * beta / (1 - ab)) * x0 + (math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab)) * x_t

    def x0_from_eps(self, x_t, eps, t):
        return (x_t - math.sqrt(1 - self.ab(t)) * eps) / math.sqrt(self.ab(t))


def call(model, x, t, y):
    with torch.no_grad():
        return model(x.float(), torch.full((x.shape[0],), t, dtype=torch.long), y).double()


def reference_ddpm(model, timesteps, seed, clip=False):
    ch = Chain(timesteps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g).double()
    c = SHAPE[1]
    out = []
    for t in sorted(timesteps, reverse=True):
        mo = call(model, x, t, Y)
        eps, v = mo[:, :c], mo[:, c:]
        x0 = ch.x0_from_eps(x, eps, t)
        if clip:
            x0 = x0.clamp(-1, 1)
        mean = ch.post_mean(x0, x, t)
        frac = (v + 1) / 2
        log_var = frac * math.log(ch.beta(t)) + (1 - frac) * ch.min_log(t)
        noise = torch.randn(SHAPE, generator=g).double()
        x_next = mean + (torch.exp(0.5 * log_var) * noise if t != 0 else 0.0)
        out.append(dict(timestep=t, x_t=x, model_output=mo, pred_x0=x0, x_next=x_next))
        x = x_next
    return out


def reference_ddim(model, timesteps, seed, eta=0.0):
    ch = Chain(timesteps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g).double()
    out = []
    for t in sorted(timesteps, reverse=True):
        mo = call(model, x, t, Y)
        eps = mo[:, :SHAPE[1]]
        x0 = ch.x0_from_eps(x, eps, t)
        ab, ab_prev = ch.ab(t), ch.ab_prev(t)
        sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab)) * math.sqrt(1 - ab / ab_prev)
        noise = torch.randn(SHAPE, generator=g).double()
        x_next = math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev - sigma ** 2) * eps + sigma * noise
        out.append(dict(timestep=t, x_t=x, model_output=mo, pred_x0=x0, x_next=x_next))
        x = x_next
    return out


def assert_steps_match(steps, ref):
    assert len(steps) == len(ref)
    for k, (s, r) in enumerate(zip(steps, ref)):
        assert s.step == k + 1 and s.timestep == r["timestep"]
        for name in ("x_t", "model_output", "pred_x0", "x_next"):
            got, want = getattr(s, name).double(), r[name]
            scale = want.abs().max().item()
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * max(scale, 1.0),
                                       msg=lambda m: f"step {k + 1} {name}: {m}")


# -------------------------------------------------------------------------------- respacing

def test_ddpm_250_chain():
    chain = Diffusion.respaced(250).chain
    assert len(chain) == 250
    assert chain[:2] == [999, 995] and chain[-2:] == [4, 0]
    # improved-diffusion's space_timesteps: a float cursor advanced by (T-1)/(n-1), rounded.
    cur, taken = 0.0, []
    for _ in range(250):
        taken.append(round(cur))
        cur += 999 / 249
    assert chain == sorted(set(taken), reverse=True)


def test_ddim_50_chain():
    assert Diffusion.respaced(50, "leading").chain == list(range(980, -1, -20))


def test_respacing_keeps_alpha_bar():
    d = Diffusion.respaced(250)
    ts = sorted(d.chain)
    np.testing.assert_allclose(d.alphas_cumprod, alpha_bar()[ts], rtol=1e-12)
    full = Diffusion()
    np.testing.assert_allclose(full.betas, np.linspace(1e-4, 0.02, 1000), rtol=1e-12)
    assert full.chain == list(range(999, -1, -1))


def test_timestep_of():
    d = Diffusion.respaced(250)
    assert d.timestep_of(1) == 999 and d.timestep_of(2) == 995 and d.timestep_of(250) == 0
    for bad in (0, 251):
        with pytest.raises(ValueError, match=rf"step {bad} .*1\.\.250"):
            d.timestep_of(bad)


# -------------------------------------------------------------------------------- samplers

TEN = [round(i * 999 / 9) for i in range(10)]          # DDPM-10 visits 0, 111, ..., 999


@pytest.mark.parametrize("clip", [False, True])
def test_ddpm_chain_matches_reference(tiny, clip):
    d = Diffusion.respaced(10)
    assert d.chain == sorted(TEN, reverse=True)
    cfg = SamplerConfig(num_steps=10, clip_denoised=clip)
    steps = list(d.sample_steps(tiny, SHAPE, Y, cfg, seed=11))
    assert_steps_match(steps, reference_ddpm(tiny, TEN, seed=11, clip=clip))


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("spacing, chain", [("leading", list(range(900, -1, -100))), ("even", sorted(TEN, reverse=True)),
                                            ("trailing", list(range(999, 0, -100)))])
def test_ddim_chain_matches_reference(tiny, eta, spacing, chain):
    cfg = SamplerConfig(num_steps=10, sampler="ddim", eta=eta, spacing=spacing)
    d = Diffusion.for_config(cfg)
    assert d.chain == chain
    steps = list(d.sample_steps(tiny, SHAPE, Y, cfg, seed=5))
    assert_steps_match(steps, reference_ddim(tiny, chain, seed=5, eta=eta))


def test_steps_are_one_based_with_timesteps():
    d = Diffusion.respaced(4)

    class Zero(torch.nn.Module):          # a learn_sigma model that predicts nothing: cheap
        config = type("C", (), {"num_classes": 3})()

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x, t, y):
            return torch.cat([x * 0, x * 0], dim=1) + self.w

    steps = list(d.sample_steps(Zero(), SHAPE, Y, SamplerConfig(num_steps=4), seed=0))
    assert [s.step for s in steps] == [1, 2, 3, 4]
    assert [s.timestep for s in steps] == d.chain == [999, 666, 333, 0]
    assert [d.timestep_of(s.step) for s in steps] == d.chain
    for a, b in zip(steps, steps[1:]):
        assert a.x_next is b.x_t


def test_determinism(tiny):
    d = Diffusion.respaced(5)
    cfg = SamplerConfig(num_steps=5, cfg_scale=2.0)
    a = d.sample(tiny, SHAPE, Y, cfg, seed=7)
    b = d.sample(tiny, SHAPE, Y, cfg, seed=7)
    c = d.sample(tiny, SHAPE, Y, cfg, seed=8)
    e = d.sample(tiny, SHAPE, Y, cfg, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and torch.equal(a, e)
    assert not torch.allclose(a, c)


def test_x_T_is_used(tiny):
    d = Diffusion.respaced(2)
    x_T = torch.full(SHAPE, 0.5)
    first = next(iter(d.sample_steps(tiny, SHAPE, Y, SamplerConfig(num_steps=2), x_T=x_T)))
    assert torch.equal(first.x_t, x_T)


# ------------------------------------------------------------------------------------ CFG

@pytest.mark.parametrize("channels", [None, 1])
def test_cfg_equals_two_separate_calls(tiny, channels):
    s, c = 4.0, SHAPE[1]
    d = Diffusion.respaced(3)
    steps = list(d.sample_steps(tiny, SHAPE, Y, SamplerConfig(num_steps=3, cfg_scale=s, cfg_channels=channels),
                                seed=2))
    null = torch.full_like(Y, tiny.config.num_classes)
    guided_ch = channels or c
    for rec in steps:
        cond, uncond = call(tiny, rec.x_t, rec.timestep, Y), call(tiny, rec.x_t, rec.timestep, null)
        guided = uncond + s * (cond - uncond)
        want = torch.cat([guided[:, :guided_ch], cond[:, guided_ch:]], dim=1)
        torch.testing.assert_close(rec.model_output.double(), want, rtol=1e-5, atol=1e-6)
        # Guidance is not a no-op on the guided channels, and the others really are unguided.
        assert not torch.allclose(guided[:, :guided_ch], cond[:, :guided_ch], atol=1e-4)
        if channels == 1:
            assert not torch.allclose(rec.model_output[:, 1:c].double(), guided[:, 1:c], atol=1e-4)


def test_cfg_scale_one_is_a_single_unbatched_call(tiny):
    d = Diffusion.respaced(3)
    seen = []
    with hooks.hooked(tiny, {"input": lambda h, ctx: seen.append((h.shape[0], ctx.cond_rows))}):
        steps = list(d.sample_steps(tiny, SHAPE, Y, SamplerConfig(num_steps=3, cfg_scale=1.0), seed=0))
    assert seen == [(2, None)] * 3
    for rec in steps:
        assert torch.equal(rec.model_output, tiny(rec.x_t, torch.full((2,), rec.timestep), Y).detach())
    seen.clear()
    with hooks.hooked(tiny, {"input": lambda h, ctx: seen.append((h.shape[0], ctx.cond_rows))}):
        list(d.sample_steps(tiny, SHAPE, Y, SamplerConfig(num_steps=3, cfg_scale=1.5), seed=0))
    assert seen == [(4, 2)] * 3                            # guided: one batched [cond; uncond] call


# --------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("kwargs, pattern", [
    (dict(cfg_scale=0.5), r"cfg_scale=0\.5 .*>= 1"),
    (dict(num_steps=0), r"num_steps=0 .*1\.\.1000"),
    (dict(num_steps=1001), r"num_steps=1001 .*1\.\.1000"),
    (dict(sampler="euler"), r"'euler'.*ddpm, ddim"),
    (dict(cfg_scale=float("nan")), r"cfg_scale=nan"),
    (dict(cfg_channels=0), r"cfg_channels=0"),
    (dict(eta=2.0), r"eta=2\.0 .*0\.\.1"),
])
def test_sampler_config_validation(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        SamplerConfig(**kwargs)


def test_step_count_mismatch_is_an_error(tiny):
    with pytest.raises(ValueError, match="10 steps .* 5"):
        next(iter(Diffusion.respaced(10).sample_steps(tiny, SHAPE, Y, SamplerConfig(num_steps=5))))


# ------------------------------------------------------------------------------- training

def test_training_losses(tiny):
    d = Diffusion.respaced(10)
    g = torch.Generator().manual_seed(4)
    x0 = torch.rand(4, 2, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    idx = torch.tensor([0, 3, 5, 9])
    y = torch.tensor([0, 1, 2, 1])
    losses = d.training_losses(tiny, x0, idx, y, noise)   # eval mode: no label dropout
    assert set(losses) == {"loss", "mse", "vb"}
    for v in losses.values():
        assert v.shape == (4,) and torch.isfinite(v).all()
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["vb"])
    assert (losses["vb"] >= 0).all()

    # Hand computation: q_sample, eps MSE, and the KL (bits) of the learned-variance posterior.
    ch = Chain(TEN)
    ts = [sorted(TEN)[i] for i in idx.tolist()]
    ab = torch.tensor([ch.ab(t) for t in ts], dtype=torch.float64).view(-1, 1, 1, 1)
    x_t = ab.sqrt() * x0.double() + (1 - ab).sqrt() * noise.double()
    with torch.no_grad():
        out = tiny(x_t.float(), torch.tensor(ts), y).double()
    eps, v = out[:, :2], out[:, 2:]
    torch.testing.assert_close(losses["mse"].double(), ((noise.double() - eps) ** 2).mean(dim=(1, 2, 3)),
                               rtol=1e-4, atol=1e-6)
    for row, t in enumerate(ts):
        if t == 0:
            continue                                   # row 0 is the decoder NLL, not a KL
        xt, e = x_t[row], eps[row]
        true_mean = ch.post_mean(x0[row].double(), xt, t)
        true_lv = ch.min_log(t)
        mean = ch.post_mean(ch.x0_from_eps(xt, e, t), xt, t)
        frac = (v[row] + 1) / 2
        lv = frac * math.log(ch.beta(t)) + (1 - frac) * ch.min_log(t)
        kl = 0.5 * (-1.0 + lv - true_lv + torch.exp(true_lv - lv) + (true_mean - mean) ** 2 * torch.exp(-lv))
        want = kl.mean() / math.log(2.0)
        assert losses["vb"][row].item() == pytest.approx(want.item(), rel=1e-3, abs=1e-6)


class Oracle(torch.nn.Module):
    """A 'model' whose output is a fixed tensor (a parameter, so gradients can be inspected)."""

    config = type("C", (), {"num_classes": 3})()

    def __init__(self, out):
        super().__init__()
        self.out = torch.nn.Parameter(out.clone())

    def forward(self, x, t, y):
        return self.out * 1.0


def test_training_vb_with_an_exact_eps_oracle():
    # eps is predicted exactly, so the model mean equals the true posterior mean: the KL rows reduce
    # to the variance term and the t=0 row to the discretized-Gaussian NLL of x0 around itself.
    from scipy.special import ndtr

    d = Diffusion.respaced(10)
    g = torch.Generator().manual_seed(8)
    x0 = torch.rand(3, 2, 8, 8, generator=g) * 1.9 - 0.95         # away from the +-1 edge bins
    noise = torch.randn(x0.shape, generator=g)
    v = torch.rand(x0.shape, generator=g) * 2 - 1
    idx = torch.tensor([0, 4, 9])
    model = Oracle(torch.cat([noise, v], dim=1))
    losses = d.training_losses(model, x0, idx, torch.zeros(3, dtype=torch.long), noise)
    assert torch.allclose(losses["mse"], torch.zeros(3))

    ch = Chain(TEN)
    for row, t in enumerate(sorted(TEN)[i] for i in idx.tolist()):
        frac = (v[row].double() + 1) / 2
        lv = frac * math.log(ch.beta(t)) + (1 - frac) * ch.min_log(t)
        if t == 0:
            a = (1 / 255) / torch.exp(0.5 * lv).numpy()
            want = -np.log(ndtr(a) - ndtr(-a)).mean() / math.log(2.0)
        else:
            tlv = ch.min_log(t)
            want = (0.5 * (-1.0 + lv - tlv + torch.exp(tlv - lv))).mean().item() / math.log(2.0)
        assert losses["vb"][row].item() == pytest.approx(want, rel=2e-3, abs=1e-6), (row, t)

    # The VB term trains only the variance channels; the MSE only the eps channels.
    losses["vb"].sum().backward(retain_graph=True)
    assert torch.equal(model.out.grad[:, :2], torch.zeros_like(noise)) and model.out.grad[:, 2:].abs().max() > 0
    model.out.grad = None
    tiny_noise = torch.randn(x0.shape, generator=g)
    d.training_losses(model, x0, idx, torch.zeros(3, dtype=torch.long), tiny_noise)["mse"].sum().backward()
    assert torch.equal(model.out.grad[:, 2:], torch.zeros_like(v)) and model.out.grad[:, :2].abs().max() > 0


def test_training_losses_without_learned_sigma(make_model):
    model = make_model("DiT-Mini/2", learn_sigma=False)
    d = Diffusion.respaced(10)
    x0 = torch.zeros(2, 2, 8, 8)
    noise = torch.ones(2, 2, 8, 8)
    losses = d.training_losses(model, x0, torch.tensor([1, 9]), torch.tensor([0, 1]), noise)
    assert set(losses) == {"loss", "mse"}
    torch.testing.assert_close(losses["loss"], losses["mse"])
