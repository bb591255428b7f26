"""Jacobian spectral norms of blocks and of the whole trunk, DiT against Skip-DiT: the measurable
side of the paper's later stability argument (paper-spec 3.5).

    from smoothness.analysis import spectral
    ds = spectral.compute({"DiT": dit, "Skip-DiT": skip}, spectral.SpectralConfig(steps=(10, 250)))
    spectral.plot(ds)

sigma = the largest singular value of d(output)/d(input), from the power sequence of J^T J: J^T u
by ``torch.func.vjp``, J v by transposing that VJP (or by ``torch.func.jvp``, 8x slower on CPU).
``solver="power"`` is plain power iteration; the default ``"lanczos"`` takes the largest Ritz
value on the Krylov space the same products span, which needs 3-5x fewer products on residual
blocks, whose top singular values lie close together. The inputs are the real features of the
uncached chain (one chain per seed, batch 1) at the chosen sampler steps; the conditioning c (from
the timestep and the label) is held fixed, and so is the model. Three maps, per unit u (a unit is
one block on DiT, a (spatial, temporal) pair on Latte):

    block         h -> run_blocks(u, h): the unit's blocks alone, h = their actual input (after the
                  fusion on a Skip-DiT decoder unit);
    unit          h_deep -> run_unit(u, deep=h_deep): fusion included, differentiated along the
                  deep (running) path with the incoming skip held fixed; equal to ``block`` on
                  units without an incoming skip;
    end_to_end    h_embed -> h after the last unit (before the final layer), every unit and
                  fusion included, the skips recomputed from h_embed (so both paths count).

Attention runs on PyTorch's math kernel inside the power iteration (the fused CPU kernel has no
forward-mode derivative); this changes nothing numerically beyond rounding.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import xarray as xr

from .. import chain
from .._moved import moved_names
from ..diffusion import Diffusion, SamplerConfig
from ..models import Captions, caption_attrs

MAPS = ("block", "unit", "end_to_end")
SOLVERS = ("power", "lanczos")
JVPS = ("reverse", "forward")


@dataclass(frozen=True)
class SpectralConfig:
    steps: tuple[int, ...] = (10, 50, 100, 150, 200, 250)   # sampler iterations, 1-based
    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(num_steps=250, clip_denoised=True))
    seeds: tuple[int, ...] = (0,)       # one chain per seed; its x_t at each step gives the features
    class_label: int = 0                # ignored by unconditional models
    caption_embeds: Captions | None = None   # text-to-video models: the one caption of every chain (a path is loaded)
    maps: tuple[str, ...] = MAPS        # which maps to measure
    solver: str = "lanczos"             # lanczos (power iteration's Krylov space, Rayleigh-Ritz) | power
    iterations: int = 100               # most J^T J products per map
    tol: float = 1e-4                   # stop when the estimate changes by less than tol times itself
    power_seed: int = 0                 # seed of every start vector
    jvp: str = "reverse"                # J v by transposing the VJP (fast on CPU) | forward (torch.func.jvp)

    def __post_init__(self):
        object.__setattr__(self, "caption_embeds", Captions.of(self.caption_embeds))
        chain.check_steps(self.steps, self.sampler)
        chain.check_seeds(self.seeds)
        bad = [m for m in self.maps if m not in MAPS]
        if bad or not self.maps:
            raise ValueError(f"unknown map {bad[0] if bad else ''!r}; allowed: {', '.join(MAPS)}")
        if self.solver not in SOLVERS:
            raise ValueError(f"unknown solver {self.solver!r}; allowed: {', '.join(SOLVERS)}")
        if self.jvp not in JVPS:
            raise ValueError(f"unknown jvp {self.jvp!r}; allowed: {', '.join(JVPS)}")
        if not (isinstance(self.iterations, int) and self.iterations >= 1):
            raise ValueError(f"iterations={self.iterations!r} is not allowed; use an integer >= 1")
        if not self.tol >= 0:
            raise ValueError(f"tol={self.tol!r} is not allowed; use a number >= 0")

    def to_json(self) -> str:
        return chain.config_json(self)


@dataclass
class PowerResult:
    sigma: float          # estimate of the largest singular value (a lower bound that rises to it)
    iterations: int       # J^T J products used
    converged: bool       # the last relative change was <= tol (or the Krylov space was exhausted)
    vector: torch.Tensor  # the last right singular vector estimate, shaped as the input


def linearized(f, x: torch.Tensor, jvp: str = "reverse"):
    """(J v, J^T u) of ``f`` at ``x`` as two functions. ``jvp="forward"`` computes J v with
    ``torch.func.jvp`` (forward mode, re-running f each time); ``"reverse"`` transposes the VJP
    (J v is the VJP of the linear map u -> J^T u), which reuses one recorded graph and is about 8x
    faster on CPU for these blocks. Both give the same numbers up to rounding."""
    if jvp not in JVPS:
        raise ValueError(f"unknown jvp {jvp!r}; allowed: {', '.join(JVPS)}")
    out, vjp_fn = torch.func.vjp(f, x)
    jt = lambda u: vjp_fn(u)[0]                                        # J^T u, shaped as x
    if jvp == "forward":
        return (lambda v: torch.func.jvp(f, (x,), (v,))[1]), jt
    _, vjp_of_vjp = torch.func.vjp(jt, torch.zeros_like(out))
    return (lambda v: vjp_of_vjp(v)[0]), jt


def largest_singular_value(f, x: torch.Tensor, iterations: int = 100, tol: float = 1e-4, seed: int = 0,
                           solver: str = "lanczos", jvp: str = "reverse") -> PowerResult:
    """Largest singular value of the Jacobian J of ``f`` at ``x`` (any shapes in and out).

    ``solver="power"``: v <- J^T J v / ||J^T J v||, sigma = ||J v||, stopping once
    |sigma_k - sigma_{k-1}| <= tol * sigma_k. ``"lanczos"``: the same products, but sigma^2 is the
    largest Ritz value of J^T J on the Krylov space they span (full reorthogonalization); it needs
    far fewer products when the top singular values are close, as they are for residual blocks
    (J ~ I + small). Both estimates are lower bounds that rise to sigma. The start vector is
    N(0, 1) from ``torch.Generator().manual_seed(seed)``."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; allowed: {', '.join(SOLVERS)}")
    x = x.detach()
    g = torch.Generator().manual_seed(int(seed))
    v = torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.device, x.dtype)
    v = v / torch.linalg.vector_norm(v)
    with sdpa_kernel(SDPBackend.MATH), torch.enable_grad():
        jv, jt = linearized(f, x, jvp)
        ata = lambda q: jt(jv(q).detach()).detach()                    # J^T J q, shaped as x
        if solver == "lanczos":
            return _lanczos(ata, v, iterations, tol)
        sigma, converged, it = 0.0, False, 0
        for it in range(1, iterations + 1):
            u = jv(v).detach()                                         # J v, shaped as f(x)
            new = float(torch.linalg.vector_norm(u.double()))
            w = jt(u).detach()                                         # J^T J v
            norm = torch.linalg.vector_norm(w)
            done = abs(new - sigma) <= tol * new
            sigma = new
            if norm == 0 or not torch.isfinite(norm):
                break
            v = w / norm
            if done:
                converged = True
                break
    return PowerResult(sigma, it, converged, v)


