"""Named hook sites, and the only place in the package that registers hooks.

A site's name is its address in the model: ``blocks.{i}`` (block output), ``blocks.{i}.attn`` and
``blocks.{i}.mlp`` (the gated residual branches), ``skips.{k}`` (fusion output), ``input``, ``embed``
and ``output``. ``model.sites()`` publishes the list. Patterns select several: ``blocks.*``,
``blocks.0-6``, ``skips.*``, ``blocks.*.attn``.

One protocol, as TransformerLens: a hook function ``fn(h, ctx)`` returns ``None`` to observe or a
tensor to replace the feature. ``ctx`` says which site, sampler step and timestep the call belongs
to, and how the batch splits into CFG halves. Hooks live only inside their ``with`` block:

    with record(model, "blocks.*", device="cpu", dtype=torch.bfloat16) as rec:
        model(x, t, y)
    rec["blocks.3"]            # list of recorded tensors, one per call
"""
from __future__ import annotations

import contextlib
import re
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

_STEP: ContextVar[tuple[int | None, int | None]] = ContextVar("smoothness_step", default=(None, None))
_CFG: ContextVar[int | None] = ContextVar("smoothness_cfg", default=None)


@contextlib.contextmanager
def step_scope(step: int | None, timestep: int | None):
    """Tell hooks which sampler step (1-based) and timestep the enclosed model calls belong to."""
    token = _STEP.set((step, timestep))
    try:
        yield
    finally:
        _STEP.reset(token)


@contextlib.contextmanager
def cfg_scope(cond_rows: int | None):
    """Inside, batches are [cond; uncond] with ``cond_rows`` conditional rows (None: no CFG batch)."""
    token = _CFG.set(cond_rows)
    try:
        yield
    finally:
        _CFG.reset(token)


def current_step() -> tuple[int | None, int | None]:
    """(step, timestep) of the enclosing ``step_scope``; (None, None) outside a sampler."""
    return _STEP.get()


def current_cfg_rows() -> int | None:
    """Conditional rows of the enclosing ``cfg_scope`` batch; None when the batch is not a CFG pair."""
    return _CFG.get()


@dataclass(frozen=True)
class HookContext:
    site: str
    step: int | None          # sampler iteration, 1-based; None outside a sampler
    timestep: int | None      # t on the 1000 scale; None outside a sampler
    cond_rows: int | None     # CFG batch: rows [0, cond_rows) are conditional, the rest unconditional

    def halves(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a batched feature into its CFG halves (``{"all": h}`` without CFG). The batch is
        [cond; uncond], so the first half of the rows is conditional whatever the layout (a video
        block sees N*F or N*T rows, batch-major)."""
        if self.cond_rows is None:
            return {"all": h}
        half = h.shape[0] // 2
        return {"cond": h[:half], "uncond": h[half:]}


HookFn = Callable[[torch.Tensor, HookContext], "torch.Tensor | None"]


def resolve_sites(model: nn.Module, patterns: str | Iterable[str]) -> list[str]:
    """Expand site patterns into the model's site names, in model order.

    ``*`` matches one name component's worth (``blocks.*`` is every block output, not the
    sub-sites); ``a-b`` in an index position is an inclusive range. Unknown names raise.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    available = list(model.sites())
    chosen: list[str] = []
    for pat in patterns:
        regex = pattern_regex(pat)
        hits = [s for s in available if regex.fullmatch(s)]
        if not hits:
            raise ValueError(f"unknown site {pat!r}; allowed: {_summarise(available)}")
        chosen += [h for h in hits if h not in chosen]
    order = {s: i for i, s in enumerate(available)}
    return sorted(chosen, key=order.__getitem__)


