"""The training process's beta schedules and the timesteps a sampler chain visits (its spacing),
with each model family's official spacing and guided channels. Core layer: numpy only;
``smoothness.diffusion`` re-exports every name."""
from __future__ import annotations

import numpy as np

TRAIN_STEPS = 1000


def linear_betas(num_steps: int = TRAIN_STEPS) -> np.ndarray:
    """DiT's ``get_named_beta_schedule('linear')``: 1e-4 .. 0.02 scaled to 1000 steps."""
    scale = 1000 / num_steps
    return np.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=np.float64)


def scaled_linear_betas(num_steps: int = TRAIN_STEPS, start: float = 0.00085, end: float = 0.02) -> np.ndarray:
    """diffusers' ``scaled_linear`` (Stable Diffusion, HunYuan-DiT): linear in sqrt(beta), squared."""
    return np.linspace(start ** 0.5, end ** 0.5, num_steps, dtype=np.float64) ** 2


SCHEDULES = {"linear": linear_betas, "scaled_linear": scaled_linear_betas}

SPACINGS = ("even", "leading", "trailing")
# Each family's official sampling (paper-spec section 5): DiT's sample.py and Latte's class-to-video
# sample.py respace with IDDPM's ``create_diffusion(str(n))`` (even) for DDPM and DDIM alike and guide
# DiT's first 3 eps channels / Latte's 4; the text-to-video pipeline uses diffusers' DDIMScheduler
# ("leading", steps_offset 0) and guides every channel (the variance half is then dropped).
OFFICIAL = {
    "dit": dict(spacing="even", steps_offset=0, cfg_channels=3),
    "latte": dict(spacing="even", steps_offset=0, cfg_channels=None),
    "latte-t2v": dict(spacing="leading", steps_offset=0, cfg_channels=None),
    # HunYuan-DiT's official sampler: diffusers' DDPM with steps_offset 1 (t = 991, 981, ..., 1 for 100
    # steps), guidance on every eps channel (the learned-variance half is dropped first).
    "hunyuan-dit": dict(spacing="leading", steps_offset=1, cfg_channels=None),
    # diffusers transformers: their pipelines' schedulers default to leading spacing, offset 0, and
    # guide every eps channel; pass --spacing / --steps-offset to match a scheduler config that differs.
    "diffusers-dit": dict(spacing="leading", steps_offset=0, cfg_channels=None),
    "pixart": dict(spacing="leading", steps_offset=0, cfg_channels=None),
    "diffusers-latte": dict(spacing="leading", steps_offset=0, cfg_channels=None),
}


DEFAULT_SAMPLING = dict(spacing="even", steps_offset=0, cfg_channels=None)   # a family with no official code


def official_sampling(family: str) -> dict:
    """The spacing, steps_offset and guided channels of a model family's official sampling code
    (``DEFAULT_SAMPLING`` for a family registered without one)."""
    return dict(OFFICIAL.get(family, DEFAULT_SAMPLING))


def space_timesteps(num_steps: int, spacing: str, count: int | None = None, steps_offset: int = 0) -> list[int]:
    """The ``count`` timesteps (ascending) a sampler visits out of ``num_steps`` training steps.

    * ``even``: improved-diffusion's ``space_timesteps(T, str(count))``: a float cursor advanced by
      (T-1)/(count-1) and rounded, so the chain runs from T-1 to 0 (DDPM-250: 999, 995, ..., 4, 0;
      DDIM-50: 999, 979, 958, ..., 0);
    * ``leading``: diffusers' default, ``arange(count) * (T // count) + steps_offset`` (DDIM-50:
      980, 960, ..., 0), which is improved-diffusion's ``ddim<count>`` whenever that one exists;
    * ``trailing``: diffusers' ``round(arange(T, 0, -T / count)) - 1`` (DDIM-50: 999, 979, ..., 19).

    The old spellings ``"250"`` and ``"ddim50"`` (improved-diffusion's) are still accepted, and
    ``"leading100"`` is the leading chain with ``steps_offset=1`` (HunYuan-DiT's: 991, 981, ..., 1)."""
    if count is None and spacing.startswith("leading"):
        spacing, count, steps_offset = "leading", int(spacing[len("leading"):]), 1
    if count is None:                                    # improved-diffusion's string spelling
        if spacing.startswith("ddim"):
            want = int(spacing[len("ddim"):])
            for stride in range(1, num_steps):
                if len(range(0, num_steps, stride)) == want:
                    return list(range(0, num_steps, stride))
            raise ValueError(f"cannot make {want} evenly strided DDIM steps out of {num_steps}")
        spacing, count = "even", int(spacing)
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; allowed: {', '.join(SPACINGS)}")
    if not (isinstance(count, int) and 1 <= count <= num_steps):
        raise ValueError(f"num_steps={count!r} is not allowed; use an integer in 1..{num_steps}")
    if steps_offset and spacing != "leading":
        raise ValueError(f"steps_offset={steps_offset} only applies to the leading spacing (diffusers adds it "
                         f"there alone); spacing {spacing!r} takes steps_offset=0")
    if spacing == "even":
        stride = (num_steps - 1) / (count - 1) if count > 1 else 1
        cur, taken = 0.0, set()
        for _ in range(count):
            taken.add(round(cur))
            cur += stride
        return sorted(taken)
    if spacing == "leading":
        steps = [i * (num_steps // count) + steps_offset for i in range(count)]
        if steps[-1] >= num_steps:
            raise ValueError(f"steps_offset={steps_offset} pushes the leading chain to t={steps[-1]}; the largest "
                             f"timestep is {num_steps - 1}")
        return steps
    ratio = num_steps / count
    return sorted({int(round(num_steps - i * ratio)) - 1 for i in range(count)})
