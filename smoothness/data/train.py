"""Train the bundled digits models (a DiT and its Skip-DiT twin) on scikit-learn's digits.

    python -m smoothness.train --model DiT-D/2 --out smoothness/models/weights/digits-dit.pt
    python -m smoothness.train --model DiT-D/2-skip --out smoothness/models/weights/digits-skip-dit.pt

DiT's recipe, shrunk: DDPM hybrid loss (eps MSE + VB for the learned sigma), AdamW with a linear
warm-up, gradient clipping, EMA. The EMA weights are saved in fp16 under ``ema``, with the settings
and the loss curve under ``meta``. Every ``--save-every`` steps a full training state is written
atomically beside the output; ``--resume`` continues from it and gives the same result as an
uninterrupted run.
"""
from __future__ import annotations

import copy
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

from ..cli import check_finite, check_positive, parser, path_arg, run_cli
from ..diffusion import Diffusion
from ..io_utils import atomic_path
from ..models import build, bundled, model_names, read_state_dict
from ..plots.samples import loss_figure
from . import digits as data


@dataclass(frozen=True)
class TrainConfig:
    model: str = "DiT-D/2"       # registry name; "-skip" for Skip-DiT
    steps: int = 1600            # optimizer steps
    batch_size: int = 64
    lr: float = 2e-3             # 2e-3 beats 1e-3 at this budget (machine-facts, run C)
    warmup: int = 100            # linear warm-up steps
    ema_max: float = 0.999       # EMA decay cap; DiT-style warm-up min(cap, (1+s)/(10+s))
    grad_clip: float = 1.0
    seed: int = 0
    threads: int = 0             # torch threads; 0 keeps torch's default
    data: str = "digits"         # digits (class-conditional images) | moving-digits[-all] (unconditional videos)


DATASETS = ("digits", "moving-digits", "moving-digits-all")


def _state(model, ema, opt, step, gen, losses, cfg: TrainConfig):
    return {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step,
            "rng": gen.get_state(), "losses": torch.tensor(losses, dtype=torch.float64),
            "config": json.dumps(_run_settings(cfg), sort_keys=True)}


def _run_settings(cfg: TrainConfig) -> dict:
    """The settings a resumed run must share with the saved one (threads may differ, steps may grow)."""
    return {k: v for k, v in asdict(cfg).items() if k not in ("threads", "steps")}


def _check_resumable(st: dict, cfg: TrainConfig, path: Path):
    """Refuse a training state of another model, data, batch size or recipe, naming what differs."""
    saved = json.loads(st["config"]) if isinstance(st.get("config"), str) else None
    if saved is None:
        raise ValueError(f"{str(path)!r} records no training settings; it cannot be checked, so it is not resumed "
                         "(delete it to start over)")
    now = _run_settings(cfg)
    diff = [f"{k}={saved.get(k)!r} there, {now[k]!r} now" for k in now if saved.get(k) != now[k]]
    if diff:
        raise ValueError(f"{str(path)!r} is the state of another run ({'; '.join(diff)}); delete it or use those settings")
    if int(st["step"]) > cfg.steps:
        raise ValueError(f"{str(path)!r} is at step {int(st['step'])}, past --steps {cfg.steps}")


def _setup(cfg: TrainConfig, video: bool):
    """(model, EMA copy, trainable parameters, optimizer), the weights initialised from ``cfg.seed``."""
    torch.manual_seed(cfg.seed)                       # init of the model weights
    if video:   # unconditional, as Latte on Taichi
        model = build(cfg.model, input_size=data.SIZE, in_channels=1, num_frames=data.FRAMES, num_classes=0)
    else:
        model = build(cfg.model, input_size=data.SIZE, in_channels=1, num_classes=10)
    model.train()
    if not video:
        model.y_embedder.eval()   # label dropout is done in the loop, from our own generator
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, ema, params, torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)


