"""Calibration files: what the calibrated caches need, from one recorded uncached run.

    cal = calibrate(model, diffusion, shape, y, sampler, seed=0)
    cal.save("calibration.json")            # python -m smoothness.cache calibrate --model ... does this
    CacheConfig(method="magcache", calibration="calibration.json")

One uncached chain is run with the model's forward observed (``hooks.override``); per step s and per
row it records r_s = h_L - h_0 (output of the last unit minus input of the first), block 0's
modulated input m_s and the model output o_s. From these:

* **teacache**: the degree-4 polynomial (highest power first, as TeaCache) fitted by least squares
  to the points (rel-L1(m_s, m_(s-1)), rel-L1(o_s, o_(s-1))) of every row and step s >= 2;
* **magcache**: gamma_s = mean over the rows of a CFG half and over tokens of |r_s| / |r_(s-1)|
  (gamma_1 = 1), one list per half ("cond", "uncond"; "all" without guidance);
* **masks** (cache-dit ``steps_computation_mask`` / SmoothCache): for every budget b (the fraction of
  steps computed), SmoothCache's rule (compute step s iff the mean rel-L1 error of reusing the last
  computed step's r exceeds alpha) with the smallest alpha whose mask computes at most ceil(b * S) steps.

The file records the model's weights sha256 (and the checkpoint file's, when known), the sampler
chain (label, timesteps, guidance) and the seed; ``check_model`` and ``check_step`` refuse to use it
with another model or chain (one line each).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import hooks
from ..io_utils import atomic_path
from ..models.dit import modulate
from .schedule import Schedule

BUDGETS = (0.5, 0.34, 0.25)      # default mask budgets: fraction of the steps computed


def weights_sha256(model) -> str:
    """sha256 over the model's state dict (names, dtypes, shapes and bytes, in order): the model's
    identity whatever file it came from."""
    h = hashlib.sha256()
    for name, v in model.state_dict().items():
        v = v.detach().cpu().contiguous()
        h.update(f"{name}:{v.dtype}:{tuple(v.shape)};".encode())
        h.update(v.view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


@dataclass(frozen=True)
class Calibration:
    model_sha256: str                   # weights_sha256 of the calibrated model
    chain: str                          # sampler label, e.g. "DDPM-50"
    timesteps: tuple[int, ...]          # the chain, sampling order, 1000 scale
    cfg_scale: float                    # guidance of the calibration run
    seed: int                           # seed of the calibration run
    teacache: tuple[float, ...]         # polynomial coefficients, highest power first
    magcache: dict = field(default_factory=dict)   # half -> gamma per step
    masks: dict = field(default_factory=dict)      # budget -> {"mask": "1010...", "alpha": float}
    file_sha256: str = ""               # sha256 of the checkpoint file, when known
    model: str = ""                     # the model's label

    def schedule(self, budget: float) -> Schedule:
        """The SmoothCache mask of ``budget`` as a Schedule on the calibrated chain: CacheConfig(mask=...)
        runs it with any static method."""
        key = f"{budget:g}"
        if key not in self.masks:
            raise ValueError(f"budget {budget:g} is not in the calibration file; allowed: {', '.join(self.masks)}")
        return Schedule.from_cache_dit(self.masks[key]["mask"], self.timesteps)

    def rescale(self, rel: np.ndarray) -> np.ndarray:
        return np.polyval(np.asarray(self.teacache), rel)

    def check_model(self, model):
        got = weights_sha256(model)
        if got != self.model_sha256:
            raise ValueError(f"calibration file made for model {self.model_sha256[:12]} ({self.model or 'unnamed'}) "
                             f"but this model is {got[:12]}; calibrate this model (python -m smoothness.cache calibrate)")

    def check_step(self, step: int, timestep: int, guided: bool):
        if step > len(self.timesteps) or self.timesteps[step - 1] != timestep:
            raise ValueError(f"calibration file made for chain {self.chain} (t = {self.timesteps[0]}.."
                             f"{self.timesteps[-1]}, {len(self.timesteps)} steps) but step {step} runs t = {timestep}; "
                             "calibrate with this sampler and number of steps")
        if guided != ("cond" in self.magcache):
            raise ValueError(f"calibration file made {'with' if 'cond' in self.magcache else 'without'} guidance "
                             f"but this chain runs {'with' if guided else 'without'}; calibrate with this --cfg-scale")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    def save(self, path) -> Path:
        with atomic_path(path) as tmp:
            Path(tmp).write_text(self.to_json())
        return Path(path)


def load_calibration(path) -> Calibration:
    try:
        data = json.loads(Path(path).read_text())
        data["timesteps"], data["teacache"] = tuple(data["timesteps"]), tuple(data["teacache"])
        return Calibration(**data)
    except (OSError, json.JSONDecodeError, TypeError, KeyError) as e:
        raise ValueError(f"calibration file {str(path)!r} cannot be read ({type(e).__name__}: {e}); "
                         "write one with python -m smoothness.cache calibrate") from None


def _rel_l1(a: torch.Tensor, b: torch.Tensor, n: int) -> torch.Tensor:
    """mean|a - b| / mean|b| per sample (N,), for tensors of N*R rows."""
    return ((a - b).abs().reshape(n, -1).mean(1) / b.abs().reshape(n, -1).mean(1)).double()


def modulated_input(model, trunk) -> torch.Tensor:
    """Block 0's modulated input modulate(norm1(h), shift_msa, scale_msa), (N*R, T, H); the block's
    input itself for blocks without adaLN-Zero."""
    block = model.blocks[model.unit_blocks(0)[0]]
    if not hasattr(block, "adaLN_modulation"):
        return trunk.h
    c = trunk.c.repeat_interleave(trunk.h.shape[0] // trunk.c.shape[0], dim=0)
    shift, scale = block.adaLN_modulation(c).chunk(6, dim=1)[:2]
    return modulate(block.norm1(trunk.h), shift, scale)


class _Recorder:
    """The model's forward, observed: per call r, m (per row) and the output."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def forward(self, x, t, y=None):
        model = self.model
        trunk = model.embed(x, t, y)
        h0 = trunk.h
        m = modulated_input(model, trunk)
        for u in range(model.num_units):
            model.run_unit(u, trunk)
        out = model.head(trunk)
        self.calls.append({"r": (trunk.h - h0).float(), "m": m.float(), "out": out.float(), "n": x.shape[0],
                           "guided": hooks.current_cfg_rows() is not None})
        return out


