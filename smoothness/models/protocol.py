"""The model protocol every tool drives, and the one table of model families.

``DiTModel`` lists exactly what the engine, hooks, caches, FLOP counts and analyses call on a model.
A forward is three public stages around units (what Skip-Cache recomputes or skips as a whole):

    trunk = model.embed(x, t, y)              # tokens and conditioning -> a Trunk (h, c, skips)
    for u in range(model.num_units):
        model.run_unit(u, trunk)              # fuse u's incoming skip, run its blocks, push its output
    out = model.head(trunk)                   # final layer, unpatchify

``FAMILIES`` says, per family, which class builds it, what its condition is, how it was trained
(beta schedule and prediction: the sampler takes them from here) and its sampling defaults;
``registry.make``, checkpoint loading and the FLOP counts consult it instead of isinstance chains.

Bring your own DiT: a class with the members below (``family`` naming a ``FAMILIES`` row) runs in
every tool; a diffusers transformer gets them from an adapter (``diffusers_adapter.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from torch import nn

from .dit import DiT, DiTConfig, Trunk
from .diffusers_adapter import DiTAdapter, LatteAdapter, PixArtAdapter
from .hunyuan import HunyuanAdapter
from .latte import Latte, LatteConfig
from .latte_t2v import LatteT2V, LatteT2VConfig


@runtime_checkable
class DiTModel(Protocol):
    """What the tools call (and nothing else), besides ``nn.Module``'s own API.

    Optional members, used when present: ``check_captions(y, batch=None)`` marks a caption-conditioned
    model (y is a float tensor (N, L, C)); ``block_branches(i)`` names block i's branch submodules for
    FORA and measured MACs (else ``blocks[i].branches``); ``grouped_forward(module)`` gives the surface
    engine a per-group forward for a module that uses its own parameters directly (diffusers adapters);
    ``set_negative_embeds`` (LatteT2V, the sample CLI)."""

    family: str                                # a key of FAMILIES
    config: Any                                # sizes: input_size, patch_size, in_channels, out_channels,
    #                                            hidden_size, depth, num_heads, mlp_ratio, num_tokens,
    #                                            num_classes (0: none), skips; video: num_frames;
    #                                            text: caption_channels
    skip_into: dict[int, tuple[int, int]]      # unit -> (source unit whose output it fuses, fusion index)
    skip_sources: frozenset[int]               # units whose output is pushed for a later fusion

    @property
    def num_units(self) -> int: ...            # units in execution order
    @property
    def blocks(self) -> Any: ...               # every block in execution order (indexable, len)

    def unit_blocks(self, u: int) -> list[int]: ...      # indices into blocks that make up unit u
    def block_kind(self, i: int) -> str: ...             # "block", or "spatial" / "temporal"
    def sites(self) -> dict[str, str]: ...               # published hook sites: name -> module path
    def sample_shape(self) -> tuple[int, ...]: ...       # one sample without the batch dim
    def null_condition(self, y): ...                     # the CFG unconditional input like y
    def embed(self, x, t, y=None) -> Trunk: ...
    def run_unit(self, u: int, trunk: Trunk, deep=None) -> Trunk: ...   # deep: run on this state instead
    def run_blocks(self, u: int, h, trunk: Trunk): ...   # unit u's blocks alone on h (no fusion, no push)
    def fuse(self, k: int, deep, skip): ...              # skip fusion k (models with skips)
    def head(self, trunk: Trunk): ...
    def __call__(self, x, t, y=None): ...                # = head(run_unit(...)(embed(x, t, y)))


@dataclass(frozen=True)
class Family:
    """One row of the family table."""

    name: str                       # model.family
    model_class: type               # the class (native) or the adapter (diffusers)
    condition: str                  # "class" (labels, maybe none), "text" (one caption tensor y)
    config_class: type | None = None   # native families: the configuration class registry.make dispatches on
    diffusers_class: str = ""       # diffusers families: the wrapped class name (config.json's _class_name)
    schedule: str = "linear"        # beta schedule it was trained with (diffusion.SCHEDULES)
    prediction: str = "epsilon"     # what the first C output channels are (diffusion.PREDICTIONS)
    num_steps: int = 250            # its authors' sampler steps
    cfg_scale: float = 1.5          # its authors' guidance scale
    cache_preset: str = ""          # its Skip-Cache preset (cache.schedule.PRESETS), "" if none
    macs: str = "analytic"          # "analytic" (cache.flops formulas) or "measured" (counted per stage)
    stored_sizes: tuple[str, ...] = ()  # config sizes a state dict cannot show; checkpoints may carry them in meta


FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("dit", DiT, "class", config_class=DiTConfig, cache_preset="dit-c2i"),
    Family("latte", Latte, "class", config_class=LatteConfig, cfg_scale=7.0, cache_preset="latte-c2v"),
    Family("latte-t2v", LatteT2V, "text", config_class=LatteT2VConfig, num_steps=50, cfg_scale=7.5,
           cache_preset="latte-t2v", stored_sizes=("input_size", "num_frames")),
    Family("diffusers-dit", DiTAdapter, "class", diffusers_class="DiTTransformer2DModel", cfg_scale=4.0,
           macs="measured"),
    Family("pixart", PixArtAdapter, "text", diffusers_class="PixArtTransformer2DModel", num_steps=20,
           cfg_scale=4.5, macs="measured"),
    Family("diffusers-latte", LatteAdapter, "text", diffusers_class="LatteTransformer3DModel", num_steps=50,
           cfg_scale=7.5, macs="measured"),
    Family("hunyuan-dit", HunyuanAdapter, "text", diffusers_class="HunyuanDiT2DModel", schedule="scaled_linear",
           prediction="v", num_steps=100, cfg_scale=6.0, cache_preset="hunyuan", macs="measured",
           stored_sizes=("input_size",)),
]}
DEFAULT = FAMILIES["dit"]
DIFFUSERS_CLASSES = {f.diffusers_class: f for f in FAMILIES.values() if f.diffusers_class}


def family_of(model) -> Family:
    """The family row of a model. A model whose ``family`` is not in the table (a wrapper, or a new
    family not registered) gets DiT's row: linear betas, epsilon prediction, analytic MACs."""
    return FAMILIES.get(getattr(model, "family", None), DEFAULT)


