"""Negative prompts: the unconditional branch of the teacher's CFG during training (--negative_prompt), and NASA
steering of exported one-step students at inference (onestep.nasa), on tiny SD / SDXL pipelines built from configs.
"""
import math

import pytest
import torch
from conftest import tiny_unet
from diffusers import DDPMScheduler
from test_sd import PROMPTS, save_tiny_sd
from test_sdxl import save_tiny_sdxl

from onestep.generator import Generator
from onestep.loading import TeacherError, load_teacher
from onestep.nasa import NASA, NASAAttnProcessor
from onestep.pipeline import OneStepPipeline, export_text_pipeline, stock_call_kwargs
from onestep.triad import Triad

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one thread (conftest.py)


@pytest.fixture(scope="module")
def sd_teacher(tmp_path_factory) -> str:
    return save_tiny_sd(str(tmp_path_factory.mktemp("tiny-sd")))


@pytest.fixture(scope="module")
def sdxl_teacher(tmp_path_factory) -> str:
    return save_tiny_sdxl(str(tmp_path_factory.mktemp("tiny-sdxl")))


def test_negative_prompt_is_the_teachers_cfg_branch_and_nothing_else(sd_teacher):
    from diffusers import StableDiffusionPipeline

    teacher = load_teacher(sd_teacher, prompts=PROMPTS, negative_prompt="blurry, low quality")
    pipe = StableDiffusionPipeline.from_pretrained(sd_teacher)
    _, ref_negative = pipe.encode_prompt(PROMPTS[:1], "cpu", 1, True, ["blurry, low quality"])
    assert torch.allclose(teacher.negative_cond, ref_negative, atol=1e-6)  # the stock pipeline's negative branch
    assert load_teacher(sd_teacher, prompts=PROMPTS).negative_cond is None

    triad = Triad.from_teacher(teacher.denoiser, fake_score="lora", lora_rank=4)
    triad.teacher.guidance_uncond = teacher.negative_cond  # what train/distill.py does
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([300, 700]), teacher.prompt_embeds[:2]
    with torch.no_grad():
        guided = triad.teacher.guided(x, t, c, 3.0)
        x0_c, x0_neg, x0_null = (triad.teacher(x, t, v) for v in (c, teacher.negative_cond.expand_as(c),
                                                                  teacher.denoiser.null_cond.expand_as(c)))
        fake_guided = triad.fake_score.guided(x, t, c, 3.0)
    assert torch.allclose(guided, x0_neg + 3.0 * (x0_c - x0_neg), atol=1e-5)
    assert not torch.allclose(guided, x0_null + 3.0 * (x0_c - x0_null), atol=1e-3)
    assert torch.allclose(fake_guided, x0_null + 3.0 * (x0_c - x0_null), atol=1e-5)  # the fake score keeps the null
    null = teacher.denoiser.null_cond.expand_as(c)
    assert torch.equal(triad.teacher.drop_cond(c, 1.0), null)  # condition dropout: the empty prompt, as before


def test_negative_prompt_on_a_class_teacher_is_refused(cond_teacher):
    with pytest.raises(TeacherError, match="negative_prompt: .* not a text-to-image model"):
        load_teacher(cond_teacher, negative_prompt="blurry")


def exported(folder: str, tmp_path, xl: bool):
    """A one-step student (the teacher's own UNet, untrained: NASA needs no training) as the stock export."""
    from diffusers import DiffusionPipeline

    teacher = load_teacher(folder, prompts=PROMPTS)
    student = Generator(teacher.denoiser, [999])
    export_text_pipeline(student, teacher.scheduler_config, folder, str(tmp_path / "pipe"))
    kwargs = dict(add_watermarker=False) if xl else {}
    return DiffusionPipeline.from_pretrained(str(tmp_path / "pipe"), **kwargs), stock_call_kwargs(student)


