"""SDXL teachers: a tiny StableDiffusionXLPipeline built from configs, loaded through --teacher like a user's.

Two text encoders run once (penultimate hidden states side by side, the pooled projection, the size / crop
micro-conditioning, packed into one condition tensor that batches and indexes like SD's), zeros as the null
condition (the pipeline's force_zeros_for_empty_prompt), VSD and DMD2 runs end to end, and a stock
StableDiffusionXLPipeline export that reproduces the student with no onestep import.
"""
import json
import shutil

import pytest
import torch
from conftest import run_distill
from test_sd import PROMPTS, assert_lora_file_reproduces, assert_stock_reproduces, teacher_weights, tiny_tokenizer

from onestep.denoiser import pack_text_time, unpack_text_time
from onestep.loading import TeacherError, load_teacher
from onestep.methods import build_method
from onestep.triad import Triad

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one thread (conftest.py)


def save_tiny_sdxl(path: str) -> str:
    """An SDXL pipeline folder with tiny random components: latents 4x8x8, images 3x16x16, pooled width 16."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=4, attention_head_dim=4, addition_embed_type="text_time",
                                addition_time_embed_dim=4, projection_class_embeddings_input_dim=6 * 4 + 16)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        sample_size=16, scaling_factor=0.13025)
    text = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=16, intermediate_size=32,
                num_attention_heads=2, num_hidden_layers=2, vocab_size=514, max_position_embeddings=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text, projection_dim=16))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")  # SDXL base's scheduler config
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tiny_tokenizer(), tokenizer_2=tiny_tokenizer(), unet=unet,
                                     scheduler=scheduler, add_watermarker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def sdxl_teacher(tmp_path_factory) -> str:
    return save_tiny_sdxl(str(tmp_path_factory.mktemp("tiny-sdxl")))


def stock_conditions(folder: str, prompts: list[str]):
    """What the stock StableDiffusionXLPipeline feeds its UNet for these prompts under CFG."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(folder, add_watermarker=False)
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=True)
    time_ids = pipe._get_add_time_ids((16, 16), (0, 0), (16, 16), torch.float32,
                                      text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    return pipe, embeds, neg, pooled, neg_pooled, time_ids


def test_sdxl_teacher_caches_both_encoders_pooled_embeddings_and_size_conditioning(sdxl_teacher):
    teacher = load_teacher(sdxl_teacher, prompts=PROMPTS, negative_prompt="blurry")
    pipe, embeds, neg, pooled, neg_pooled, time_ids = stock_conditions(sdxl_teacher, PROMPTS)
    assert teacher.info["sdxl"] and teacher.sample_shape == (4, 8, 8) and teacher.info["image_size"] == 16
    table = teacher.prompt_embeds[:]
    assert table.shape[:2] == (3, embeds.shape[1] + 1) and table.shape[2] == embeds.shape[2] == 32  # 16 + 6 -> 1 row
    parts = unpack_text_time(table, 16)
    assert torch.allclose(parts["encoder_hidden_states"], embeds, atol=1e-6)
    assert torch.allclose(parts["added_cond_kwargs"]["text_embeds"], pooled, atol=1e-6)
    assert torch.equal(parts["added_cond_kwargs"]["time_ids"], time_ids.expand(3, -1))
    null = unpack_text_time(teacher.denoiser.null_cond, 16)  # zeros, as the stock pipeline's empty negative prompt
    assert torch.equal(null["encoder_hidden_states"], neg[:1]) and torch.equal(null["added_cond_kwargs"]["text_embeds"], neg_pooled[:1])
    negative = unpack_text_time(teacher.negative_cond, 16)
    ref = pipe.encode_prompt(PROMPTS[:1], device="cpu", do_classifier_free_guidance=True, negative_prompt="blurry")
    assert torch.allclose(negative["encoder_hidden_states"], ref[1], atol=1e-6)
    assert torch.allclose(negative["added_cond_kwargs"]["text_embeds"], ref[3], atol=1e-6)
    # the denoiser runs the UNet with SDXL's added conditioning; rows index, concatenate and mix like SD conditions
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([300, 800])
    with torch.no_grad():
        ours = teacher.denoiser(x, t, table[[0, 2]])
        eps = pipe.unet(x, t, encoder_hidden_states=embeds[[0, 2]],
                        added_cond_kwargs={"text_embeds": pooled[[0, 2]], "time_ids": time_ids.expand(2, -1)}).sample
    sched = teacher.denoiser.schedule
    assert torch.allclose(ours, sched.to_x0(eps, x, t, "epsilon"), atol=1e-5)
    dropped = teacher.denoiser.drop_cond(table, 1.0)
    assert torch.equal(dropped, teacher.denoiser.null_cond.expand_as(table))
    assert torch.isfinite(teacher.denoiser.guided(x, t, table[:2], 3.0)).all()


def test_pack_text_time_round_trips_over_several_rows():
    embeds, pooled, time_ids = torch.randn(3, 5, 4), torch.randn(3, 7), torch.arange(6.0)[None]
    packed = pack_text_time(embeds, pooled, time_ids)
    assert packed.shape == (3, 5 + 4, 4)  # 7 + 6 values -> 4 rows of 4
    parts = unpack_text_time(packed[[2, 0]], 7)
    assert torch.equal(parts["encoder_hidden_states"], embeds[[2, 0]])
    assert torch.equal(parts["added_cond_kwargs"]["text_embeds"], pooled[[2, 0]])
    assert torch.equal(parts["added_cond_kwargs"]["time_ids"], time_ids.expand(2, -1))


def test_sdxl_without_the_second_encoder_is_refused_with_one_line(sdxl_teacher, tmp_path):
    broken = tmp_path / "xl"
    shutil.copytree(sdxl_teacher, broken)
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(TeacherError, match="SDXL teacher needs .* lacks text_encoder_2/$"):
        load_teacher(str(broken))
    index = json.loads((broken / "model_index.json").read_text())
    index.pop("text_encoder_2")  # a model_index that forgets it: the UNet's added conditioning still says SDXL
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(TeacherError, match="lacks text_encoder_2/"):
        load_teacher(str(broken))


def test_vsd_and_dmd2_gan_losses_on_sdxl_conditions_reach_the_right_networks(sdxl_teacher):
    teacher = load_teacher(sdxl_teacher, prompts=PROMPTS)
    torch.manual_seed(0)
    triad = Triad.from_teacher(teacher.denoiser, fake_score="lora", lora_rank=4, sample_shape=teacher.sample_shape)
    for n, p in triad.teacher.backbone.named_parameters():
        if "lora_B" in n:  # as critic steps would: else fake = teacher and VSD's gradient is 0
            p.data.normal_(0, 0.1)
    batch = {"z": torch.randn(2, 4, 8, 8), "cond": teacher.prompt_embeds[[0, 1]]}
    loss, _ = build_method("vsd", random_guidance=True).generator_loss(triad, batch)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in triad.generator_parameters())
    assert all(p.grad is None for p in triad.teacher.backbone.parameters())
    loss, _ = build_method("vsd").fake_score_loss(triad, batch)
    loss.backward()
    assert all(p.grad is not None for p in triad.critic_parameters())

    # DMD2's critic concatenates generated and real conditions: packed SDXL rows concatenate like SD's
    teacher = load_teacher(sdxl_teacher, prompts=PROMPTS)
    triad = Triad.from_teacher(teacher.denoiser, fake_score="copy", gan_head=True, sample_shape=teacher.sample_shape,
                               example_cond=teacher.prompt_embeds[:1])
    batch.update(real=torch.randn(2, 4, 8, 8), real_cond=teacher.prompt_embeds[[2, 0]])
    loss, logs = build_method("dmd2").fake_score_loss(triad, batch)
    loss.backward()
    assert torch.isfinite(loss) and "loss_gan_d" in logs
    assert all(p.grad is not None for p in triad.raw("gan_head").parameters())


