"""Batched evaluation of a perturbed model at many (alpha, beta) grid points in one forward.

Grid points are stacked along the batch, group-major: rows [g*R, (g+1)*R) belong to point g (R rows
per point: the samples, times two with classifier-free guidance).

* ``weights``: theta' = theta + alpha*d1 + beta*d2 (the paper's). Every selected Linear runs as one
  ``baddbmm`` with per-point weights W + alpha_g*D1 + beta_g*D2, so a chunk of G points costs about
  one plain forward of G*R rows. Directions are generated per tensor from the seed (and cached
  unless ``cache_directions=False``, which keeps peak memory at one layer's directions).
* ``features``: alpha*d1 + beta*d2 is added to a site's output, each direction scaled per token to
  that token's feature norm. At unit-output sites the unperturbed prefix runs once on R rows and is
  tiled; other sites are perturbed through a hook on the full batch.
* ``latent``: the same on the model input x_t, scaled per pixel.

The reference for every comparison is the origin point evaluated by the same batched code, so
alpha = beta = 0 reproduces it bit for bit (similarity exactly 1).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from .. import hooks
from ..diffusion import guide, guided_channels
from .grouped import conv, embedding, layer_norm, linear_bias_only
from .perturb import DirectionSpec, direction, feature_direction, select_parameters

MODES = ("weights", "features", "latent")
LINEARITY_ROWS = 16     # at most this many rows per grid point: perturb by linearity, not weight copies
CHUNK_BYTES = 1 << 21   # per-point Linear weights are built this many bytes at a time (stays in L3)
RUN_BUILD = True        # build W + alpha*D1 once per run of equal alpha (grid rows), see _runs


@dataclass(frozen=True)
class Perturbation:
    mode: str = "weights"            # weights | features | latent
    directions: DirectionSpec = DirectionSpec()
    site: str | None = None          # the perturbed site for mode="features" (e.g. "blocks.5")

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown perturbation mode {self.mode!r}; allowed: {', '.join(MODES)}")
        if self.mode == "features" and not self.site:
            raise ValueError("mode='features' needs a site to perturb, e.g. site='blocks.5'")
        if self.mode != "features" and self.site:
            raise ValueError(f"site={self.site!r} is only used by mode='features'; mode={self.mode!r} does not "
                             "perturb a site")
        if self.mode != "weights":           # options that would silently do nothing
            d, unused = self.directions, DirectionSpec()
            for name in ("norm", "params", "include_1d"):
                if getattr(d, name) != getattr(unused, name):
                    raise ValueError(f"{name}={getattr(d, name)!r} is a weights-mode setting; mode={self.mode!r} "
                                     "does not use it")


class GridEngine:
    """Evaluate ``model`` under a perturbation at a chunk of grid points."""

    def __init__(self, model: nn.Module, perturbation: Perturbation, cache_directions: bool = True,
                 chunk_points: int | None = None):
        if chunk_points is not None and chunk_points < 1:
            raise ValueError(f"chunk_points must be a positive integer or None (automatic), got {chunk_points!r}")
        self.model = model
        self.p = perturbation
        self.cache_directions = cache_directions
        self.chunk_points = chunk_points    # grid points per weight build of a Linear; None: CHUNK_BYTES
        self._dirs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if perturbation.mode == "weights":
            self.param_names = select_parameters(model, perturbation.directions)
            self._check_modules()
        elif perturbation.mode == "features":
            hooks.resolve_sites(model, perturbation.site)        # validates the site name
            self.param_names = []
        else:
            self.param_names = []

    # ------------------------------------------------------------ directions
    def _cached(self, key: str, make):
        if key in self._dirs:
            return self._dirs[key]
        pair = make()
        if self.cache_directions:
            self._dirs[key] = pair
        return pair

    def _pair(self, name: str, weight: torch.Tensor):
        spec = self.p.directions
        return self._cached(name, lambda: tuple(direction(weight, name, i, spec).to(weight.dtype) for i in (1, 2)))

    def _pair_t(self, name: str, weight: torch.Tensor):
        """Directions of a Linear weight, transposed to (in, out) and contiguous, as the GEMMs use them."""
        spec = self.p.directions
        make = lambda i: direction(weight, name, i, spec).to(weight.dtype).t().contiguous()   # (in, out)
        return self._cached(name + ".T", lambda: (make(1), make(2)))

    def _check_modules(self):
        chosen = set(self.param_names)
        for mname, module in self.model.named_modules():
            own = {f"{mname}.{n}" if mname else n for n, _ in module.named_parameters(recurse=False)}
            if own & chosen and not (isinstance(module, (nn.Linear, nn.Conv2d, nn.LayerNorm, nn.Embedding))
                                     or self._forward_grouped(module) is not None):
                raise ValueError(f"cannot perturb parameters of {mname!r} ({type(module).__name__}); "
                                 "supported: Linear, Conv2d, LayerNorm, Embedding and modules with "
                                 "forward_grouped")

    def _forward_grouped(self, module: nn.Module):
        """``forward_grouped(values, groups, *args, **kw)`` of a module that uses its own parameters
        directly: its own method, or one its model provides for it (diffusers adapters); else None."""
        if hasattr(module, "forward_grouped"):
            return module.forward_grouped
        provide = getattr(self.model, "grouped_forward", None)
        return provide(module) if provide is not None else None

    # -------------------------------------------------------------- weights
    def _grouped(self, module: nn.Module, mname: str, coef, plans: "_Plans"):
        """A forward for ``module`` that uses per-group perturbed parameters. ``plans`` is shared by
        the modules of one forward, so its chunking and coefficients are worked out once."""
        a, b = coef                                                    # (G,) each
        names = {n: f"{mname}.{n}" for n, _ in module.named_parameters(recurse=False)}

        def value(attr):
            w = getattr(module, attr)
            full = names[attr]
            if w is None or full not in self.param_names:
                return None if w is None else w.unsqueeze(0)         # (1, ...) shared
            d1, d2 = self._pair(full, w)
            shape = (-1,) + (1,) * w.dim()
            out = torch.addcmul(w.unsqueeze(0), a.to(w.dtype).view(shape), d1)     # (G, ...), one pass each
            return out.addcmul_(b.to(w.dtype).view(shape), d2)

        g = a.numel()
        grouped = self._forward_grouped(module)
        if grouped is not None:
            # A module that uses its own parameters directly (LatteT2V's scale_shift_table) takes
            # them per group; its child modules are overridden on their own.
            own = [attr for attr in names if names[attr] in self.param_names]
            return lambda *args, **kw: grouped({n: value(n) for n in own}, g, *args, **kw)
        if isinstance(module, nn.Linear):
            if names["weight"] not in self.param_names:                # only the bias is perturbed
                return linear_bias_only(module, value, g)
            return self._linear(module, names["weight"], value, g, plans)
        if isinstance(module, nn.Conv2d):
            return conv(module, value, g)
        if isinstance(module, nn.LayerNorm):
            return layer_norm(module, value, g)
        return embedding(module, value, g)

    def _linear(self, module: nn.Linear, wname: str, value, g: int, plans: "_Plans"):
        def fwd(x):
            xs = x.reshape(g, -1, x.shape[-1])                         # (G, R*T, in)
            bias = value("bias")                                       # (G or 1, out) or None
            d1t, d2t = self._pair_t(wname, module.weight)              # (in, out) contiguous
            if xs.shape[1] <= LINEARITY_ROWS:
                # Few rows per point (adaLN sees one per sample): use linearity instead of
                # building G weight copies: x W' = x W + alpha (x D1) + beta (x D2).
                ca, cb = plans.coefficients(x.dtype)
                out = torch.matmul(xs, module.weight.t())
                out = out.addcmul_(ca, torch.matmul(xs, d1t)).addcmul_(cb, torch.matmul(xs, d2t))
                if bias is not None:
                    out = out + bias.unsqueeze(1)
                return out.reshape(*x.shape[:-1], module.out_features)
            out = self._built_gemm(module, xs, bias, d1t, d2t, g, plans)
            return out.reshape(*x.shape[:-1], module.out_features)
        return fwd

    def _built_gemm(self, module: nn.Linear, xs, bias, d1t, d2t, g: int, plans: "_Plans"):
        """Many rows per point: per-point weights W' = W + alpha D1 + beta D2, built k points at a
        time into one reused buffer that stays in cache and is consumed at once by a batched GEMM.
        Building all G copies first streams them through memory (slower), and the buffer bounds
        memory at k copies of the layer. Returns (G, R*T, out)."""
        wt = module.weight.t().contiguous()                           # (in, out); not cached: +1x model memory
        k = min(g, self.chunk_points or max(1, CHUNK_BYTES // (wt.numel() * wt.element_size())))
        chunks, runs = plans.chunks(k, xs.dtype)
        out = xs.new_empty(g, xs.shape[1], module.out_features)       # (G, R*T, out)
        buf = xs.new_empty(k, *wt.shape)                              # (k, in, out)
        base = xs.new_empty(wt.shape) if runs else None
        if bias is not None:
            bias = bias.unsqueeze(1)                                  # (G or 1, 1, out)
        built = None                                                  # the run whose base is built
        for lo, hi, alphas, betas, chunk_runs in chunks:
            w = buf if hi - lo == k else buf[: hi - lo]
            if runs:
                # Points in a run share alpha (a grid's row, alpha-major): W + alpha D1 is built
                # once per run, across chunk boundaries, and only + beta D2 per point: one pass
                # over the buffer instead of two. The same arithmetic per element, so the
                # result is bit-identical.
                for r_lo, r_hi, run, alpha, run_betas in chunk_runs:
                    if run != built:
                        torch.addcmul(wt, alpha, d1t, out=base)
                        built = run
                    torch.addcmul(base, run_betas, d2t, out=w if r_hi - r_lo == hi - lo else w[r_lo:r_hi])
            else:
                torch.addcmul(wt, alphas, d1t, out=w)
                w.addcmul_(betas, d2t)                                # (k, in, out)
            if bias is None:
                torch.bmm(xs[lo:hi], w, out=out[lo:hi])
            else:
                torch.baddbmm(bias if len(bias) == 1 else bias[lo:hi], xs[lo:hi], w, out=out[lo:hi])
        return out

    @contextlib.contextmanager
    def _weights(self, coef):
        chosen = {n.rsplit(".", 1)[0] for n in self.param_names}
        plans = _Plans(*coef)
        overrides = {m: self._grouped(m, name, coef, plans) for name, m in self.model.named_modules()
                     if name in chosen}
        with hooks.override(overrides):
            yield

    # -------------------------------------------------------- features/latent
    def _feature_fn(self, coef, rows: int, site: str):
        a, b = coef

        def add(h, ctx=None):
            g = a.numel()
            # Video blocks see N*F or N*T rows for N samples: a sample is (rows per sample, T, D).
            hs = h.reshape(g, rows, -1, *h.shape[1:])
            if hs.shape[2] == 1:
                hs = hs.squeeze(2)
            out = []
            for r in range(rows):                                     # each sample: its own token norms
                d1 = feature_direction(hs[0, r], self.p.directions.seed, 1, site)
                d2 = feature_direction(hs[0, r], self.p.directions.seed, 2, site)
                shape = (-1,) + (1,) * d1.dim()
                out.append(hs[:, r] + (a.view(shape) * d1 + b.view(shape) * d2).to(h.dtype))
            return torch.stack(out, dim=1).reshape(h.shape)
        return add

    # ------------------------------------------------------------------ api
    def forward(self, x, t, y, coef, cfg_scale: float = 1.0, cfg_channels: int | None = None):
        """Evaluate the model at G grid points for samples (x, t, y) of R0 rows.

        coef: (alphas (G,), betas (G,)). Returns the guided output (G, R0, C_out, H, W)."""
        a, b = (torch.as_tensor(c, dtype=torch.float32, device=x.device) for c in coef)
        g = a.numel()
        if cfg_scale != 1.0:
            if y is None:
                raise ValueError(f"cfg_scale={cfg_scale:g} needs a conditional model and labels; got y=None")
            x, t, y = torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, self.model.null_condition(y)])
        rows = x.shape[0]
        tile = lambda v: None if v is None else v.repeat(g, *([1] * (v.dim() - 1)))
        if self.p.mode == "features" and _unit_of_site(self.model, self.p.site) is not None:
            out = self._features_forward(x, t, y, (a, b), rows)
        else:
            out = self.run(tile(x), tile(t), tile(y), (a, b))
        out = out.reshape(g, rows, *out.shape[1:])                    # (G, R, C_out, H, W)
        if cfg_scale != 1.0:
            half = rows // 2
            flat = lambda v: v.reshape(g * half, *v.shape[2:])
            out = guide(flat(out[:, :half]), flat(out[:, half:]), cfg_scale, guided_channels(cfg_channels, x.shape[1]))
            out = out.reshape(g, half, *out.shape[1:])
        return out

    def run(self, x, t, y, coef):
        """Raw model output for inputs already tiled group-major: (G*R, ...) rows in, out."""
        a, b = (torch.as_tensor(c, dtype=torch.float32, device=x.device) for c in coef)
        rows = x.shape[0] // a.numel()
        if self.p.mode == "weights":
            with self._weights((a, b)):
                return self.model(x, t, y)
        if self.p.mode == "latent":
            return self.model(self._feature_fn((a, b), rows, "latent")(x), t, y)
        with hooks.inject(self.model, {self.p.site: self._feature_fn((a, b), rows, self.p.site)}):
            return self.model(x, t, y)

    def _features_forward(self, x, t, y, coef, rows):
        """Unit-output site: the unperturbed prefix runs once on R rows, then is tiled."""
        site = self.p.site
        unit = _unit_of_site(self.model, site)
        add = self._feature_fn(coef, rows, site)
        model = self.model
        trunk = model.embed(x, t, y)                                  # prefix on R rows, once
        if unit == -1:
            trunk = trunk.repeat(coef[0].numel())
            trunk.h = add(trunk.h)
        for u in range(model.num_units):
            model.run_unit(u, trunk)
            if u == unit:
                trunk = trunk.repeat(coef[0].numel())
                trunk.h = add(trunk.h)
                if u in model.skip_sources:
                    trunk.skips[u] = trunk.h
        return model.head(trunk)



class _Plans:
    """The per-forward bookkeeping every perturbed Linear of one forward shares: the coefficients as
    (G, 1, 1) columns per dtype, and per (chunk size, dtype) the chunks and their alpha runs."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor):
        self.a, self.b = a, b
        self._coef, self._chunks = {}, {}

    def coefficients(self, dtype):
        if dtype not in self._coef:
            self._coef[dtype] = tuple(c.to(dtype).view(-1, 1, 1) for c in (self.a, self.b))
        return self._coef[dtype]

    def chunks(self, k: int, dtype):
        """([(lo, hi, alphas, betas, runs)] per chunk of k points, whether runs are used); a run is
        (start, end, run number, alpha (1, 1), betas (n, 1, 1)), start and end relative to the chunk."""
        if (k, dtype) not in self._chunks:
            ca, cb = self.coefficients(dtype)
            runs = _runs(self.a, k) if RUN_BUILD else None
            chunks = []
            for c_i, lo in enumerate(range(0, len(ca), k)):
                hi = min(lo + k, len(ca))
                chunk_runs = None if runs is None else [
                    (r_lo, r_hi, run, ca[lo + r_lo, 0], cb[lo + r_lo:lo + r_hi]) for r_lo, r_hi, run in runs[c_i]]
                chunks.append((lo, hi, ca[lo:hi], cb[lo:hi], chunk_runs))
            self._chunks[k, dtype] = (chunks, runs is not None)
        return self._chunks[k, dtype]


