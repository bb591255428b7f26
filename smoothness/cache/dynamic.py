"""Dynamic caches: each row of the batch decides at every call, from a signal of the current step.

Every row (each sample, and each CFG half of it) keeps its own state in ``state.rows`` and decides
alone, so a batch of two gives the decisions of the two run alone, and the conditional half never
drives the unconditional one. Rows that compute run the skipped units as one sub-batch; when every
row computes, the call is the plain forward (bit-identical). Threshold 0 never caches.

* ``fbcache`` / ``dbcache`` (FirstBlockCache, cache-dit DBCache): run the first Fn units; the
  residual r = h_out(Fn-1) - h_in(0); d = mean|r - r_ref| / mean|r_ref| with r_ref the r of the row's
  last full step. The row is cached iff the step is past the warm-up W, d < tau and it has been
  cached fewer than M times in a row: then h_in(L-Bn) = h_out(Fn-1) + R_mid, R_mid = h_in(L-Bn) -
  h_out(Fn-1) stored at the row's last full step, and the last Bn units run. Otherwise every unit
  runs and r_ref, R_mid are refreshed. fbcache: Fn 1, Bn 0, tau 0.05, W 0; dbcache: Fn = Bn = 1,
  tau 0.08, W 8. On a Skip-DiT Bn <= Fn (the back units fuse fresh skips of front units); Fn = Bn = k
  is Skip-Cache's compute pattern with a dynamic decision and a stored residual. With ``forecast``
  R_mid is forecast per row from the row's own last full steps (forecast.py).
* ``magcache`` (MagCache): calibrated gamma_s = mean over tokens of |r_s| / |r_(s-1)|, r = output of
  the last unit - input of the first, per CFG half. After the first round(retention * S) steps a row
  accumulates R <- R * gamma_s, E <- E + |1 - R|, n <- n + 1 and reuses its last residual
  (h_L = h_in + r) iff E <= tau and n <= K; else it computes and resets R = 1, E = 0, n = 0.
  Defaults tau 0.24, K 5, retention 0.1 (diffusers); the author's setting is (0.06, 3, 0.2).
* ``teacache`` (TeaCache): the relative L1 change of block 0's modulated input,
  mean|m_s - m_(s-1)| / mean|m_(s-1)|, rescaled by the calibrated degree-4 polynomial, accumulates;
  the row reuses its last residual while the sum stays below tau, else computes and resets the sum.
  The first and the last step of the calibrated chain always compute. Default tau 0.2.
"""
from __future__ import annotations

import dataclasses

import torch

from .. import hooks
from . import flops
from .base import Method, register
from . import forecast
from .calibrate import Calibration, load_calibration, modulated_input


