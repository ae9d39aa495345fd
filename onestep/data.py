"""Data the methods need: class labels and real images (the shipped digits set, or a folder of images with
optional captions, encoded once into the teacher's sample space, e.g. VAE latents)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch

from .errors import OnestepError
from .schedule import to_device

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

DIGITS_CLASSES = 10
DIGITS_SPLIT_SEED = 0  # the fixed held-out split: 20% of each class, never trained on


def load_digits(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1797 real 8x8 digits as (N, 1, 8, 8) float32 in [-1, 1] and (N,) labels.

    split: "train" (80%), "test" (the fixed held-out 20%) or "all".
    """
    from sklearn.datasets import load_digits as _load
    from sklearn.model_selection import train_test_split

    if split not in ("train", "test", "all"):
        raise ValueError(f"digits split must be 'train', 'test' or 'all', got {split!r}")
    d = _load()
    x = d.images.astype(np.float32) / 16.0 * 2.0 - 1.0  # 17 grey levels 0..16 -> [-1, 1]
    y = d.target.astype(np.int64)
    if split != "all":
        idx = np.arange(len(y))
        tr, te = train_test_split(idx, test_size=0.2, random_state=DIGITS_SPLIT_SEED, stratify=y)
        keep = np.sort(tr if split == "train" else te)
        x, y = x[keep], y[keep]
    return torch.from_numpy(x)[:, None], torch.from_numpy(y)


class ConditionSampler:
    """Draws generator conditions: class labels uniformly, with a per-call torch.Generator."""

    def __init__(self, num_classes: int | None):
        self.num_classes = num_classes

    def __call__(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor | None:
        if not self.num_classes:
            return None
        return torch.randint(0, self.num_classes, (n,), generator=generator)


class DataError(OnestepError):
    """A dataset folder that cannot be used, with a message that says how to fix it."""


class RealImages(torch.utils.data.Dataset):
    """Real samples (N, C, H, W) and their conditions as {"real", "real_cond"} items (from a prompt table that is not
    cached: "real_cond_row", until resolve()): one condition per sample, or
    (uncaptioned images of a text teacher) a random row of `cond_table`, drawn anew each epoch from (seed, epoch)
    alone, so a resumed run (and every DataLoader worker or process) pairs each image with the same prompt."""

    def __init__(self, samples: torch.Tensor, conds=None, cond_table=None, seed: int = 0):
        """`conds` / `cond_table`: a tensor, or a prompt table (onestep.prompts.PromptTable) indexed as one."""
        self.samples, self.conds, self.cond_table, self.seed = samples, conds, cond_table, seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Draw this epoch's prompt for every uncaptioned image (called by onestep.runs.RealBatches)."""
        self.epoch = epoch
        if self.conds is None and self.cond_table is not None:
            g = torch.Generator().manual_seed(hash((self.seed, epoch)) & (2**63 - 1))
            self.prompt_rows = torch.randint(len(self.cond_table), (len(self.samples),), generator=g)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]) -> list[dict]:
        """A batch's items (the DataLoader fetches batches so): its conditions looked up in one indexing. A prompt
        table that is not cached (onestep.prompts.PromptTable) gives each item its row, `real_cond_row`, instead:
        resolve() encodes a batch's rows in one call once it is taken, so that skipping batches (a resumed run's
        replay) encodes nothing."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        table, rows = ((self.conds, idx) if self.conds is not None else (None, None) if self.cond_table is None
                       else (self.cond_table, self.prompt_rows[idx]))
        key, conds = (None, None) if table is None else ("real_cond", table[rows]) if getattr(table, "cached", True) \
            else ("real_cond_row", rows)
        return [{"real": self.samples[i], **({} if key is None else {key: conds[k]})} for k, i in enumerate(indices)]

    def resolve(self, batch: dict) -> dict:
        """A collated batch with its `real_cond_row` replaced by the rows' conditions (`real_cond`, on the batch's
        device)."""
        if "real_cond_row" in batch:
            table = self.conds if self.conds is not None else self.cond_table
            batch["real_cond"] = to_device(table[batch.pop("real_cond_row")], batch["real"].device)
        return batch


@dataclass
class ImageFolder:
    """The images of a folder (sorted, subfolders included) and their captions (None: uncaptioned)."""

    path: str
    files: list[str]
    captions: list[str] | None


def read_image_folder(path: str, text: bool = True) -> ImageFolder:
    """List a folder's images and captions: `metadata.jsonl` lines {"file_name": "a.png", "text": "..."} (the
    Hugging Face imagefolder layout), else `a.txt` beside `a.png`; every image or none must have a caption, which
    for a text-to-image teacher (`text`) must not be empty."""
    if not os.path.isdir(path):
        raise DataError(f"dataset: {path!r} is not a folder; pass a folder of images (png, jpg, webp, bmp)")
    files = sorted(os.path.relpath(os.path.join(d, f), path) for d, _, names in os.walk(path) for f in names
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise DataError(f"dataset: folder {path!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    meta = os.path.join(path, "metadata.jsonl")
    if os.path.isfile(meta):
        texts = {}
        for n, line in enumerate(_read_text(meta).split("\n"), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row["text"], str):
                    raise TypeError
                texts[os.path.normpath(row["file_name"])] = row["text"]
            except (ValueError, KeyError, TypeError):
                raise DataError(f"dataset: line {n} of {meta!r} is not a JSON object with \"file_name\" and "
                                "\"text\" (a string)") from None
        missing = [f for f in files if os.path.normpath(f) not in texts]
        if missing:
            raise DataError(f"dataset: image {missing[0]!r} has no line in {meta!r}; add "
                            f'{{"file_name": "{missing[0]}", "text": "..."}} or remove the image')
        return _captioned(path, files, [texts[os.path.normpath(f)] for f in files], "its line in metadata.jsonl", text)
    txt = [os.path.join(path, os.path.splitext(f)[0] + ".txt") for f in files]
    have = [os.path.isfile(t) for t in txt]
    if not any(have):
        return ImageFolder(path, files, None)
    if not all(have):
        first = files[have.index(False)]
        raise DataError(f"dataset: image {first!r} has no caption file {os.path.splitext(first)[0] + '.txt'!r} "
                        "while others have one; caption every image or none")
    return _captioned(path, files, [_read_text(t).strip() for t in txt], "its .txt file", text)


def _captioned(path: str, files: list[str], captions: list[str], where: str, text: bool) -> ImageFolder:
    """The folder with its captions; for a text teacher an empty one (the null condition, not a prompt) is refused."""
    empty = next((f for f, c in zip(files, captions) if not c.strip()), None)
    if empty is not None and text:
        raise DataError(f"dataset: the caption of image {empty!r} ({where}) is empty; write its caption or remove the "
                        "image")
    return ImageFolder(path, files, captions)


def _read_text(path: str) -> str:
    """A caption or metadata file as UTF-8 text (a byte-order mark dropped), else one DataError line naming it."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.read()
    except (UnicodeDecodeError, PermissionError, IsADirectoryError) as e:
        raise DataError(f"dataset: {path!r} cannot be read as UTF-8 text ({type(e).__name__}); save the captions "
                        "as UTF-8") from None