@pytest.mark.parametrize("xl", [False, True], ids=["sd", "sdxl"])
def test_nasa_strength_zero_equals_the_plain_pipeline_and_strength_steers(xl, sd_teacher, sdxl_teacher, tmp_path):
    pipe, kwargs = exported(sdxl_teacher if xl else sd_teacher, tmp_path, xl)
    before = {k: type(v) for k, v in pipe.unet.attn_processors.items()}
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def run(strength=None, negative="blurry, low quality"):
        call = dict(latents=z, output_type="pt", **kwargs)
        if strength is None:
            return pipe(PROMPTS, **call).images
        return NASA(pipe)(PROMPTS, negative_prompt=negative, strength=strength, **call).images

    plain = run()
    assert torch.allclose(run(0.0), plain, atol=1e-6)
    steered = run(0.5)
    assert (steered - plain).abs().max() > 1e-3
    assert torch.allclose(run(0.5, ["blurry, low quality"] * 3), steered, atol=1e-6)  # one or one per prompt
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == before  # the pipeline is left stock
    assert torch.allclose(run(), plain)
    for bad, words in ((dict(strength=float("nan")), "finite number >= 0"), (dict(strength=-1.0), ">= 0, got -1.0"),
                       (dict(negative_prompt=None), "negative_prompt must be a string"),
                       (dict(negative_prompt=[]), "non-empty list of strings")):
        with pytest.raises(ValueError, match=words):
            NASA(pipe)(PROMPTS, **{"negative_prompt": "blurry", "strength": 0.5, **bad}, **kwargs)
    with pytest.raises(ValueError, match="NASA steers a stock Stable Diffusion / SDXL pipeline"):
        NASA(OneStepPipeline(unet=tiny_unet(), scheduler=DDPMScheduler()))


def test_nasa_processor_subtracts_the_negative_attention(sd_teacher):
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import Attention

    unet = UNet2DConditionModel.from_pretrained(sd_teacher, subfolder="unet")
    attn = next(m for m in unet.modules() if isinstance(m, Attention) and m.is_cross_attention)
    torch.manual_seed(0)
    x, pos, neg = torch.randn(2, 6, attn.query_dim), torch.randn(2, 5, 16), torch.randn(1, 7, 16)
    alpha, heads = 0.3, attn.heads

    def softmax_attention(context):  # per head: softmax(Q K^T / sqrt d) V, heads side by side again
        q, k, v = attn.to_q(x), attn.to_k(context), attn.to_v(context)
        d = q.shape[-1] // heads
        split = lambda a: a.reshape(a.shape[0], a.shape[1], heads, d).transpose(1, 2)  # noqa: E731
        w = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(d), dim=-1)
        return (w @ split(v)).transpose(1, 2).reshape(x.shape[0], x.shape[1], heads * d)

    with torch.no_grad():
        expected = attn.to_out[0](softmax_attention(pos) - alpha * softmax_attention(neg.expand(2, -1, -1)))
        out = NASAAttnProcessor(neg, alpha)(attn, x, encoder_hidden_states=pos)
    assert torch.allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize("guidance", [1.0, 3.0], ids=["one-step", "guided"])
def test_nasa_pairs_each_prompt_with_its_own_negative(guidance, sd_teacher, tmp_path):
    """One negative per prompt, several images per prompt, with or without the pipeline's CFG batch (uncond half,
    cond half): each image equals the one its prompt and negative give alone."""
    pipe, kwargs = exported(sd_teacher, tmp_path, False)
    kwargs = {**kwargs, "guidance_scale": guidance, "output_type": "pt"}
    negatives = ["blurry", "a red square", "low quality, noise"]
    z = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    both = NASA(pipe)(PROMPTS, negative_prompt=negatives, strength=0.5, num_images_per_prompt=2, latents=z,
                      **kwargs).images
    for i, (prompt, negative) in enumerate(zip(PROMPTS, negatives)):
        alone = NASA(pipe)(prompt, negative_prompt=negative, strength=0.5, num_images_per_prompt=2,
                           latents=z[2 * i:2 * i + 2], **kwargs).images
        assert torch.allclose(both[2 * i:2 * i + 2], alone, atol=1e-5), (guidance, i)
    if guidance == 1.0:  # prompts given as embeddings: one negative per embedded prompt as well
        embeds = pipe.encode_prompt(PROMPTS, "cpu", 1, False)[0]
        given = NASA(pipe)(prompt_embeds=embeds, negative_prompt=negatives, strength=0.5, num_images_per_prompt=2,
                           latents=z, **kwargs).images
        assert torch.allclose(given, both, atol=1e-5)