def _expand(mask: torch.Tensor, rows: int) -> torch.Tensor:
    """A per-sample mask (N,) for a tensor with ``rows`` rows, batch-major (N*F rows for video)."""
    return mask.repeat_interleave(rows // mask.shape[0])


def _take(trunk, mask: torch.Tensor):
    """The trunk restricted to the samples in ``mask`` (every per-row tensor field, skips included)."""
    n = mask.shape[0]
    pick = lambda v: v[_expand(mask, v.shape[0])] if torch.is_tensor(v) and v.dim() and v.shape[0] % n == 0 else v
    fields = {f.name: getattr(trunk, f.name) for f in dataclasses.fields(trunk)}
    fields = {k: ({s: pick(v) for s, v in val.items()} if k == "skips" else pick(val)) for k, val in fields.items()}
    return type(trunk)(**fields)


def per_sample(v: torch.Tensor, n: int) -> torch.Tensor:
    """Mean of |v| per sample: (N*R, ...) -> (N,)."""
    return v.abs().reshape(n, -1).mean(1)


def run_rows(model, trunk, units, mask: torch.Tensor) -> torch.Tensor | None:
    """Run ``units`` on the samples in ``mask``; in place when every sample runs. Returns the new h of
    those samples (rows of the trunk), or None when no sample runs."""
    units = list(units)
    if bool(mask.all()):
        for u in units:
            model.run_unit(u, trunk)
        return trunk.h
    if not bool(mask.any()):
        return None
    sub = _take(trunk, mask)
    for u in units:
        model.run_unit(u, sub)
    return sub.h


def _merge(h: torch.Tensor, fresh: torch.Tensor | None, mask: torch.Tensor, reused: torch.Tensor) -> torch.Tensor:
    """h of every row: ``fresh`` for the computing samples, ``reused`` for the others."""
    if bool(mask.all()):
        return fresh
    out = reused.clone()
    if fresh is not None:
        out[_expand(mask, h.shape[0])] = fresh
    return out


def _rows(state, x) -> dict:
    """The per-row state of this chain; created at the first call, checked against the batch."""
    if state.rows is None:
        state.rows = {"batch": tuple(x.shape), "run": torch.zeros(x.shape[0], dtype=torch.long)}
    elif state.rows["batch"] != tuple(x.shape):
        raise ValueError(f"the batch changed from {state.rows['batch']} to {tuple(x.shape)} between calls; "
                         "call state.reset() between generations of different sizes")
    return state.rows


def _store(rows: dict, key: str, fresh: torch.Tensor, mask: torch.Tensor, like: torch.Tensor):
    """rows[key] <- ``fresh`` on the samples in mask (``fresh`` holds only those rows, shaped as ``like``'s)."""
    if bool(mask.all()):
        rows[key] = fresh
        return
    new = rows[key].clone() if key in rows else torch.zeros_like(like)
    new[_expand(mask, like.shape[0])] = fresh
    rows[key] = new


def _count(state, compute: torch.Tensor, rows: dict):
    state.note("full", int(compute.sum()))
    state.note("cached", int((~compute).sum()))
    rows["run"] = torch.where(compute, torch.zeros_like(rows["run"]), rows["run"] + 1)


class _Dynamic(Method):
    dynamic = True
    disabled = {"threshold": 0}

    @classmethod
    def validate(cls, config):
        if config.threshold is not None and config.threshold < 0:      # CacheConfig already refuses it
            raise ValueError(f"threshold={config.threshold} is not allowed; use >= 0")


@register
class BlockCache(_Dynamic):
    """dbcache (cache-dit DBCache): Fn front and Bn back units always run; the middle residual is reused."""

    name = "dbcache"
    uses = ("threshold", "fn", "bn", "warmup", "max_cached", "forecast")
    defaults = {"threshold": 0.08, "fn": 1, "bn": 1, "warmup": 8, "max_cached": None}
    example = {"threshold": 0.5, "warmup": 2, "max_cached": 2}
    sweep = ({"threshold": 0.08}, {"threshold": 0.16}, {"threshold": 0.32})

    @classmethod
    def sweep_settings(cls, ks, thresholds=None) -> list[dict]:
        """The thresholds, plus the Skip-DiT pairing Fn = Bn = k (Skip-Cache's compute pattern) at each k."""
        plain = super().sweep_settings(ks, thresholds)
        paired = [dict(d, fn=k, bn=k) for k in ks if k > 1 for d in plain] if cls.name == "dbcache" else []
        return plain + paired

    @classmethod
    def check(cls, model, config):
        super().check(model, config)
        fn, bn, L = config.get("fn"), config.get("bn"), model.num_units
        if fn + bn > L:
            raise ValueError(f"fn={fn} + bn={bn} is not allowed for a model with {L} units; use fn + bn <= {L}")
        if model.skip_into and bn > fn:
            raise ValueError(f"bn={bn} > fn={fn} is not allowed on a model with skip branches: the back units "
                             "fuse skips of front units (use bn <= fn; fn = bn = k pairs them as Skip-Cache)")

    def forward(self, model, state, x, t, y, full):
        cfg, L, n = state.config, model.num_units, x.shape[0]
        fn, bn, tau = cfg.get("fn"), cfg.get("bn"), cfg.get("threshold")
        rows = _rows(state, x)
        trunk = model.embed(x, t, y)
        h0 = trunk.h
        for u in range(fn):
            model.run_unit(u, trunk)
        front = trunk.h                                                     # h_out(Fn-1), (N*R, T, H)
        r = front - h0
        compute = torch.ones(n, dtype=torch.bool)
        if "r_ref" in rows and state.position > cfg.get("warmup") and tau > 0:
            d = per_sample(r - rows["r_ref"], n) / per_sample(rows["r_ref"], n)
            compute = ~(d < tau)
            if cfg.get("max_cached") is not None:
                compute |= rows["run"] >= cfg.get("max_cached")
        fresh = run_rows(model, trunk, range(fn, L - bn), compute)
        if fresh is not None:
            sel = _expand(compute, front.shape[0])
            _store(rows, "r_ref", r[sel], compute, r)
            _store(rows, "mid", fresh - front[sel], compute, front)                 # R_mid of computing rows
            if cfg.forecast != "reuse":
                forecast.remember_rows(rows, "mid", rows["mid"], compute, state.position)
        if not bool(compute.all()):
            mid = forecast.recall_rows(cfg.forecast, rows, "mid", rows["mid"], state.position)
            trunk.h = _merge(front, fresh, compute, front + mid)
        for u in range(L - bn, L):
            model.run_unit(u, trunk)
        _count(state, compute, rows)
        return model.head(trunk)

    def call_macs(self, shape, config, kind):
        if kind == "full":
            return shape.full_call()
        U, fn, bn = shape.units, config.get("fn"), config.get("bn")
        return flops.always_macs(shape) + flops.units_macs(shape, list(range(fn)) + list(range(U - bn, U)))


@register
class FirstBlockCache(BlockCache):
    """fbcache (FirstBlockCache): unit 0 always runs, the whole tail's residual is reused."""

    name = "fbcache"
    defaults = {"threshold": 0.05, "fn": 1, "bn": 0, "warmup": 0, "max_cached": None}
    sweep = ({"threshold": 0.05}, {"threshold": 0.1}, {"threshold": 0.2})


class _Residual(_Dynamic):
    """Reuse of the whole unit stack's residual r = h_L - h_0, per row; subclasses decide."""

    calibration = "chain"

    @classmethod
    def check(cls, model, config):
        super().check(model, config)
        calibration(config).check_model(model)

    def decide(self, state, rows, trunk, calib, n, model) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, model, state, x, t, y, full):
        n, calib = x.shape[0], calibration(state.config)
        rows = _rows(state, x)
        calib.check_step(state.position, int(t.reshape(-1)[0]), hooks.current_cfg_rows() is not None)
        trunk = model.embed(x, t, y)
        h0 = trunk.h
        compute = self.decide(state, rows, trunk, calib, n, model)
        if "resid" not in rows:
            compute = torch.ones(n, dtype=torch.bool)
        fresh = run_rows(model, trunk, range(model.num_units), compute)
        if fresh is not None:
            _store(rows, "resid", fresh - h0[_expand(compute, h0.shape[0])], compute, h0)   # r = h_L - h_0
        if not bool(compute.all()):
            trunk.h = _merge(h0, fresh, compute, h0 + rows["resid"])
        _count(state, compute, rows)
        return model.head(trunk)

    def call_macs(self, shape, config, kind):
        if kind == "full":
            return shape.full_call() + self.signal_macs(shape)
        return flops.always_macs(shape) + self.signal_macs(shape)

    def signal_macs(self, shape) -> int:
        return 0


