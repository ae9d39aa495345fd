"""Prompts for text-to-image teachers: read a prompt file, encode prompts into an embedding table (PromptTable:
cached once, or past its memory budget encoded batch by batch as rows are drawn).

The encodings are the ones diffusers' StableDiffusionPipeline (max-length padding, the text encoder's last
hidden state) and StableDiffusionXLPipeline (both encoders' penultimate hidden states side by side, the second
encoder's pooled projection, the size / crop micro-conditioning) use, so a student trained on these embeddings
gets the same conditions from the stock pipeline.
"""
from __future__ import annotations

import os

import torch

from .denoiser import pack_text_time
from .errors import OnestepError

# Used when no --prompts file is given: a few generic prompts, enough for smoke tests and a first look.
DEFAULT_PROMPTS = (
    "a photo of a cat",
    "a photo of a dog",
    "a red car parked on a street",
    "a bowl of fruit on a wooden table",
    "a mountain lake at sunrise",
    "a portrait of an old man, studio lighting",
    "a watercolor painting of a lighthouse",
    "a city skyline at night",
)


class PromptError(OnestepError):
    """A prompt file that cannot be used."""


def read_prompts(path: str) -> list[str]:
    """One prompt per non-empty line of a UTF-8 text file (surrounding whitespace and a byte-order mark stripped)."""
    if not os.path.isfile(path):
        what = "is a folder" if os.path.isdir(path) else "does not exist"
        raise PromptError(f"prompts: {path!r} {what}; pass a text file with one prompt per line")
    try:
        with open(path, encoding="utf-8-sig") as f:
            prompts = [line.strip() for line in f if line.strip()]
    except (UnicodeDecodeError, PermissionError) as e:
        raise PromptError(f"prompts: file {path!r} cannot be read as UTF-8 text ({type(e).__name__}); pass a text "
                          "file with one prompt per line") from None
    if not prompts:
        raise PromptError(f"prompts: file {path!r} holds no prompts; write one prompt per line")
    return prompts


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str], batch_size: int = 64) -> torch.Tensor:
    """(N, L, D) float32 embeddings on the CPU, as StableDiffusionPipeline.encode_prompt computes them."""
    device = next(text_encoder.parameters()).device
    use_mask = getattr(text_encoder.config, "use_attention_mask", False)
    out = None
    for i in range(0, len(prompts), batch_size):
        tokens = tokenizer(list(prompts[i:i + batch_size]), padding="max_length", max_length=tokenizer.model_max_length,
                           truncation=True, return_tensors="pt")
        mask = tokens.attention_mask.to(device) if use_mask else None
        out = _fill(out, i, text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0], len(prompts))
    return out


def _fill(out: torch.Tensor | None, i: int, part: torch.Tensor, n: int) -> torch.Tensor:
    """Rows i.. of the (n, ...) float32 CPU result (allocated at the first part: no second copy of it at the end)."""
    out = torch.empty(n, *part.shape[1:]) if out is None else out
    out[i:i + len(part)] = part.float().cpu()
    return out


