"""Train the shipped digits classifier whose penultimate features define digits-FID.

    python train/train_digits_classifier.py --out FOLDER                          # a new classifier
    python train/train_digits_classifier.py --out assets/digits-classifier --overwrite   # replace the shipped one

Trained on the digits train split with one-pixel shifts; reports held-out accuracy and writes
--out (config.json, diffusion_pytorch_model.safetensors, training.json). Replacing the shipped classifier
changes every digits-FID figure.
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from onestep.data import load_digits  # noqa: E402
from onestep.fid import DigitsClassifier, quantize  # noqa: E402
from onestep.cli import Parser, first_error, output_problem  # noqa: E402
from onestep.runs import refuse_existing  # noqa: E402


def shift(x: torch.Tensor) -> torch.Tensor:
    """Random shifts by up to one pixel, padding with the background value -1."""
    pad = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dx, dy = torch.randint(0, 3, (2,))
    return pad[..., dy:dy + 8, dx:dx + 8]


def main() -> None:
    p = Parser(description=__doc__)
    p.add_argument("--out", default="assets/digits-classifier", help="the folder written; an existing classifier "
                   "only with --overwrite")
    p.add_argument("--epochs", type=int, default=60, help="passes over the train split (AdamW lr 2e-3, cosine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace the classifier already in --out")
    a = p.parse_args()
    first_error(p, [a.epochs <= 0 and f"--epochs must be > 0, got {a.epochs}", lambda: output_problem("--out", a.out)])
    refuse_existing(p, a.out, os.path.join(a.out, "config.json"), a.overwrite)
    torch.manual_seed(a.seed)
    x, y = load_digits("train")
    xt, yt = load_digits("test")
    net = DigitsClassifier()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, a.epochs)
    for epoch in range(a.epochs):
        net.train()
        for idx in torch.randperm(len(x)).split(64):
            xb = shift(x[idx]) + 0.05 * torch.randn_like(x[idx])
            loss = F.cross_entropy(net(xb), y[idx], label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    net.eval()
    with torch.no_grad():
        acc = (net(quantize(xt)).argmax(1) == yt).float().mean().item()
        train_acc = (net(quantize(x)).argmax(1) == y).float().mean().item()
    net.save_pretrained(a.out)
    with open(os.path.join(a.out, "training.json"), "w") as f:
        json.dump({**vars(a), "test_accuracy": round(acc, 4), "train_accuracy": round(train_acc, 4)}, f, indent=2)
    print(f"held-out accuracy {acc:.4f} (train {train_acc:.4f}); saved to {a.out}")


if __name__ == "__main__":
    main()