def calibration(config) -> Calibration:
    """The config's calibration, loaded (a path is read once per config object)."""
    c = config.calibration
    return c if isinstance(c, Calibration) else load_calibration(c)


def _halves(n: int) -> list[str]:
    """The CFG half of every row: "cond" then "uncond" in a guided batch, else "all"."""
    cond = hooks.current_cfg_rows()
    return ["all"] * n if cond is None else ["cond"] * (n // 2) + ["uncond"] * (n - n // 2)


@register
class MagCache(_Residual):
    name = "magcache"
    uses = ("threshold", "max_cached", "retention", "calibration")
    defaults = {"threshold": 0.24, "max_cached": 5, "retention": 0.1}
    example = {"threshold": 0.5, "max_cached": 2, "retention": 0.2}
    sweep = ({"threshold": 0.24, "max_cached": 5, "retention": 0.1},     # diffusers' defaults
             {"threshold": 0.06, "max_cached": 3, "retention": 0.2},     # the author's setting
             {"threshold": 0.5, "max_cached": 5, "retention": 0.1})

    @classmethod
    def sweep_settings(cls, ks, thresholds=None) -> list[dict]:
        if thresholds:
            return [{"threshold": float(t), "max_cached": 5, "retention": 0.1} for t in thresholds]
        return [dict(d) for d in cls.sweep]

    def decide(self, state, rows, trunk, calib, n, model):
        cfg, s = state.config, state.position
        tau, K = cfg.get("threshold"), cfg.get("max_cached")
        if "R" not in rows:
            rows.update(R=torch.ones(n, dtype=torch.float64), E=torch.zeros(n, dtype=torch.float64))
        if s <= round(cfg.get("retention") * len(calib.timesteps)) or tau == 0:
            return torch.ones(n, dtype=torch.bool)
        gamma = torch.tensor([calib.magcache[h][s - 1] for h in _halves(n)], dtype=torch.float64)
        R = rows["R"] * gamma
        E = rows["E"] + (1 - R).abs()
        reuse = (E <= tau) & (rows["run"] + 1 <= K)
        rows["R"], rows["E"] = torch.where(reuse, R, 1.0), torch.where(reuse, E, 0.0)
        return ~reuse


@register
class TeaCache(_Residual):
    name = "teacache"
    uses = ("threshold", "calibration")
    defaults = {"threshold": 0.2}
    example = {"threshold": 0.5}
    sweep = ({"threshold": 0.1}, {"threshold": 0.2}, {"threshold": 0.4})

    @classmethod
    def check(cls, model, config):
        first = model.blocks[model.unit_blocks(0)[0]]
        if not hasattr(first, "adaLN_modulation"):
            raise ValueError(f"teacache needs adaLN-Zero blocks (DiT, Latte); {type(model).__name__}'s first block "
                             f"({type(first).__name__}) has no adaLN_modulation")
        super().check(model, config)

    def decide(self, state, rows, trunk, calib, n, model):
        m = modulated_input(model, trunk)
        s, last = state.position, len(calib.timesteps)
        compute = torch.ones(n, dtype=torch.bool)
        tau = state.config.get("threshold")
        if "m_prev" in rows and 1 < s < last and tau > 0:
            rel = (per_sample(m - rows["m_prev"], n) / per_sample(rows["m_prev"], n)).double()
            acc = rows["acc"] + torch.tensor(calib.rescale(rel.numpy()), dtype=torch.float64)
            compute = acc >= tau
            rows["acc"] = torch.where(compute, 0.0, acc)
        else:
            rows["acc"] = torch.zeros(n, dtype=torch.float64)
        rows["m_prev"] = m
        return compute

    def signal_macs(self, shape) -> int:
        return 6 * shape.hidden * shape.hidden * (shape.frames or 1)      # block 0's adaLN Linear(H, 6H), per row