def power_iteration(f, x: torch.Tensor, iterations: int = 100, tol: float = 1e-4, seed: int = 0,
                    jvp: str = "reverse") -> PowerResult:
    """Plain power iteration on J^T J (``largest_singular_value`` with ``solver="power"``)."""
    return largest_singular_value(f, x, iterations, tol, seed, "power", jvp)


def _lanczos(ata, q: torch.Tensor, iterations: int, tol: float) -> PowerResult:
    shape, dtype = q.shape, q.dtype
    basis = torch.zeros(iterations + 1, q.numel(), dtype=torch.float64, device=q.device)   # (k, n) orthonormal rows
    basis[0] = q.reshape(-1).double()
    alphas, betas = [], []
    theta, converged, it, ritz = 0.0, False, 0, np.ones(1)
    for it in range(1, iterations + 1):
        w = ata(basis[it - 1].reshape(shape).to(dtype)).reshape(-1).double()
        alphas.append(float(basis[it - 1] @ w))
        for _ in range(2):                                             # full reorthogonalization, twice
            w = w - basis[:it].T @ (basis[:it] @ w)
        beta = float(torch.linalg.vector_norm(w))
        t = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)   # (it, it) tridiagonal
        vals, vecs = np.linalg.eigh(t)
        new, ritz = float(vals[-1]), vecs[:, -1]
        done = abs(new - theta) <= tol * abs(new) or beta <= 1e-10 * max(abs(new), 1e-300)
        theta = new
        if done:
            converged = True
            break
        betas.append(beta)
        basis[it] = w / beta
    vec = (torch.from_numpy(ritz).to(basis) @ basis[:len(ritz)]).reshape(shape).to(dtype)
    return PowerResult(float(np.sqrt(max(theta, 0.0))), it, converged, vec)