def distill_sdxl(method: str, sdxl_teacher: str, tmp_path, *extra: str):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    lora = ["--lora_rank", "4"] if method == "vsd" or "lora" in extra else []  # only a LoRA fake score takes it
    r = run_distill(["--preset", f"sdxl-{method}", "--teacher", sdxl_teacher, "--prompts", str(prompts), "--steps", "2",
                     "--batch_size", "2", "--output_dir", str(tmp_path), "--name", "run", *lora,
                     "--sample_every", "0", "--checkpoint_every", "0", "--log_every", "1", "--cpu_threads", "1", *extra])
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "run"
    m = json.loads((run / "metrics.json").read_text())
    assert m["text_to_image"] and m["prompts"] == 3 and (run / "samples" / "step_0000002.png").exists()
    assert json.loads((run / "pipeline" / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    return run, m


def test_sdxl_vsd_run_exports_a_stock_sdxl_pipeline_that_reproduces_the_student(sdxl_teacher, tmp_path):
    from safetensors.torch import load_file

    from onestep.generator import Generator

    run, m = distill_sdxl("vsd", sdxl_teacher, tmp_path, "--random_guidance", "true", "--gradient_checkpointing", "true")
    teacher = load_teacher(sdxl_teacher, prompts=PROMPTS)
    state = load_file(str(run / "checkpoints" / "step_0000002" / "model.safetensors"))
    teacher.backbone.load_state_dict({k.removeprefix("denoiser.backbone."): v for k, v in state.items()})
    assert not torch.equal(teacher.backbone.conv_in.weight, teacher_weights(sdxl_teacher)["conv_in.weight"])
    student = Generator(teacher.denoiser)
    assert_stock_reproduces(run, m, teacher, student, tmp_path, "StableDiffusionXLPipeline")
    assert "add_watermarker=False)" in (run / "pipeline" / "README.md").read_text()  # the student's own pixels


def test_sdxl_lora_generator_file_loads_onto_the_teacher_as_the_merged_export(sdxl_teacher, tmp_path):
    from safetensors.torch import load_file

    run, m = distill_sdxl("dmd2", sdxl_teacher, tmp_path, "--generator_lora_rank", "4", "--lr_generator", "1e-3",
                          "--update_ratio", "1")
    state = load_file(str(run / "checkpoints" / "step_0000002" / "model.safetensors"))
    assert state and all(".lora_" in k and ".generator." in k for k in state)
    assert_lora_file_reproduces(run, m, sdxl_teacher, tmp_path, len(state))


def test_fp16_keeps_a_force_upcast_vae_in_float32(sdxl_teacher):
    teacher = load_teacher(sdxl_teacher, prompts=PROMPTS, frozen_dtype=torch.float16)
    assert teacher.vae.dtype == torch.float32 and teacher.backbone.dtype == torch.float32  # the UNet: load dtype
    assert load_teacher(sdxl_teacher, prompts=PROMPTS, frozen_dtype=torch.bfloat16).vae.dtype == torch.bfloat16


def test_per_channel_latent_statistics_of_the_vae_config_are_used(tmp_path):
    """A VAE config with latents_mean / latents_std (e.g. Playground v2.5's SDXL VAE): decode and encode follow the
    diffusers SDXL pipeline's formula, latents * std / scaling_factor + mean, per channel."""
    folder = save_tiny_sdxl(str(tmp_path / "xl"))
    cfg_file = tmp_path / "xl" / "vae" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.update(latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[0.5, 2.0, 1.0, 1.5])
    cfg_file.write_text(json.dumps(cfg))
    teacher = load_teacher(folder, prompts=PROMPTS)
    mean, std = (torch.tensor(cfg[k]).view(1, 4, 1, 1) for k in ("latents_mean", "latents_std"))
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        expected = teacher.vae.decode(x * std / cfg["scaling_factor"] + mean).sample
        assert torch.allclose(teacher.to_images(x), expected, atol=1e-5)
        images = torch.rand(2, 3, 16, 16) * 2 - 1
        latents = teacher.vae.encode(images).latent_dist.mode()
        assert torch.allclose(teacher.encode_images(images), (latents - mean) * cfg["scaling_factor"] / std, atol=1e-5)
    cfg_file.write_text(json.dumps({**cfg, "shift_factor": 0.1}))  # a shift the stock SDXL pipeline never applies
    with pytest.raises(TeacherError, match="has shift_factor, which the stock SDXL pipeline does not apply"):
        load_teacher(folder, prompts=PROMPTS)
