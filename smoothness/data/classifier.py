"""A small digits classifier trained on the real (held-in) digits: the quality metric for samples.

    python -m smoothness.data.classifier --out smoothness/models/weights/digits-classifier.pt

It sees 16x16 images in [-1, 1], as the bundled diffusion models produce them. ``features`` (the
penultimate layer, 64-d) is the embedding used for the Frechet distance in ``smoothness.metrics``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..cli import check_positive, parser, path_arg, run_cli
from ..io_utils import atomic_path
from ..models.bundled import weight_path
from . import digits as data


class DigitClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def features(self, x):
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)                      # (N, 32, 8, 8)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)                      # (N, 64, 4, 4)
        return F.relu(self.fc1(h.flatten(1)))                            # (N, 64)

    def forward(self, x):
        return self.fc2(self.features(x))                                # (N, 10) logits


def train(epochs: int = 30, seed: int = 0, log=print) -> DigitClassifier:
    """Train on the train split with small random shifts; deterministic from ``seed``."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = DigitClassifier()
    ds = data.load("train")
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    n = len(ds.labels)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, 64):
            idx = perm[i:i + 64]
            x = ds.images[idx]
            sx, sy = torch.randint(-1, 2, (2,), generator=gen).tolist()   # +-1 pixel jitter
            x = torch.roll(x, shifts=(sy, sx), dims=(2, 3))
            loss = F.cross_entropy(model(x), ds.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if (epoch + 1) % 10 == 0:
            log(f"epoch {epoch + 1}: held-out accuracy {accuracy(model, data.load('test')):.4f}")
    return model.eval()


@torch.no_grad()
def accuracy(model: DigitClassifier, ds: data.Digits) -> float:
    model.eval()
    return (model(ds.images).argmax(1) == ds.labels).float().mean().item()


def save(model: DigitClassifier, path: Path):
    with atomic_path(path) as tmp:
        torch.save({"model": model.state_dict()}, tmp)


def load(path: str | Path | None = None) -> DigitClassifier:
    path = Path(path) if path else weight_path("digits-classifier")
    sd = torch.load(path, map_location="cpu", weights_only=True)["model"]
    model = DigitClassifier()
    model.load_state_dict(sd, strict=True)
    return model.eval()


def main(argv=None):
    p = parser("python -m smoothness.data.classifier", __doc__)
    p.add_argument("--out", type=path_arg, required=True, help="where to write the classifier (.pt)")
    p.add_argument("--epochs", type=int, default=30, help="(default: 30)")
    p.add_argument("--seed", type=int, default=0, help="(default: 0)")
    args = p.parse_args(argv)
    check_positive(args.epochs, "--epochs")
    model = train(args.epochs, args.seed)
    save(model, args.out)
    print(f"held-out accuracy {accuracy(model, data.load('test')):.4f}; wrote {args.out}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
