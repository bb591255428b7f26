"""scaled_linear betas and v-prediction against a float64 re-derivation written here, and against
diffusers' DDPMScheduler / DDIMScheduler step results (a second, independent oracle)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from smoothness.diffusion import Diffusion, SamplerConfig, scaled_linear_betas, space_timesteps

HUNYUAN = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.02, prediction_type="v_prediction",
               clip_sample=False)


def alpha_bar() -> np.ndarray:
    """alpha_bar for t = 0..999: betas linear in sqrt from sqrt(0.00085) to sqrt(0.02), squared."""
    betas = np.array([(math.sqrt(0.00085) + (math.sqrt(0.02) - math.sqrt(0.00085)) * i / 999) ** 2 for i in range(1000)])
    return np.cumprod(1 - betas)


def reference_ddpm(v, x_t, t, t_prev):
    """One v-prediction DDPM step written out: x0 = sqrt(ab) x - sqrt(1-ab) v, the posterior mean, and
    its beta and posterior variance (the ends of the learned range)."""
    ab = alpha_bar()
    a, a_prev = ab[t], (ab[t_prev] if t_prev >= 0 else 1.0)
    beta = 1 - a / a_prev
    x0 = math.sqrt(a) * x_t - math.sqrt(1 - a) * v
    mean = math.sqrt(a_prev) * beta / (1 - a) * x0 + math.sqrt(1 - beta) * (1 - a_prev) / (1 - a) * x_t
    return mean, x0, beta, beta * (1 - a_prev) / (1 - a)


def test_scaled_linear_betas_by_hand():
    b = scaled_linear_betas()
    assert b[0] == pytest.approx(0.00085, rel=1e-12) and b[-1] == pytest.approx(0.02, rel=1e-12)
    assert np.allclose(np.sqrt(b), np.linspace(math.sqrt(0.00085), math.sqrt(0.02), 1000))
    np.testing.assert_allclose(Diffusion(schedule="scaled_linear").alphas_cumprod, alpha_bar(), rtol=1e-12)


def test_v_prediction_posterior_against_the_reference():
    chain = list(range(1, 1000, 10))                      # 1, 11, ..., 991 (HunYuan's DDPM-100)
    d = Diffusion(chain, prediction="v", schedule="scaled_linear")
    g = torch.Generator().manual_seed(0)
    x_t, v = torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64), torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64)
    for idx in (99, 50, 1, 0):
        t, t_prev = chain[idx], chain[idx - 1] if idx else -1
        mean, log_var, x0 = d.p_mean_variance(torch.cat([v, -torch.ones_like(v)], 1), x_t, torch.full((2,), idx), False)
        want_mean, want_x0, beta, post = reference_ddpm(v, x_t, t, t_prev)
        torch.testing.assert_close(x0, want_x0, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(mean, want_mean, rtol=1e-6, atol=1e-6)
        if idx:                                           # v = -1: the clipped posterior variance
            assert float(log_var.flatten()[0]) == pytest.approx(math.log(post), rel=1e-6)
        mean1, log_var1, _ = d.p_mean_variance(torch.cat([v, torch.ones_like(v)], 1), x_t, torch.full((2,), idx), False)
        assert float(log_var1.flatten()[0]) == pytest.approx(math.log(beta), rel=1e-6)   # v = +1: beta


def test_v_prediction_training_target():
    """The MSE target of a v-prediction model is v = sqrt(ab) eps - sqrt(1-ab) x0."""
    class V(torch.nn.Module):                             # outputs the exact v for the given draw
        def forward(self, x_t, t, y):
            return self.v

    d = Diffusion(prediction="v", schedule="scaled_linear")
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    idx = torch.tensor([5, 500, 999])
    ab = torch.tensor(alpha_bar()[[5, 500, 999]], dtype=torch.float32).view(-1, 1, 1, 1)
    model = V()
    model.v = ab.sqrt() * noise - (1 - ab).sqrt() * x0
    assert float(d.training_losses(model, x0, idx, None, noise)["mse"].max()) < 1e-10


@pytest.mark.parametrize("idx", [99, 70, 10, 1, 0])
def test_ddpm_step_equals_diffusers_ddpm_scheduler(idx):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDPMScheduler(steps_offset=1, variance_type="fixed_small", **HUNYUAN)
    sched.set_timesteps(100)
    chain = sorted(int(t) for t in sched.timesteps)
    assert chain == list(range(1, 1000, 10))
    d = Diffusion(chain, prediction="v", schedule="scaled_linear")
    g = torch.Generator().manual_seed(idx)
    x_t, v = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    t = chain[idx]
    want = sched.step(v, t, x_t, generator=torch.Generator().manual_seed(7)).prev_sample
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    # learned range at v = -1 is the posterior variance: diffusers' fixed_small
    mean, log_var, _ = d.p_mean_variance(torch.cat([v, -torch.ones_like(v)], 1), x_t, torch.full((1,), idx), False)
    ours = mean + (idx != 0) * torch.exp(0.5 * log_var) * noise
    # at t = 1 diffusers still adds sqrt(1e-20) noise (its variance clamp); we add none
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)


def test_ddim_chain_equals_diffusers_ddim_scheduler():
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler(steps_offset=0, set_alpha_to_one=True, **HUNYUAN)
    sched.set_timesteps(25)
    d = Diffusion(space_timesteps(1000, "ddim25"), prediction="v", schedule="scaled_linear")
    assert d.chain == [int(t) for t in sched.timesteps]

    class Fixed(torch.nn.Module):                         # a deterministic "model": v = 0.3 x_t + t / 1000
        family = "hunyuan-dit"

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, t, y):
            return 0.3 * x + t.view(-1, 1, 1, 1).float() / 1000

    model, x = Fixed(), torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ours = Diffusion(space_timesteps(1000, "ddim25")).sample(model, (1, 4, 8, 8), None,
                                                             SamplerConfig(num_steps=25, sampler="ddim"), x_T=x)
    want = x.clone()
    for t in sched.timesteps:
        want = sched.step(model(want, t.view(1), None), t, want).prev_sample
    torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-5)        # the default Diffusion took the family's process


def test_unknown_process_names_are_errors():
    with pytest.raises(ValueError, match="unknown prediction 'x0'; allowed: epsilon, v"):
        Diffusion(prediction="x0")
    with pytest.raises(ValueError, match="unknown beta schedule 'cosine'; allowed: linear, scaled_linear"):
        Diffusion(schedule="cosine")


@pytest.mark.parametrize("steps", [10, 50, 100, 250])
def test_leading_spacing_is_diffusers_leading_with_offset_one(steps):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDPMScheduler(steps_offset=1, **HUNYUAN)
    sched.set_timesteps(steps)
    assert Diffusion(space_timesteps(1000, f"leading{steps}")).chain == [int(t) for t in sched.timesteps]
