"""Strict, weights-only checkpoint loading with configuration inference.

Accepts ``.pt`` / ``.pth`` (a raw state dict, or one wrapped under ``ema`` / ``model`` /
``state_dict`` / ``module``), ``.safetensors``, and diffusers model folders (``folders.py``).
Pickles are opened with ``torch.load(weights_only=True)``: a file that would need to run code to
unpickle is refused. HunYuan-DiT state dicts (either layout) load through ``folders.load_hunyuan``.
"""
from __future__ import annotations

import functools
import hashlib
from dataclasses import replace
from pathlib import Path

import torch

from .dit import DiT, DiTConfig
from .folders import load_folder, load_hunyuan
from .hunyuan import is_hunyuan
from .latte import LatteConfig
from .latte_t2v import LatteT2VConfig
from .protocol import FAMILIES
from .registry import HEADS_BY_WIDTH, SIZES, make

WRAPPERS = ("ema", "model", "state_dict", "module")


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or fits no configuration."""


def sha256(path: str | Path) -> str:
    """Checksum of a file; of a folder (a diffusers model), over its files' names and contents."""
    h = hashlib.sha256()
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            h.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Return (state dict, metadata) from a checkpoint file; metadata is ``{}`` when absent."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise CheckpointError("reading .safetensors needs the 'safetensors' package "
                                  "(pip install 'dit-smoothness[safetensors]')") from e
        try:
            return load_file(str(path)), {}
        except Exception as e:
            raise CheckpointError(f"checkpoint {str(path)!r} is not a readable safetensors file: {e}") from e
    if suffix not in (".pt", ".pth", ".bin", ".ckpt"):
        raise CheckpointError(f"checkpoint {str(path)!r}: unknown extension {suffix!r}; "
                              "allowed: .pt, .pth, .bin, .ckpt, .safetensors")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {str(path)!r} could not be loaded weights-only "
                              f"(corrupt, or a pickle that would run code): {first}") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {type(obj).__name__}, not a state dict")
    meta = obj.get("meta", {}) if isinstance(obj.get("meta", {}), dict) else {}
    for key in WRAPPERS:
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not obj or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()):
        raise CheckpointError(f"checkpoint {str(path)!r} is not a state dict of tensors "
                              f"(looked at the top level and under {', '.join(WRAPPERS)})")
    return obj, meta


def _count(sd, prefix: str) -> int:
    idx = {int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix) and k[len(prefix):].split(".")[0].isdigit()}
    return max(idx) + 1 if idx else 0


def infer_config(sd: dict[str, torch.Tensor], num_heads: int | None = None) -> DiTConfig:
    """Infer a DiT, Latte (class-to-video) or Latte text-to-video configuration from state-dict keys
    and shapes.

    Latte: frames from ``temp_embed``, classes from the label table (none: unconditional), skips
    from ``skip_linears``. Text-to-video (diffusers keys, ``transformer_blocks.*``): see ``_infer_t2v``."""
    if any(k.startswith("transformer_blocks.") for k in sd):
        return _infer_t2v(sd, num_heads)
    need = ["x_embedder.proj.weight", "pos_embed", "final_layer.linear.weight", "blocks.0.mlp.fc1.weight"]
    missing = [k for k in need if k not in sd]
    if missing:
        raise CheckpointError(f"not a DiT or Latte state dict: missing {', '.join(missing)}")
    video = "temp_embed" in sd
    hidden, in_ch, patch, _ = sd["x_embedder.proj.weight"].shape
    tokens = sd["pos_embed"].shape[1]
    grid = round(tokens ** 0.5)
    if grid * grid != tokens:
        raise CheckpointError(f"pos_embed has {tokens} tokens, not a square grid")
    out = sd["final_layer.linear.weight"].shape[0] // (patch * patch)
    if out not in (in_ch, 2 * in_ch):
        raise CheckpointError(f"final_layer.linear outputs {out} channels per pixel for {in_ch} input channels; "
                              f"allowed: {in_ch} or {2 * in_ch}")
    if "y_embedder.embedding_table.weight" in sd:
        rows = sd["y_embedder.embedding_table.weight"].shape[0]
    elif video:
        rows = 1                          # unconditional Latte: no label table
    else:
        raise CheckpointError("DiT checkpoints are class-conditional: y_embedder.embedding_table.weight is missing")
    depth = _count(sd, "blocks.")
    n_skip = _count(sd, "skip_linears.")
    if num_heads is None:
        if hidden not in HEADS_BY_WIDTH:
            raise CheckpointError(f"no official size has hidden size {hidden}, so the number of attention heads is "
                                  f"unknown; pass num_heads explicitly (known widths: {sorted(HEADS_BY_WIDTH)})")
        num_heads = HEADS_BY_WIDTH[hidden]
    # The null-class row exists when the model was trained with label dropout (always, for DiT).
    fields = dict(input_size=grid * patch, patch_size=patch, in_channels=in_ch, hidden_size=hidden,
                  depth=depth, num_heads=num_heads, mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / hidden,
                  num_classes=rows - 1, class_dropout_prob=0.1, learn_sigma=out == 2 * in_ch, skips=n_skip > 0)
    if video:
        return LatteConfig(num_frames=sd["temp_embed"].shape[1], **fields)
    return DiTConfig(**fields)