@torch.no_grad()
def encode_prompts_xl(tokenizers: list, text_encoders: list, prompts: list[str], time_ids: torch.Tensor,
                      batch_size: int = 64) -> torch.Tensor:
    """SDXL conditions packed as one (N, L + r, D) float32 CPU tensor (denoiser.pack_text_time), as
    StableDiffusionXLPipeline.encode_prompt computes them; time_ids (1, 6): original size, crop, target size."""
    out = None
    for i in range(0, len(prompts), batch_size):
        chunk, hidden, pooled = list(prompts[i:i + batch_size]), [], None
        for tokenizer, encoder in zip(tokenizers, text_encoders):
            ids = tokenizer(chunk, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids
            result = encoder(ids.to(next(encoder.parameters()).device), output_hidden_states=True)
            if result[0].ndim == 2:  # CLIPTextModelWithProjection: the pooled, projected text embedding
                pooled = result[0].float().cpu()
            hidden.append(result.hidden_states[-2].float().cpu())
        out = _fill(out, i, pack_text_time(torch.cat(hidden, dim=-1), pooled, time_ids), len(prompts))
    return out


def by_rows(table, fn, size: int = 1024) -> torch.Tensor:
    """torch.cat of fn(table[s:s + size]) over the rows of `table` (a tensor or a PromptTable): a table that is not
    cached then encodes `size` rows at a time, never all of them."""
    return torch.cat([fn(table[s:s + size]) for s in range(0, len(table), size)])


CACHE_MB_ENV = "ONESTEP_PROMPT_CACHE_MB"  # the most memory a prompt table's cache may take; larger tables encode
CACHE_MB = 1024                           # each drawn batch of rows instead (the text encoders stay loaded)


def cache_bytes() -> int:
    """The byte budget for caching a whole prompt table ($ONESTEP_PROMPT_CACHE_MB, default 1024 MiB)."""
    value = os.environ.get(CACHE_MB_ENV, "")
    try:
        mb = float(value) if value.strip() else CACHE_MB
        return int(mb * 2**20) if mb >= 0 else int("negative")
    except (ValueError, OverflowError):
        raise PromptError(f"{CACHE_MB_ENV}={value!r} is not a size in MiB; set a number >= 0 (0: never cache) or "
                          "unset it") from None


class PromptTable:
    """Prompt embeddings by row, indexed as an (N, L, D) float32 CPU tensor of them would be (`table[rows]`, rows:
    an int, a slice, a list, or an integer or boolean tensor; a tuple index is refused).

    All rows are encoded once when they fit in `budget` bytes (cache_bytes()); otherwise each indexing encodes just
    the rows it asks for (each distinct prompt once), so a prompt file of millions of lines costs memory for one
    batch of embeddings at a time. Row i is `encode([prompts[i]])[0]` either way, up to float rounding (the text
    encoders' arithmetic may differ by batch size); `modules` are the networks `encode` runs (the text encoders),
    which encoders_to() moves."""

    ndim = 3
    dtype = torch.float32
    device = torch.device("cpu")

    def __init__(self, prompts, encode, budget: int | None = None, modules=()):
        self.prompts, self._encode, self._modules = list(prompts), encode, list(modules)
        first = encode(self.prompts[:1])
        self.shape = torch.Size((len(self.prompts), *first.shape[1:]))
        self.nbytes = len(self.prompts) * first[0].numel() * first.element_size()  # of every row at once
        self.cached = self.nbytes <= (cache_bytes() if budget is None else budget)
        self._rows = encode(self.prompts) if self.cached else None
        if self.cached:
            self._encode, self._modules = None, []  # the text encoders can go

    def __len__(self) -> int:
        return len(self.prompts)

    def _index(self, idx) -> torch.Tensor:
        if isinstance(idx, tuple):
            raise TypeError("a PromptTable takes row indices only (an int, slice, list or tensor); index the "
                            "returned tensor further")
        return torch.arange(len(self.prompts))[idx.cpu() if torch.is_tensor(idx) else idx]

    def __getitem__(self, idx) -> torch.Tensor:
        rows = self._index(idx)
        if self._rows is not None:
            return self._rows[rows]
        if rows.numel() == 0:
            return torch.empty(*rows.shape, *self.shape[1:])
        unique, inverse = torch.unique(rows.reshape(-1), return_inverse=True)
        out = self._encode([self.prompts[i] for i in unique.tolist()])[inverse]
        return out.reshape(*rows.shape, *self.shape[1:])

    def subset(self, rows) -> "PromptTable":
        """The table of rows `rows` only (sharing this table's encoders, or its cache)."""
        sub, rows = PromptTable.__new__(PromptTable), self._index(rows).reshape(-1)
        sub.prompts, sub._encode, sub._modules = [self.prompts[i] for i in rows.tolist()], self._encode, self._modules
        sub.shape, sub.cached = torch.Size((len(rows), *self.shape[1:])), self.cached
        sub.nbytes, sub._rows = self.nbytes // max(len(self), 1) * len(rows), None if self._rows is None else self._rows[rows]
        return sub

    def encoders_to(self, device) -> None:
        """Move the text encoders (rows not cached are encoded where they are): e.g. to the CPU while they wait."""
        for m in self._modules:
            m.to(device)

    def require_cached(self, what: str) -> None:
        """Refuse, in one line, a use that needs every row at once (`what`: the option that does) on a table that
        is not cached."""
        if not self.cached:
            need = -(-self.nbytes // 2**20)
            raise PromptError(f"{what} matches each condition against every prompt's embedding, and these "
                              f"{len(self)} prompts take {need} MiB, more than {CACHE_MB_ENV} allows; set "
                              f"{CACHE_MB_ENV}={need} (memory permitting) or pass fewer --prompts")
