"""Gaussian diffusion as in DiT / improved-diffusion: linear betas, respacing, learned-range variance;
plus the text-to-image process of HunYuan-DiT (``scaled_linear`` betas 0.00085 .. 0.02, v-prediction).

The sampler is a generator that yields a ``Step`` record at every iteration, so analysis and caching
can attach at any step:

    diff = Diffusion.respaced(250)
    for rec in diff.sample_steps(model, (4, 1, 16, 16), y, seed=0):
        rec.step, rec.timestep, rec.x_t, rec.model_output     # step counts from 1; t on the 1000 scale

Words: "timestep" t is on the 1000-step training scale (0 = clean); "step" is the sampler iteration,
1 .. num_steps. The chain's spacing is explicit (``SamplerConfig.spacing``): DDPM-250 "even" visits
t = 999, 995, ..., 4, 0; DDIM-50 "even" (DiT, Latte) 999, 979, 958, ..., 0 and "leading" (diffusers,
Latte T2V) 980, 960, ..., 0. ``OFFICIAL`` names each model family's official spacing and guidance.

The training process (beta schedule and what the model predicts) belongs to the model, not to the
sampler: ``sample_steps`` takes it from the model's family (``models.protocol``), so a v-prediction
model is sampled as one whatever ``Diffusion`` it is handed; the sampler config picks the steps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from . import hooks
from .models.protocol import family_of
from .schedules import (DEFAULT_SAMPLING, OFFICIAL, SCHEDULES, SPACINGS, TRAIN_STEPS, linear_betas,  # noqa: F401
                        official_sampling, scaled_linear_betas, space_timesteps)


SAMPLERS = ("ddpm", "ddim")
PREDICTIONS = ("epsilon", "v")     # what the model's first C output channels are


@dataclass(frozen=True)
class SamplerConfig:
    num_steps: int = 250            # sampler iterations (DiT's --num-sampling-steps)
    sampler: str = "ddpm"           # "ddpm" (ancestral, as DiT) or "ddim" (eta below)
    cfg_scale: float = 1.0          # classifier-free guidance; 1.0 runs the conditional branch alone
    cfg_channels: int | None = None  # eps channels guided (at most the model's C); None = all. DiT's official: 3
    clip_denoised: bool = False     # clip the predicted x0 to [-1, 1] (DiT: False; pixel models: True)
    eta: float = 0.0                # DDIM noise; 0 is deterministic
    spacing: str = "even"           # timesteps visited: even (IDDPM, DiT and Latte), leading (diffusers, T2V), trailing
    steps_offset: int = 0           # diffusers' steps_offset, added to the leading chain (Hunyuan: 1)

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; allowed: {', '.join(SAMPLERS)}")
        if not (isinstance(self.num_steps, int) and not isinstance(self.num_steps, bool)
                and 1 <= self.num_steps <= TRAIN_STEPS):
            raise ValueError(f"num_steps={self.num_steps!r} is not allowed; use an integer in 1..{TRAIN_STEPS}")
        if not (isinstance(self.cfg_scale, (int, float)) and math.isfinite(self.cfg_scale) and self.cfg_scale >= 1.0):
            raise ValueError(f"cfg_scale={self.cfg_scale!r} is not allowed; use a finite number >= 1 "
                             "(1 disables guidance)")
        if self.cfg_channels is not None and not (isinstance(self.cfg_channels, int) and self.cfg_channels >= 1):
            raise ValueError(f"cfg_channels={self.cfg_channels!r} is not allowed; use None (all) or a positive count")
        if not (isinstance(self.eta, (int, float)) and 0.0 <= self.eta <= 1.0):
            raise ValueError(f"eta={self.eta!r} is not allowed; use 0..1")
        if self.eta and self.sampler != "ddim":
            raise ValueError(f"eta={self.eta!r} is a DDIM setting; the {self.sampler} sampler does not use it")
        if not (isinstance(self.steps_offset, int) and 0 <= self.steps_offset < TRAIN_STEPS):
            raise ValueError(f"steps_offset={self.steps_offset!r} is not allowed; use an integer in 0..{TRAIN_STEPS - 1}")
        space_timesteps(TRAIN_STEPS, self.spacing, self.num_steps, self.steps_offset)   # spacing and offset fit

    @property
    def timesteps(self) -> list[int]:
        """The visited timesteps, ascending."""
        return space_timesteps(TRAIN_STEPS, self.spacing, self.num_steps, self.steps_offset)

    @property
    def label(self) -> str:
        """The chain's name in attributes and titles, e.g. ``DDPM-250``."""
        return chain_label(self.sampler, self.num_steps)