def _heads(hidden: int, num_heads: int | None) -> int:
    if num_heads is not None:
        return num_heads
    if hidden not in HEADS_BY_WIDTH:
        raise CheckpointError(f"no official size has hidden size {hidden}, so the number of attention heads is "
                              f"unknown; pass num_heads explicitly (known widths: {sorted(HEADS_BY_WIDTH)})")
    return HEADS_BY_WIDTH[hidden]


def _infer_t2v(sd, num_heads: int | None) -> LatteT2VConfig:
    """Latte T2V in the diffusers layout: pairs from the block count, widths from shapes, caption
    channels from ``caption_projection`` (its learned null caption ``y_embedding``, when stored, gives
    ``caption_tokens``), skips from ``skip_linears``. The latent size (64) and frame
    count (16) are not in the state dict (their tables are fixed), so Latte-0's values are used."""
    need = ["pos_embed.proj.weight", "proj_out.weight", "caption_projection.linear_1.weight",
            "transformer_blocks.0.ff.net.0.proj.weight", "transformer_blocks.0.attn2.to_k.weight"]
    missing = [k for k in need if k not in sd]
    if missing:
        raise CheckpointError(f"not a Latte text-to-video state dict: missing {', '.join(missing)}")
    hidden, in_ch, patch, _ = sd["pos_embed.proj.weight"].shape
    out = sd["proj_out.weight"].shape[0] // (patch * patch)
    if out not in (in_ch, 2 * in_ch):
        raise CheckpointError(f"proj_out outputs {out} channels per pixel for {in_ch} input channels; "
                              f"allowed: {in_ch} or {2 * in_ch}")
    pairs, temporal = _count(sd, "transformer_blocks."), _count(sd, "temporal_transformer_blocks.")
    if pairs != temporal:
        raise CheckpointError(f"{pairs} spatial transformer_blocks but {temporal} temporal_transformer_blocks; "
                              "Latte pairs them one to one")
    cross = sd["transformer_blocks.0.attn2.to_k.weight"].shape[1]
    null = "caption_projection.y_embedding"                # PixArt's learned null caption, when stored
    if cross != hidden:
        raise CheckpointError(f"cross-attention takes {cross}-wide context, not the hidden size {hidden}")
    return LatteT2VConfig(patch_size=patch, in_channels=in_ch, hidden_size=hidden, depth=2 * pairs,
                          num_heads=_heads(hidden, num_heads), learn_sigma=out == 2 * in_ch,
                          mlp_ratio=sd["transformer_blocks.0.ff.net.0.proj.weight"].shape[0] / hidden,
                          caption_channels=sd["caption_projection.linear_1.weight"].shape[1],
                          caption_tokens=sd["caption_projection.y_embedding"].shape[0] if null in sd else 0,
                          skips=_count(sd, "skip_linears.") > 0)


@functools.lru_cache(maxsize=None)
def expected_shapes(config: DiTConfig) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of the state dict a configuration has (built on meta, cached; do not mutate)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in make(config).state_dict().items()}