def load_images(paths: list[str], size: int, channels: int = 3) -> torch.Tensor:
    """Images as (N, channels, size, size) float32 in [-1, 1]: resized (bicubic) and centre-cropped to a square."""
    from PIL import Image, ImageOps

    out = []
    for p in paths:
        try:
            with Image.open(p) as im:
                im = ImageOps.fit(im.convert("RGB" if channels == 3 else "L"), (size, size), Image.BICUBIC)
        except OSError as e:
            raise DataError(f"dataset: cannot read image {p!r} ({e}); remove or replace it") from None
        x = torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).reshape(size, size, channels)
        out.append(x.permute(2, 0, 1) / 127.5 - 1.0)
    return torch.stack(out)


def folder_dataset(folder: ImageFolder, teacher, chunk: int = 16, seed: int = 0) -> RealImages:
    """A folder's images encoded once into the teacher's sample space (VAE latents for latent teachers), with
    their captions' cached embeddings (teacher.caption_embeds) as conditions; uncaptioned images of a text teacher
    draw a random training prompt each epoch (so the condition never tells real from generated)."""
    if teacher.num_classes:
        raise DataError("dataset: a folder of images has no class labels for this class-conditional teacher; use "
                        "--dataset digits (for the 1x8x8 digits teacher), or turn the GAN off (--gan_generator_weight 0 "
                        "--gan_critic_weight 0) to distil without real images")
    channels, size = teacher.sample_shape[0], teacher.sample_shape[-1]
    if teacher.vae is not None:
        channels, size = 3, teacher.info["image_size"]
    elif channels not in (1, 3):
        raise DataError(f"dataset: this teacher makes {channels}-channel samples; a folder of images serves 1- or "
                        "3-channel teachers")
    samples = torch.cat([teacher.encode_images(load_images([os.path.join(folder.path, f) for f in folder.files[i:i + chunk]],
                                                           size, channels)).cpu()
                         for i in range(0, len(folder.files), chunk)])
    if not teacher.text_conditional:
        return RealImages(samples)
    if folder.captions is not None:
        return RealImages(samples, conds=teacher.caption_embeds)
    return RealImages(samples, cond_table=teacher.prompt_embeds, seed=seed)