def guided_channels(cfg_channels: int | None, channels: int) -> int:
    """How many eps channels classifier-free guidance acts on for a model with ``channels`` eps
    channels: all for None, else ``min(cfg_channels, channels)``. The variance channels of a
    learned-sigma model are never guided: DiT's official 3 guides eps channels 0..2 of its 4 (the
    quirk), and all of a model's eps when it has 3 or fewer (the bundled 1-channel digits models)."""
    return channels if cfg_channels is None else min(cfg_channels, channels)


def chain_label(sampler: str, num_steps: int) -> str:
    """``DDPM-250``: the one spelling of a sampler chain's name (also for names read back from attrs)."""
    return f"{sampler.upper()}-{num_steps}"


@dataclass
class Step:
    """One sampler iteration."""

    step: int                    # 1-based iteration
    timestep: int                # t on the 1000 scale fed to the model
    x_t: torch.Tensor            # (N, C, H, W) input of this iteration
    model_output: torch.Tensor   # (N, C_out, H, W) after guidance
    pred_x0: torch.Tensor        # (N, C, H, W)
    x_next: torch.Tensor         # (N, C, H, W) the sample handed to the next iteration


class Diffusion:
    """A (possibly respaced) diffusion process over a subset of the 1000 training timesteps."""

    def __init__(self, timesteps: list[int] | None = None, base_betas: np.ndarray | None = None,
                 prediction: str = "epsilon", schedule: str = "linear"):
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; allowed: {', '.join(PREDICTIONS)}")
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown beta schedule {schedule!r}; allowed: {', '.join(SCHEDULES)}")
        self.prediction, self.schedule = prediction, schedule
        base = SCHEDULES[schedule]() if base_betas is None else base_betas
        # A default process (linear, epsilon, no own betas) defers to the model's family in sample_steps.
        self._default = base_betas is None and (prediction, schedule) == ("epsilon", "linear")
        base_ac = np.cumprod(1.0 - base)
        self.timestep_map = np.array(sorted(timesteps) if timesteps is not None else range(len(base)))
        last, betas = 1.0, []
        for t in self.timestep_map:                                     # respacing keeps alpha_bar
            betas.append(1.0 - base_ac[t] / last)
            last = base_ac[t]
        self.betas = b = np.array(betas, dtype=np.float64)
        self.num_timesteps = len(b)
        self.alphas_cumprod = ac = np.cumprod(1.0 - b)
        self.alphas_cumprod_prev = acp = np.append(1.0, ac[:-1])
        self.posterior_variance = pv = b * (1.0 - acp) / (1.0 - ac)
        self.posterior_log_variance_clipped = np.log(np.append(pv[1], pv[1:])) if len(pv) > 1 else np.log(b)
        self.posterior_mean_coef1 = b * np.sqrt(acp) / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - acp) * np.sqrt(1.0 - b) / (1.0 - ac)

    @classmethod
    def respaced(cls, num_steps: int = 250, spacing: str = "even", steps_offset: int = 0) -> "Diffusion":
        """The chain of ``num_steps`` timesteps spaced by ``spacing`` (see ``space_timesteps``)."""
        if spacing in SAMPLERS:
            raise ValueError(f"Diffusion.respaced takes a spacing ({', '.join(SPACINGS)}), not the sampler "
                             f"{spacing!r}: the chain no longer depends on the sampler")
        return cls(space_timesteps(TRAIN_STEPS, spacing, num_steps, steps_offset))

    @classmethod
    def for_config(cls, config: SamplerConfig, model=None) -> "Diffusion":
        """The chain ``config`` asks for; the process (schedule, prediction) of ``model``'s family."""
        d = cls(config.timesteps)
        return d if model is None else d.for_model(model)

    def for_model(self, model) -> "Diffusion":
        """This chain under the process ``model`` was trained with (itself when they agree, or when
        this diffusion was built with an explicit schedule, prediction or betas)."""
        fam = family_of(model)
        if not self._default or (fam.schedule, fam.prediction) == (self.schedule, self.prediction):
            return self
        return Diffusion(list(self.timestep_map), prediction=fam.prediction, schedule=fam.schedule)

    # ------------------------------------------------------------ addressing
    @property
    def chain(self) -> list[int]:
        """Timesteps in sampling order: chain[step - 1] is the timestep of that step."""
        return [int(t) for t in self.timestep_map[::-1]]

    def timestep_of(self, step: int) -> int:
        if not (isinstance(step, (int, np.integer)) and 1 <= step <= self.num_timesteps):
            raise ValueError(f"step {step!r} is outside the chain; allowed: 1..{self.num_timesteps} "
                             f"(a {self.num_timesteps}-step chain)")
        return self.chain[step - 1]

    # ------------------------------------------------------------- equations
    def _at(self, arr: np.ndarray, idx: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        out = torch.from_numpy(arr).to(like.device)[idx].float()
        return out.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)

    def q_sample(self, x0, idx, noise):
        return (self._at(np.sqrt(self.alphas_cumprod), idx, x0) * x0
                + self._at(np.sqrt(1.0 - self.alphas_cumprod), idx, x0) * noise)

    def q_posterior(self, x0, x_t, idx):
        mean = self._at(self.posterior_mean_coef1, idx, x_t) * x0 + self._at(self.posterior_mean_coef2, idx, x_t) * x_t
        return mean, self._at(self.posterior_log_variance_clipped, idx, x_t)

    def p_mean_variance(self, output, x_t, idx, clip_denoised: bool):
        """Split [eps (or v-prediction), variance] and return (mean, log variance, predicted x0)."""
        c = x_t.shape[1]
        if output.shape[1] == 2 * c:
            eps, v = output[:, :c], output[:, c:]
            min_log = self._at(self.posterior_log_variance_clipped, idx, x_t)
            max_log = self._at(np.log(self.betas), idx, x_t)
            frac = (v + 1) / 2                                           # learned range
            log_var = frac * max_log + (1 - frac) * min_log
        else:
            eps = output
            # Fixed "large" variance, as improved-diffusion for models without learned sigma.
            log_var = self._at(np.log(np.append(self.posterior_variance[1], self.betas[1:])), idx, x_t)
        if self.prediction == "v":                                       # v = sqrt(ab) eps - sqrt(1-ab) x0
            x0 = (self._at(np.sqrt(self.alphas_cumprod), idx, x_t) * x_t
                  - self._at(np.sqrt(1.0 - self.alphas_cumprod), idx, x_t) * eps)
        else:
            x0 = (self._at(np.sqrt(1.0 / self.alphas_cumprod), idx, x_t) * x_t
                  - self._at(np.sqrt(1.0 / self.alphas_cumprod - 1), idx, x_t) * eps)
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        mean, _ = self.q_posterior(x0, x_t, idx)
        return mean, log_var, x0

    # -------------------------------------------------------------- training
    def training_losses(self, model, x0, idx, y, noise):
        """DiT's hybrid loss: MSE on eps plus the VB term with the mean frozen (learned sigma)."""
        x_t = self.q_sample(x0, idx, noise)
        t = torch.as_tensor(self.timestep_map, device=x0.device)[idx]
        out = model(x_t, t, y)
        c = x0.shape[1]
        per_sample = tuple(range(1, x0.dim()))                          # images (C, H, W), videos (C, F, H, W)
        target = noise if self.prediction == "epsilon" else (          # v = sqrt(ab) eps - sqrt(1-ab) x0
            self._at(np.sqrt(self.alphas_cumprod), idx, x0) * noise
            - self._at(np.sqrt(1.0 - self.alphas_cumprod), idx, x0) * x0)
        mse = ((target - out[:, :c]) ** 2).mean(dim=per_sample)
        if out.shape[1] == c:
            return {"loss": mse, "mse": mse}
        frozen = torch.cat([out[:, :c].detach(), out[:, c:]], dim=1)
        true_mean, true_log_var = self.q_posterior(x0, x_t, idx)
        mean, log_var, _ = self.p_mean_variance(frozen, x_t, idx, clip_denoised=False)
        kl = normal_kl(true_mean, true_log_var, mean, log_var).mean(dim=per_sample) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var).mean(dim=per_sample) / math.log(2.0)
        vb = torch.where(idx == 0, nll, kl)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    # -------------------------------------------------------------- sampling
    def model_output(self, model, x, t, y, config: SamplerConfig):
        """One (optionally guided) model call. CFG runs both halves in one batched forward."""
        n = x.shape[0]
        if config.cfg_scale == 1.0 or y is None:
            with hooks.cfg_scope(None):
                return model(x, t, y)
        null = model.null_condition(y)
        with hooks.cfg_scope(n):
            out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
        return guide(out[:n], out[n:], config.cfg_scale, guided_channels(config.cfg_channels, x.shape[1]))

    def sample_steps(self, model, shape, y=None, config: SamplerConfig = SamplerConfig(), *,
                     seed: int | None = 0, generator: torch.Generator | None = None,
                     x_T: torch.Tensor | None = None, device=None, dtype=torch.float32,
                     groups: int = 1) -> Iterator[Step]:
        """Yield a ``Step`` per iteration. All noise comes from one CPU generator, so runs are
        reproducible from ``seed`` on any device. With ``groups`` > 1 the batch is that many tiled
        copies of ``shape[0] // groups`` rows that share x_T and every noise draw (used to run
        perturbed copies of one chain side by side)."""
        if self.num_timesteps != config.num_steps:
            raise ValueError(f"this diffusion has {self.num_timesteps} steps but the config asks for {config.num_steps}")
        if self.for_model(model) is not self:
            yield from self.for_model(model).sample_steps(model, shape, y, config, seed=seed, generator=generator,
                                                          x_T=x_T, device=device, dtype=dtype, groups=groups)
            return
        device = device or next(model.parameters()).device
        g = generator or torch.Generator().manual_seed(int(seed or 0))
        if shape[0] % groups:
            raise ValueError(f"batch {shape[0]} is not divisible into groups={groups}")
        one = (shape[0] // groups, *shape[1:])
        tile = lambda v: v.repeat(groups, *([1] * (v.dim() - 1)))
        x = x_T.to(device, dtype) if x_T is not None else tile(torch.randn(one, generator=g)).to(device, dtype)
        n = x.shape[0]
        if y is not None:                                               # labels (N,) or caption embeddings (N, L, C)
            y = torch.as_tensor(y, device=device)
            y = y if y.is_floating_point() else y.long()
        for i, idx_val in enumerate(range(self.num_timesteps - 1, -1, -1)):
            idx = torch.full((n,), idx_val, device=device, dtype=torch.long)
            t = torch.full((n,), int(self.timestep_map[idx_val]), device=device, dtype=torch.long)
            with hooks.step_scope(i + 1, int(t[0])):
                out = self.model_output(model, x, t, y, config)
            noise = tile(torch.randn(one, generator=g)).to(device, dtype)
            if config.sampler == "ddpm":
                mean, log_var, x0 = self.p_mean_variance(out, x, idx, config.clip_denoised)
                x_next = mean + (idx_val != 0) * torch.exp(0.5 * log_var) * noise
            else:
                x_next, x0 = self._ddim(out, x, idx, config, noise)
            yield Step(i + 1, int(t[0]), x, out, x0, x_next)
            x = x_next

    def _ddim(self, out, x, idx, config: SamplerConfig, noise):
        _, _, x0 = self.p_mean_variance(out, x, idx, config.clip_denoised)
        eps = ((self._at(np.sqrt(1.0 / self.alphas_cumprod), idx, x) * x - x0)
               / self._at(np.sqrt(1.0 / self.alphas_cumprod - 1), idx, x))
        ab = self._at(self.alphas_cumprod, idx, x)
        ab_prev = self._at(self.alphas_cumprod_prev, idx, x)
        sigma = config.eta * torch.sqrt((1 - ab_prev) / (1 - ab)) * torch.sqrt(1 - ab / ab_prev)
        mean = x0 * torch.sqrt(ab_prev) + torch.sqrt(1 - ab_prev - sigma ** 2) * eps
        nonzero = (idx != 0).float().view(-1, *([1] * (x.dim() - 1)))
        return mean + nonzero * sigma * noise, x0

    def sample(self, model, shape, y=None, config: SamplerConfig = SamplerConfig(), **kw) -> torch.Tensor:
        last = None
        for last in self.sample_steps(model, shape, y, config, **kw):
            pass
        return last.x_next


def guide(cond, uncond, scale: float, channels: int):
    """Classifier-free guidance on the first ``channels`` channels of (N, C_out, H, W) outputs (the
    eps channels, or DiT's 3); the remaining channels (the learned variance) are the conditional's."""
    ch = channels
    guided = uncond[:, :ch] + scale * (cond[:, :ch] - uncond[:, :ch])
    return torch.cat([guided, cond[:, ch:]], dim=1)


def normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-likelihood of 8-bit data in [-1, 1] under a discretized Gaussian (improved-diffusion)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))))