def _as_stated(cfg, sd):
    """A registry size with what the checkpoint states outright taken from it (input channels, classes,
    frames, image size, learned sigma), so that sizes are compared on their architecture alone."""
    fields = {}
    w, pe = sd.get("x_embedder.proj.weight"), sd.get("pos_embed")
    if w is not None and w.dim() == 4:
        fields["in_channels"] = int(w.shape[1])
    if pe is not None and pe.dim() == 3 and round(pe.shape[1] ** 0.5) ** 2 == pe.shape[1]:
        fields["input_size"] = round(pe.shape[1] ** 0.5) * cfg.patch_size
    if "y_embedder.embedding_table.weight" in sd:
        fields["num_classes"] = int(sd["y_embedder.embedding_table.weight"].shape[0]) - 1
    if "temp_embed" in sd and isinstance(cfg, LatteConfig):
        fields["num_frames"] = int(sd["temp_embed"].shape[1])
    out = sd.get("final_layer.linear.weight")
    if out is not None and "in_channels" in fields:
        fields["learn_sigma"] = out.shape[0] // cfg.patch_size ** 2 == 2 * fields["in_channels"]
    try:
        return replace(cfg, **fields)
    except (TypeError, ValueError):
        return cfg


def _closest(sd) -> str:
    """Name the registry entry whose keys agree with ``sd`` best, then whose shapes agree most often
    (channels, classes, frames and image size taken from the checkpoint, see ``_as_stated``)."""
    best, score = None, None
    have = {k: tuple(v.shape) for k, v in sd.items()}
    t2v = any(k.startswith("transformer_blocks.") for k in sd)
    for name, cfg in SIZES.items():
        if isinstance(cfg, LatteT2VConfig) != t2v:      # compare within the layout family only
            continue
        for skip in (False, True):
            exp = expected_shapes(_as_stated(replace(cfg, skips=skip), sd) if not t2v else replace(cfg, skips=skip))
            s = (-len(set(have) ^ set(exp)), sum(have.get(k) == v for k, v in exp.items()))
            if score is None or s > score:
                best, score = name + ("-skip" if skip else ""), s
    return best


def mismatch_report(sd, config: DiTConfig, limit: int = 5) -> str:
    exp = expected_shapes(config)
    have = {k: tuple(v.shape) for k, v in sd.items()}
    missing = [k for k in exp if k not in have]
    unexpected = [k for k in have if k not in exp]
    shaped = [f"{k} {have[k]} != {exp[k]}" for k in exp if k in have and have[k] != exp[k]]
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shaped)):
        if items:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            parts.append(f"{len(items)} {label}: {', '.join(items[:limit])}{more}")
    return "; ".join(parts)


def check_finite(sd: dict[str, torch.Tensor], where: str):
    """Refuse weights holding NaN or Inf (they would sample NaN silently), naming the first bad tensor."""
    for key, v in sd.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            bad = int((~torch.isfinite(v)).sum())
            raise CheckpointError(f"checkpoint {where!r}: tensor {key!r} holds {bad} NaN/Inf value(s) of {v.numel()}; "
                                  "refusing weights that are not finite")


def load_model(path: str | Path, num_heads: int | None = None, device="cpu", dtype=None) -> DiT:
    """Build the model a checkpoint (file or diffusers folder) describes and load it strictly (finite
    weights only). Returns it in eval mode."""
    if Path(path).is_dir():
        model = load_folder(path, read_state_dict, device=device, dtype=dtype)
        check_finite(model.state_dict(), str(path))
        return model
    sd, meta = read_state_dict(path)
    check_finite(sd, str(path))
    if is_hunyuan(sd):
        return load_hunyuan(sd, meta, repr(str(path)), device=device, dtype=dtype)
    num_heads = num_heads or meta.get("num_heads")
    try:
        config = infer_config(sd, num_heads)
        stored = next(f.stored_sizes for f in FAMILIES.values() if f.config_class is type(config))
        # sizes whose tables are not in the state dict: from meta if saved
        config = replace(config, **{k: int(meta[k]) for k in stored if k in meta})
        report = mismatch_report(sd, config)
    except (CheckpointError, ValueError) as e:
        raise CheckpointError(f"checkpoint {str(path)!r} fits no configuration: {e}; "
                              f"closest configuration: {_closest(sd)}") from None
    if report:
        raise CheckpointError(f"checkpoint {str(path)!r} fits no configuration ({report}); "
                              f"closest configuration: {_closest(sd)}")
    with torch.device("meta"):
        model = make(config)
    model.load_state_dict(sd, strict=True, assign=True)
    model = model.to(device=device, dtype=dtype or torch.float32)
    if isinstance(model.pos_embed, torch.nn.Parameter):        # fixed tables (LatteT2V computes its own)
        model.pos_embed.requires_grad_(False)
    if hasattr(model, "temp_embed"):
        model.temp_embed.requires_grad_(False)
    return model.eval()