def register(family: Family) -> Family:
    """Add a family row (bring your own DiT: say how it was trained and how its MACs are counted)."""
    if not isinstance(family, Family):
        raise ValueError(f"register takes a Family, got {type(family).__name__}")
    FAMILIES[family.name] = family
    if family.diffusers_class:
        DIFFUSERS_CLASSES[family.diffusers_class] = family
    return family


def make(config) -> nn.Module:
    """The native model a configuration describes, by its configuration class (most derived first)."""
    for fam in FAMILIES.values():
        if fam.config_class is type(config):
            return fam.model_class(config)
    raise ValueError(f"no model family is configured by {type(config).__name__}; "
                     f"allowed: {', '.join(f.config_class.__name__ for f in FAMILIES.values() if f.config_class)}")


def wrap(inner: nn.Module) -> nn.Module:
    """A diffusers transformer behind the protocol (its family's adapter)."""
    name = type(inner).__name__
    if name not in DIFFUSERS_CLASSES:
        raise ValueError(f"diffusers class {name} is not supported; supported: {', '.join(DIFFUSERS_CLASSES)}")
    adapter = DIFFUSERS_CLASSES[name].model_class
    return adapter(inner, adapter.config_of(inner))


def is_model(obj) -> bool:
    """Whether ``obj`` has every protocol member (a structural check, not a type check)."""
    return isinstance(obj, nn.Module) and isinstance(obj, DiTModel)