def _batch(cfg: TrainConfig, model, diffusion: Diffusion, train_set, gen: torch.Generator, glyphs: str | None):
    """(x0, y, t, noise) of one step, all drawn from ``gen``; videos when ``glyphs`` is given."""
    if glyphs is not None:
        x0, y = data.video_batch(cfg.batch_size, gen, "train", glyphs=glyphs), None   # (B, 1, F, 16, 16)
    else:
        idx = torch.randint(0, len(train_set.labels), (cfg.batch_size,), generator=gen)
        x0, y = train_set.images[idx], train_set.labels[idx]
    t = torch.randint(0, diffusion.num_timesteps, (cfg.batch_size,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    if glyphs is None:
        drop = torch.rand(cfg.batch_size, generator=gen) < model.config.class_dropout_prob
        y = torch.where(drop, torch.full_like(y, model.config.num_classes), y)   # CFG label dropout
    return x0, y, t, noise


def _update(model, ema, params, opt, loss: torch.Tensor, cfg: TrainConfig, step: int):
    """One optimizer step (gradients clipped) and the EMA update with DiT's decay warm-up."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    opt.step()
    decay = min(cfg.ema_max, (1 + step) / (10 + step))
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1 - decay)


def train(cfg: TrainConfig, out: Path, resume: bool = False, save_every: int = 200, log=print) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.data not in DATASETS:
        raise ValueError(f"unknown data {cfg.data!r}; allowed: {', '.join(DATASETS)}")
    video = cfg.data.startswith("moving-digits")
    glyphs = "all" if cfg.data == "moving-digits-all" else "medoids"
    if video != cfg.model.startswith("Latte-"):
        raise ValueError(f"--data {cfg.data} needs a {'Latte' if video else 'DiT'} model, got {cfg.model!r}")
    model, ema, params, opt = _setup(cfg, video)
    gen = torch.Generator().manual_seed(cfg.seed)
    diffusion = Diffusion()
    train_set = None if video else data.load("train")
    losses: list[float] = []
    step = 0
    state_path = out.with_suffix(".state.pt")
    if resume and state_path.exists():
        st = torch.load(state_path, map_location="cpu", weights_only=True)
        _check_resumable(st, cfg, state_path)
        model.load_state_dict(st["model"]); ema.load_state_dict(st["ema"]); opt.load_state_dict(st["opt"])
        gen.set_state(st["rng"]); step = int(st["step"]); losses = st["losses"].tolist()
        log(f"resumed from {state_path} at step {step}")
    t0 = time.time()
    while step < cfg.steps:
        for group in opt.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.warmup)
        x0, y, t, noise = _batch(cfg, model, diffusion, train_set, gen, glyphs if video else None)
        loss = diffusion.training_losses(model, x0, t, y, noise)["loss"].mean()
        _update(model, ema, params, opt, loss, cfg, step)
        losses.append(loss.item())
        step += 1
        if step % 50 == 0 or step == cfg.steps:
            recent = sum(losses[-50:]) / len(losses[-50:])
            log(f"step {step}/{cfg.steps}  loss {recent:.4f}  {time.time() - t0:.0f}s")
        if step % save_every == 0 and step < cfg.steps:
            with atomic_path(state_path) as tmp:
                torch.save(_state(model, ema, opt, step, gen, losses, cfg), tmp)
    meta = {"train_config": json.dumps(asdict(cfg)), "losses": torch.tensor(losses, dtype=torch.float32),
            "num_heads": model.config.num_heads,
            "data": (f"moving digits ({'any digit' if glyphs == 'all' else 'the ten class medoids'} of the "
                     "train split): sklearn 8x8 digits drawn bilinearly at 12x12 on a blank 16x16 canvas, "
                     "8 frames, 1 px/frame paths bouncing off the edges, [-1, 1]") if video else
                    "sklearn digits 8x8 -> 16x16 bilinear, [-1, 1], train split"}
    sd = {k: v.half() if v.is_floating_point() else v for k, v in ema.state_dict().items()}
    with atomic_path(out) as tmp:
        torch.save({"ema": sd, "meta": meta}, tmp)
    state_path.unlink(missing_ok=True)
    return meta


def loss_curves(checkpoints: dict[str, Path]) -> dict[str, np.ndarray]:
    """{label: per-step training losses} from checkpoints' ``meta``."""
    curves = {}
    for label, path in checkpoints.items():
        _, meta = read_state_dict(path)
        if "losses" not in meta:
            raise ValueError(f"{str(path)!r} carries no loss curve (meta['losses'])")
        curves[label] = meta["losses"].double().numpy()
    return curves


def main(argv=None):
    p = parser("python -m smoothness.train", __doc__)
    d = TrainConfig()
    p.add_argument("--model", default=d.model, choices=model_names(), metavar="NAME",
                   help=f"registry name, '-skip' for Skip-DiT (default: {d.model})")
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default: {d.steps})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"(default: {d.batch_size})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default: {d.lr})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"(default: {d.seed})")
    p.add_argument("--data", default=d.data, choices=DATASETS,
                   help=f"digits (DiT, class-conditional), moving-digits (Latte, unconditional video of the "
                        f"ten class medoids) or moving-digits-all (any handwritten digit) (default: {d.data})")
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads, 0 = default (default: 0)")
    p.add_argument("--out", type=path_arg, help="checkpoint path (.pt)")
    p.add_argument("--plot-losses", type=path_arg, metavar="PNG",
                   help="instead of training, draw the bundled models' loss curves into PNG")
    p.add_argument("--save-every", type=int, default=200, help="training-state interval (default: 200)")
    p.add_argument("--resume", action="store_true", help="continue from <out>.state.pt if present")
    args = p.parse_args(argv)
    _check_args(args)
    if args.plot_losses:
        fig = loss_figure(loss_curves({n: bundled.weight_path(n) for n in bundled.diffusion_models()}))
        with atomic_path(args.plot_losses) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
        plt.close(fig)
        print(f"wrote {args.plot_losses}")
        return
    cfg = TrainConfig(model=args.model, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                      seed=args.seed, threads=args.threads, data=args.data)
    train(cfg, args.out, resume=args.resume, save_every=args.save_every)
    print(f"wrote {args.out}")


def _check_file_target(path: Path, flag: str):
    """A file to write: a name in an existing or creatable folder, not a folder itself."""
    if not str(path).strip() or path.name in ("", ".", "..") or path.is_dir():
        raise ValueError(f"{flag} {str(path)!r} is a folder or empty; give a file path")
    if path.parent.exists() and not path.parent.is_dir():
        raise ValueError(f"{flag} {str(path)!r}: {str(path.parent)!r} is a file, not a folder")


def _check_args(args):
    """Every flag, before any work."""
    if args.plot_losses is not None:
        _check_file_target(args.plot_losses, "--plot-losses")
        return
    if args.out is None:
        raise ValueError("--out is required to train (or use --plot-losses)")
    _check_file_target(args.out, "--out")
    for flag in ("--steps", "--batch-size", "--save-every"):
        check_positive(getattr(args, flag[2:].replace("-", "_")), flag)
    check_positive(args.threads, "--threads", zero=True)
    check_finite(args.lr, "--lr")


if __name__ == "__main__":
    sys.exit(run_cli(main))