# ------------------------------------------------------------------ the maps
def _copy(trunk, h=None):
    """A trunk with its own skip dict (``run_unit`` pops from it), optionally a new hidden state."""
    return replace(trunk, h=trunk.h if h is None else h, skips=dict(trunk.skips))


def unit_inputs(model, x, t, y) -> tuple[object, list[dict]]:
    """Run one uncached forward; returns the embedded trunk and, per unit, its deep input, the
    input of its blocks (after any fusion) and a copy of the trunk as the unit found it."""
    trunk = model.embed(x, t, y)
    start = _copy(trunk)
    per_unit = []
    for u in range(model.num_units):
        before = _copy(trunk)
        h_in = trunk.h
        if u in model.skip_into:
            src, k = model.skip_into[u]
            h_in = model.fuse(k, trunk.h, trunk.skips[src])
        per_unit.append({"deep": trunk.h.detach(), "blocks_in": h_in.detach(), "trunk": before})
        model.run_unit(u, trunk)
    return start, per_unit


def block_map(model, u: int, trunk):
    return lambda h: model.run_blocks(u, h, trunk)


def unit_map(model, u: int, trunk):
    return lambda h: model.run_unit(u, _copy(trunk), deep=h).h


def end_to_end_map(model, trunk):
    def f(h):
        tr = replace(trunk, h=h, skips={})
        for u in range(model.num_units):
            model.run_unit(u, tr)
        return tr.h
    return f


