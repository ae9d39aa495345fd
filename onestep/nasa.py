"""NASA, SNOOPI's negative-away steering attention: negative prompts for one-step students, at inference, with no
training (Nguyen et al. 2024). In every cross-attention layer

    Z = softmax(Q K+^T / sqrt d) V+  -  alpha * softmax(Q K-^T / sqrt d) V-

where K+, V+ come from the prompt and K-, V- from the negative prompt (alpha: 0.04 for an SD1.5 one-step student,
0.3 for SD2.1 in the paper). It runs on the stock StableDiffusionPipeline / StableDiffusionXLPipeline that
onestep exports (the folder stays stock; NASA swaps the UNet's cross-attention processors for one call):

    from diffusers import DiffusionPipeline
    from onestep.nasa import NASA
    pipe = DiffusionPipeline.from_pretrained("runs/sd15-vsd-vsd/pipeline")
    image = NASA(pipe)("a photo of a cat", negative_prompt="blurry", strength=0.04,
                       num_inference_steps=1, guidance_scale=1.0).images[0]
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F


class NASAAttnProcessor:
    """Cross-attention minus `strength` times the attention to a negative embedding (B or 1, L, D)."""

    def __init__(self, negative: torch.Tensor, strength: float):
        self.negative, self.strength = negative, float(strength)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        residual, input_ndim = hidden_states, hidden_states.ndim
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        if input_ndim == 4:  # (B, C, H, W) -> (B, HW, C)
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is None:  # only cross-attention layers get this processor; be safe anyway
            encoder_hidden_states = hidden_states
        query = attn.to_q(hidden_states)
        head_dim = query.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)

        def attend(context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:  # (B, heads, N, head_dim)
            if attn.norm_cross:
                context = attn.norm_encoder_hidden_states(context)
            key = attn.to_k(context).view(batch, -1, attn.heads, head_dim).transpose(1, 2)
            value = attn.to_v(context).view(batch, -1, attn.heads, head_dim).transpose(1, 2)
            if attn.norm_k is not None:
                key = attn.norm_k(key)
            if mask is not None:
                mask = attn.prepare_attention_mask(mask, context.shape[1], batch)
                mask = mask.view(batch, attn.heads, -1, mask.shape[-1])
            return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False)

        z = attend(encoder_hidden_states, attention_mask)
        if self.strength:
            neg = self.negative.to(encoder_hidden_states)
            # per prompt: laid out as the pipeline lays out its prompts in each half of a guided batch
            neg = neg.expand(batch, -1, -1) if len(neg) == 1 else neg.repeat(batch // len(neg), 1, 1)
            z = z - self.strength * attend(neg, None)
        hidden_states = z.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))  # linear projection, dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextlib.contextmanager
def negative_steering(unet, negative: torch.Tensor, strength: float):
    """Within the block, every cross-attention layer of `unet` steers away from the `negative` embedding."""
    from diffusers.models.attention_processor import Attention

    saved = dict(unet.attn_processors)
    cross = {f"{n}.processor" for n, m in unet.named_modules() if isinstance(m, Attention) and m.is_cross_attention}
    processor = NASAAttnProcessor(negative, strength)
    unet.set_attn_processor({k: processor if k in cross else v for k, v in saved.items()})
    try:
        yield
    finally:
        unet.set_attn_processor(saved)


class NASA:
    """A stock SD / SDXL pipeline with negative-away steering: called like the pipeline, plus `negative_prompt`
    (one, or one per prompt) and `strength` (alpha; 0 gives the plain pipeline's images)."""

    def __init__(self, pipe):
        if not callable(getattr(pipe, "encode_prompt", None)) or not hasattr(pipe, "unet"):
            raise ValueError(f"NASA steers a stock Stable Diffusion / SDXL pipeline (a text-to-image export); got "
                             f"{type(pipe).__name__}, which has no text encoder to encode a negative prompt with")
        self.pipe = pipe

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, *, negative_prompt: str | list[str] = "",
                 strength: float = 0.04, **kwargs):
        number = isinstance(strength, (int, float)) and not isinstance(strength, bool)
        if not number or not math.isfinite(strength) or strength < 0:
            raise ValueError(f"NASA strength must be a finite number >= 0, got {strength!r}")
        negatives = [negative_prompt] if isinstance(negative_prompt, str) else negative_prompt
        if not isinstance(negatives, list) or not negatives or not all(isinstance(n, str) for n in negatives):
            raise ValueError(f"negative_prompt must be a string or a non-empty list of strings, got {negative_prompt!r}")
        embeds = kwargs.get("prompt_embeds")
        n_prompts = (len(embeds) if prompt is None and embeds is not None else
                     1 if isinstance(prompt, str) or prompt is None else len(prompt))
        if isinstance(negative_prompt, list) and len(negative_prompt) not in (1, n_prompts):
            raise ValueError(f"give one negative prompt or one per prompt ({n_prompts}), got {len(negative_prompt)}")
        per_prompt = isinstance(negative_prompt, list) and len(negative_prompt) > 1  # each prompt's images in turn
        negative = self.pipe.encode_prompt(
            prompt=negative_prompt, device=self.pipe._execution_device, do_classifier_free_guidance=False,
            num_images_per_prompt=(kwargs.get("num_images_per_prompt") or 1) if per_prompt else 1,
            clip_skip=kwargs.get("clip_skip"))[0]  # the negative encoded as the call encodes its prompts
        with negative_steering(self.pipe.unet, negative, strength):
            return self.pipe(prompt, **kwargs)