def _runs(a: torch.Tensor, k: int, min_length: int = 2):
    """Per chunk of ``k`` points, the runs of equal alpha as (start, end, run), start and end relative
    to the chunk and ``run`` numbering the runs of the whole batch (a run split by a chunk boundary
    keeps its number, so its W + alpha D1 is built once). None when runs are shorter than
    ``min_length`` points on average (then per-run builds do not pay)."""
    vals = a.tolist()
    starts = [i for i in range(len(vals)) if i == 0 or vals[i] != vals[i - 1]]
    run_of = [0] * len(vals)
    for n, (lo, hi) in enumerate(zip(starts, starts[1:] + [len(vals)])):
        run_of[lo:hi] = [n] * (hi - lo)
    chunks = []
    for start in range(0, len(vals), k):
        ids = run_of[start:start + k]
        cuts = [i for i in range(len(ids)) if i == 0 or ids[i] != ids[i - 1]] + [len(ids)]
        chunks.append([(lo, hi, ids[lo]) for lo, hi in zip(cuts, cuts[1:])])
    return chunks if len(vals) >= min_length * len(starts) else None


def _unit_of_site(model, site: str) -> int | None:
    """Unit whose output is ``site`` (-1 for the embedding), or None if not at a unit boundary."""
    if site == "embed":
        return -1
    if site.startswith("blocks.") and site.count(".") == 1:
        i = int(site.split(".")[1])
        if model.block_kind(i) == "temporal":   # its output layout (N*T, F, H) is not the trunk's
            return None
        for u in range(model.num_units):
            if model.unit_blocks(u)[-1] == i:
                return u
    return None


def naive_forward(model: nn.Module, spec: DirectionSpec, alpha: float, beta: float, x, t, y):
    """The definition, for tests and benchmarks: copy the model, add the perturbation, one forward."""
    import copy
    m = copy.deepcopy(model)
    params = dict(m.named_parameters())
    with torch.no_grad():
        for name in select_parameters(m, spec):
            w = params[name]
            d1, d2 = direction(w, name, 1, spec), direction(w, name, 2, spec)
            w.add_((alpha * d1 + beta * d2).to(w.dtype))
    return m(x, t, y)
