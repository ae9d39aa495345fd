"""Prompts for text-to-image teachers: read a prompt file, encode prompts once into a cached embedding table.

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
    out = []
    for i in range(0, len(prompts), batch_size):
        tokens = tokenizer(list(prompts[i:i + batch_size]), padding="max_length", max_length=tokenizer.model_max_length,
                           truncation=True, return_tensors="pt")
        mask = tokens.attention_mask.to(device) if use_mask else None
        out.append(text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0].float().cpu())
    return torch.cat(out)


@torch.no_grad()
def encode_prompts_xl(tokenizers: list, text_encoders: list, prompts: list[str], time_ids: torch.Tensor,
                      batch_size: int = 64) -> torch.Tensor:
    """SDXL conditions packed as one (N, L + r, D) float32 CPU tensor (denoiser.pack_text_time), as
    StableDiffusionXLPipeline.encode_prompt computes them; time_ids (1, 6): original size, crop, target size."""
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk, hidden, pooled = list(prompts[i:i + batch_size]), [], None
        for tokenizer, encoder in zip(tokenizers, text_encoders):
            ids = tokenizer(chunk, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids
            result = encoder(ids.to(next(encoder.parameters()).device), output_hidden_states=True)
            if result[0].ndim == 2:  # CLIPTextModelWithProjection: the pooled, projected text embedding
                pooled = result[0].float().cpu()
            hidden.append(result.hidden_states[-2].float().cpu())
        out.append(pack_text_time(torch.cat(hidden, dim=-1), pooled, time_ids))
    return torch.cat(out)