def calibrate(model, diffusion, shape, y, sampler, seed: int = 0, budgets=BUDGETS, label: str = "",
              file_sha256: str = "") -> Calibration:
    """Run one uncached chain of ``model`` and fit every calibration from it (see the module doc)."""
    for b in budgets:
        if not (isinstance(b, (int, float)) and 0 < b <= 1):
            raise ValueError(f"budget {b!r} is not allowed; use a fraction of the steps computed in (0, 1]")
    rec = _Recorder(model)
    with torch.inference_mode(), hooks.override({model: rec.forward}):
        for _ in diffusion.sample_steps(model, shape, y, sampler, seed=seed):
            pass
    calls = rec.calls
    guided = calls[0]["guided"]
    x, yv = [], []
    for prev, cur in zip(calls, calls[1:]):
        x.append(_rel_l1(cur["m"], prev["m"], cur["n"]).numpy())
        yv.append(_rel_l1(cur["out"], prev["out"], cur["n"]).numpy())
    x, yv = np.concatenate(x), np.concatenate(yv)
    coef = tuple(float(c) for c in np.polyfit(x, yv, 4)) if len(x) >= 5 else (0.0, 0.0, 0.0, 1.0, 0.0)
    return Calibration(model_sha256=weights_sha256(model), chain=sampler.label, timesteps=tuple(diffusion.chain),
                       cfg_scale=float(sampler.cfg_scale), seed=int(seed), teacache=coef,
                       magcache=_magcache(calls, guided), masks=_masks([c["r"] for c in calls], calls[0]["n"], budgets),
                       file_sha256=file_sha256, model=label)


def _magcache(calls, guided: bool) -> dict:
    """gamma per step and CFG half: mean over rows and tokens of |r_s| / |r_(s-1)|."""
    out = {}
    n = calls[0]["n"]
    halves = {"cond": slice(0, n // 2), "uncond": slice(n // 2, n)} if guided else {"all": slice(0, n)}
    for half, rows in halves.items():
        gammas = [1.0]
        for prev, cur in zip(calls, calls[1:]):
            a, b = _rows_of(cur["r"], rows, n), _rows_of(prev["r"], rows, n)
            gammas.append(float((a.norm(dim=-1) / b.norm(dim=-1)).mean()))
        out[half] = gammas
    return out


def _rows_of(v: torch.Tensor, rows: slice, n: int) -> torch.Tensor:
    per = v.shape[0] // n                                      # R rows per sample (frames of a video)
    return v[rows.start * per: rows.stop * per]


def _masks(rs: list[torch.Tensor], n: int, budgets) -> dict:
    """SmoothCache masks: for each budget the smallest alpha whose greedy mask fits it."""
    S = len(rs)
    err = np.zeros((S, S))
    for s in range(S):
        for j in range(s):
            err[s, j] = float(_rel_l1(rs[s], rs[j], n).mean())

    def mask(alpha):
        full, last = [True], 0
        for s in range(1, S):
            f = err[s, last] > alpha
            full.append(bool(f))
            last = s if f else last
        return full

    out = {}
    candidates = sorted({0.0, *err[np.tril_indices(S, -1)].tolist()})
    for b in budgets:
        target = math.ceil(b * S)
        alpha = next(a for a in candidates if sum(mask(a)) <= target)
        out[f"{b:g}"] = {"mask": "".join("1" if f else "0" for f in mask(alpha)), "alpha": alpha}
    return out