# ------------------------------------------------------------------ compute
def compute(models, cfg: SpectralConfig = SpectralConfig(), log=None) -> xr.Dataset:
    """``sigma_block`` and ``sigma_unit`` (model, unit, step, seed), ``sigma_end_to_end`` (model, step,
    seed) and the iterations each used (``iterations_*``). ``models``: {label: model} or entries."""
    entries = chain.as_entries(models)
    diffusion = Diffusion.for_config(cfg.sampler)
    captions = cfg.caption_embeds
    for e in entries:                                                  # validate before any work
        chain.labels(e.model, cfg.class_label, who=e.label, captions=captions)
    steps, seeds = sorted(cfg.steps), list(cfg.seeds)
    n_units = max(e.model.num_units for e in entries)
    size = {"block": (len(entries), n_units, len(steps), len(seeds)), "unit": (len(entries), n_units, len(steps), len(seeds)),
            "end_to_end": (len(entries), len(steps), len(seeds))}
    sig = {k: np.full(size[k], np.nan) for k in cfg.maps}
    its = {k: np.full(size[k], -1) for k in cfg.maps}
    for m, e in enumerate(entries):
        model = e.model.eval()
        device, dtype = chain.model_device_dtype(model)
        y = chain.labels(model, cfg.class_label, 1, device, captions=captions, dtype=dtype)
        for j, seed in enumerate(seeds):
            with torch.inference_mode():
                records = chain.reference_chain(model, diffusion, cfg.sampler, seed, cfg.class_label, captions=captions)
                xs = {rec.step: rec.x_t.clone() for rec in chain.at_steps(records, steps)}
            for i, s in enumerate(steps):
                t = torch.full((1,), diffusion.timestep_of(s), dtype=torch.long, device=device)
                with torch.no_grad():
                    start, per_unit = unit_inputs(model, xs[s].clone(), t, y)
                run = lambda f, h: largest_singular_value(f, h, cfg.iterations, cfg.tol, cfg.power_seed, cfg.solver, cfg.jvp)
                for u, info in enumerate(per_unit):
                    if "block" in cfg.maps:
                        r = run(block_map(model, u, info["trunk"]), info["blocks_in"])
                        sig["block"][m, u, i, j], its["block"][m, u, i, j] = r.sigma, r.iterations
                    if "unit" in cfg.maps:
                        r = run(unit_map(model, u, info["trunk"]), info["deep"])
                        sig["unit"][m, u, i, j], its["unit"][m, u, i, j] = r.sigma, r.iterations
                if "end_to_end" in cfg.maps:
                    r = run(end_to_end_map(model, start), start.h.detach())
                    sig["end_to_end"][m, i, j], its["end_to_end"][m, i, j] = r.sigma, r.iterations
            if log:
                log(f"{e.label} seed {seed}: spectral norms at steps {steps} done")
    return _dataset(entries, cfg, diffusion, steps, seeds, n_units, sig, its)


def _dataset(entries, cfg, diffusion, steps, seeds, n_units, sig, its) -> xr.Dataset:
    long = {"block": "largest singular value of d run_blocks(u, h) / dh (the unit's blocks alone)",
            "unit": "largest singular value of d run_unit(u, deep=h) / dh (fusion included, skip fixed)",
            "end_to_end": "largest singular value of d h_final / d h_embed (all units and skips)"}
    ds = xr.Dataset(coords={
        "model": [e.label for e in entries],
        "unit": ("unit", np.arange(n_units), {"long_name": "unit index (one block on DiT)"}),
        "blocks": (("model", "unit"), np.array([[",".join(map(str, e.model.unit_blocks(u))) if u < e.model.num_units
                                                 else "" for u in range(n_units)] for e in entries], dtype=str)),
        "skip_in": (("model", "unit"), np.array([[int(u in getattr(e.model, "skip_into", {})) for u in range(n_units)]
                                                 for e in entries]), {"long_name": "1 where a skip is fused in"}),
        "step": ("step", steps, {"long_name": "sampler iteration (1-based)"}),
        "timestep": ("step", [diffusion.timestep_of(s) for s in steps],
                     {"long_name": "DDPM timestep t on the 1000-step scale"}),
        "seed": seeds})
    for k in cfg.maps:
        dims = ("model", "step", "seed") if k == "end_to_end" else ("model", "unit", "step", "seed")
        ds[f"sigma_{k}"] = (dims, sig[k], {"long_name": long[k], "units": "1", "map": k})
        ds[f"iterations_{k}"] = (dims, its[k], {"long_name": f"power iterations used ({k})", "units": "1"})
    ds.attrs.update(title="Jacobian spectral norms", config=cfg.to_json(), iterations=cfg.iterations, tol=cfg.tol,
                    power_seed=cfg.power_seed, solver=cfg.solver, jvp=cfg.jvp, seeds=json.dumps(seeds), class_label=cfg.class_label,
                    maps=",".join(cfg.maps), method=f"{cfg.solver} iteration on J^T J (torch.func vjp, J v by {cfg.jvp} mode), math attention",
                    **chain.sampler_attrs(cfg.sampler), **chain.provenance(entries),
                    **caption_attrs(cfg.caption_embeds))
    return ds


__getattr__ = moved_names(__name__, {"plot": "smoothness.plots.analysis:spectral_norms"})