def pattern_regex(pat: str) -> re.Pattern:
    """A dotted name pattern as a regex: ``*`` / ``?`` stay within one component, ``a-b`` in an
    index position is an inclusive range (``blocks.0-6``)."""
    parts = []
    for comp in pat.split("."):
        m = re.fullmatch(r"(\d+)-(\d+)", comp)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            if lo > hi:
                raise ValueError(f"range {comp!r} in {pat!r} is inverted; write low-high")
            parts.append("(?:" + "|".join(str(i) for i in range(lo, hi + 1)) + ")")
        else:
            parts.append(re.escape(comp).replace(r"\*", "[^.]*").replace(r"\?", "[^.]"))
    return re.compile(r"\.".join(parts))


def _summarise(sites: list[str]) -> str:
    kinds = sorted({re.sub(r"\d+", "{i}", s) for s in sites})
    return ", ".join(kinds) + " (patterns: *, a-b)"


def _module(model: nn.Module, site: str) -> nn.Module:
    return model.get_submodule(model.sites()[site])


@contextlib.contextmanager
def hooked(model: nn.Module, fns: dict[str, HookFn]):
    """Register ``fn(h, ctx)`` on each named site; all removed on exit, even on exceptions."""
    handles = []
    try:
        for site, fn in fns.items():
            def hook(module, args, output, site=site, fn=fn):
                step, timestep = _STEP.get()
                new = fn(output, HookContext(site, step, timestep, _CFG.get()))
                return output if new is None else new
            handles.append(_module(model, site).register_forward_hook(hook, always_call=False))
        yield
    finally:
        for h in handles:
            h.remove()


class Recording(dict):
    """site -> list of recorded tensors (one per call); ``meta[site]`` holds (step, timestep) pairs."""

    def __init__(self):
        super().__init__()
        self.meta: dict[str, list[tuple[int | None, int | None]]] = {}

    def stack(self, site: str) -> torch.Tensor:
        return torch.stack(self[site])


@contextlib.contextmanager
def record(model: nn.Module, sites: str | Iterable[str], *, device: str | torch.device | None = None,
           dtype: torch.dtype | None = None, half: str = "all"):
    """Record features at ``sites``. ``device``/``dtype`` move and cast copies (outputs untouched);
    ``half`` keeps ``"cond"`` or ``"uncond"`` rows of CFG batches, or ``"all"``."""
    if half not in ("all", "cond", "uncond"):
        raise ValueError(f"half={half!r} is not allowed; use 'all', 'cond' or 'uncond'")
    rec = Recording()
    names = resolve_sites(model, sites)

    def keep(h, ctx: HookContext):
        if half != "all" and ctx.cond_rows is not None:
            h = ctx.halves(h)[half]
        rec.setdefault(ctx.site, []).append(h.detach().to(device=device or h.device, dtype=dtype or h.dtype,
                                                           copy=True))
        rec.meta.setdefault(ctx.site, []).append((ctx.step, ctx.timestep))
        return None

    with hooked(model, {s: keep for s in names}):
        yield rec


@contextlib.contextmanager
def inject(model: nn.Module, fns: dict[str, HookFn]):
    """Replace features: each pattern's ``fn(h, ctx)`` may return a new tensor for its sites."""
    expanded: dict[str, HookFn] = {}
    for pattern, fn in fns.items():
        for site in resolve_sites(model, pattern):
            expanded[site] = fn
    with hooked(model, expanded):
        yield


@contextlib.contextmanager
def override(modules: dict[nn.Module, Callable]):
    """Temporarily replace the ``forward`` of given modules (the call goes through ``nn.Module``'s
    ``__call__`` as usual). Used by the perturbation engine; restored on exit, even on exceptions."""
    done = []
    try:
        for module, fn in modules.items():
            if "forward" in module.__dict__:
                raise RuntimeError(f"{type(module).__name__} already has an overridden forward")
            module.forward = fn
            done.append(module)
        yield
    finally:
        for module in done:
            del module.forward


def leftover_hooks(model: nn.Module) -> list[str]:
    """Names of modules that still carry hooks or an overridden forward (should be empty)."""
    bad = []
    for name, m in model.named_modules():
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or "forward" in m.__dict__:
            bad.append(name or "<root>")
    return bad
