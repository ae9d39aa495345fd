"""Train the embedded digits teacher: a class-conditional diffusers UNet2DModel (DDPM, eps, 1000 steps).

    python train/train_teacher.py --out FOLDER                        # a new teacher (as shipped: the defaults)
    python train/train_teacher.py --out assets/digits-teacher --overwrite   # replace the shipped one (its figures too)

Reproduces `assets/digits-teacher/` (unet/ + scheduler/, safetensors). Labels are dropped to the
null class (index 10) with probability `--label_dropout` so classifier-free guidance works.
"""
from __future__ import annotations

import copy
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from onestep.data import DIGITS_CLASSES, load_digits  # noqa: E402  (first: onestep quietens bitsandbytes' import)
from onestep.cli import Parser, first_error, output_problem  # noqa: E402
from onestep.runs import refuse_existing  # noqa: E402
from diffusers import DDPMScheduler, UNet2DModel  # noqa: E402
from diffusers.training_utils import EMAModel  # noqa: E402


def build_unet() -> UNet2DModel:
    """The digits teacher architecture: 1.1M parameters at 8x8, 11 class embeddings (10 + null)."""
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        num_class_embeds=DIGITS_CLASSES + 1, norm_num_groups=16, attention_head_dim=16,
    )


def main() -> None:
    p = Parser(description=__doc__)
    p.add_argument("--out", default="assets/digits-teacher", help="the pipeline folder written (unet/, scheduler/, "
                   "onestep.json, training.json); an existing teacher only with --overwrite")
    p.add_argument("--steps", type=int, default=8000, help="training iterations")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate: 200 iterations of linear warm-up, "
                   "then a cosine decay to 0.1 x")
    p.add_argument("--ema_decay", type=float, default=0.999, help="the weights saved are this EMA's")
    p.add_argument("--label_dropout", type=float, default=0.1, help="probability of the null class (for CFG)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace the teacher already in --out")
    a = p.parse_args()
    bad = [f"--{k} must be > 0, got {v}" for k, v in (("steps", a.steps), ("batch_size", a.batch_size)) if not v > 0]
    bad += [f"--lr must be a finite number > 0, got {a.lr}"] if not 0 < a.lr < float("inf") else []
    bad += [f"--{k} must be in [0, 1), got {v}" for k, v in (("ema_decay", a.ema_decay), ("label_dropout", a.label_dropout))
            if not 0 <= v < 1]
    first_error(p, [*bad, lambda: output_problem("--out", a.out)])
    refuse_existing(p, a.out, os.path.join(a.out, "unet"), a.overwrite)

    torch.manual_seed(a.seed)
    x, y = load_digits("train")
    unet = build_unet()
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon",
                          clip_sample=False)
    opt = torch.optim.AdamW(unet.parameters(), lr=a.lr, weight_decay=0.0)
    lr_at = lambda s: min(1.0, (s + 1) / 200) * (0.5 * (1 + torch.cos(torch.tensor(s / a.steps * torch.pi)))).item() * 0.9 + 0.1
    ema = EMAModel(unet.parameters(), decay=a.ema_decay)
    t0, bar = time.time(), tqdm(range(a.steps), desc="teacher")
    for step in bar:
        idx = torch.randint(0, len(x), (a.batch_size,))
        x0, c = x[idx], y[idx].clone()
        c[torch.rand(len(c)) < a.label_dropout] = DIGITS_CLASSES  # null class for CFG
        eps = torch.randn_like(x0)
        t = torch.randint(0, 1000, (len(x0),))
        pred = unet(sched.add_noise(x0, eps, t), t, class_labels=c).sample
        loss = F.mse_loss(pred, eps)
        for g in opt.param_groups:
            g["lr"] = a.lr * lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        ema.step(unet.parameters())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    final = copy.deepcopy(unet)
    ema.copy_to(final.parameters())
    final.save_pretrained(os.path.join(a.out, "unet"))
    sched.save_pretrained(os.path.join(a.out, "scheduler"))
    with open(os.path.join(a.out, "onestep.json"), "w") as f:  # how onestep reads the labels
        json.dump({"num_classes": DIGITS_CLASSES, "null_class": DIGITS_CLASSES}, f, indent=2)
    with open(os.path.join(a.out, "training.json"), "w") as f:
        json.dump({**vars(a), "train_images": len(x), "wall_seconds": round(time.time() - t0, 1),
                   "null_class": DIGITS_CLASSES}, f, indent=2)
    print(f"saved teacher to {a.out} in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
