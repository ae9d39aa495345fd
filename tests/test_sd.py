"""Stable Diffusion teachers and VSD: a tiny SD pipeline built from configs, loaded through --teacher like a user's.

Loading (latent space, cached prompt embeddings, the empty prompt as null condition), incomplete pipelines, the VSD
method's gradients and guidance, the LoRA fake score, and VSD / DMD2 runs end to end whose stock diffusers
export reproduces the student with no onestep import.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch
from conftest import ROOT, run_distill
from safetensors.torch import load_file

from onestep.loading import TeacherError, load_teacher
from onestep.methods import build_method
from onestep.methods.vsd import vsd_gradient
from onestep.triad import Triad

PROMPTS = ["a photo of a cat", "a red car", "two dogs on a beach"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one thread (conftest.py)


def tiny_tokenizer():
    """A CLIP tokenizer with a byte-level vocabulary and no merges, built offline: every prompt tokenizes."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    chars = ByteLevel.alphabet()
    vocab = ["<|startoftext|>", "<|endoftext|>"] + sorted(chars) + sorted(c + "</w>" for c in chars)
    vocab = {t: i for i, t in enumerate(vocab)}
    try:
        return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)
    except TypeError:  # transformers < 5 reads the vocabulary and the merges from files
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "vocab.json"), "w") as f:
                json.dump(vocab, f)
            with open(os.path.join(d, "merges.txt"), "w") as f:
                f.write("#version: 0.2\n")
            return CLIPTokenizer(os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt"), model_max_length=16)


def save_tiny_sd(path: str) -> str:
    """A Stable Diffusion pipeline folder with tiny random components: latents 4x8x8, images 3x16x16."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                                norm_num_groups=4, attention_head_dim=4)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        sample_size=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=16,
                                                intermediate_size=32, num_attention_heads=2, num_hidden_layers=2,
                                                vocab_size=514, max_position_embeddings=16))
    tokenizer = tiny_tokenizer()
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                              steps_offset=1, set_alpha_to_one=False)  # SD1.5's scheduler config
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def sd_teacher(tmp_path_factory) -> str:
    return save_tiny_sd(str(tmp_path_factory.mktemp("tiny-sd")))


@pytest.fixture
def teacher(sd_teacher):  # fresh per test: a triad injects its LoRA into the teacher's module
    return load_teacher(sd_teacher, prompts=PROMPTS)


def make_triad(teacher, trained=True):
    """A LoRA triad; `trained` moves LoRA B off zero, as critic steps do (else fake = teacher and VSD's g = 0)."""
    torch.manual_seed(0)
    triad = Triad.from_teacher(teacher.denoiser, fake_score="lora", lora_rank=4, sample_shape=teacher.sample_shape)
    if trained:
        for n, p in triad.teacher.backbone.named_parameters():
            if "lora_B" in n:
                p.data.normal_(0, 0.1)
    return triad


def sd_batch(teacher, n=3):
    torch.manual_seed(1)
    return {"z": torch.randn(n, *teacher.sample_shape), "cond": teacher.prompt_embeds[torch.arange(n) % len(PROMPTS)]}


def test_sd_teacher_works_in_latent_space_with_cached_prompt_embeddings(sd_teacher, teacher):
    from diffusers import StableDiffusionPipeline

    assert teacher.sample_shape == (4, 8, 8) and teacher.text_conditional and teacher.prompts == PROMPTS
    assert teacher.info["image_size"] == 16
    pipe = StableDiffusionPipeline.from_pretrained(sd_teacher)
    ref, ref_null = pipe.encode_prompt(PROMPTS, "cpu", 1, True, [""] * len(PROMPTS))
    assert torch.allclose(teacher.prompt_embeds[:], ref, atol=1e-6)  # the stock pipeline's conditions
    assert torch.allclose(teacher.denoiser.null_cond.expand_as(ref), ref_null, atol=1e-6)  # null = empty prompt
    x = torch.randn(2, *teacher.sample_shape)
    images = teacher.to_images(x)
    assert images.shape == (2, 3, 16, 16)
    expected = pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample
    assert torch.allclose(images, expected, atol=1e-5)
    # the teacher denoiser is SD's UNet, guided with the null embedding in one batched forward
    t = torch.tensor([500, 900])
    x0 = teacher.denoiser.guided(x, t, teacher.prompt_embeds[:2], 3.0)
    assert x0.shape == x.shape and torch.isfinite(x0).all()


def test_a_prompt_table_past_its_cache_budget_encodes_the_rows_it_is_asked_for(sd_teacher, teacher, monkeypatch):
    from onestep.data import RealImages
    from onestep.prompts import CACHE_MB_ENV, PromptError

    monkeypatch.setenv(CACHE_MB_ENV, "0")
    lazy = load_teacher(sd_teacher, prompts=PROMPTS)
    table, cached = lazy.prompt_embeds, teacher.prompt_embeds
    assert cached.cached and not table.cached and table.shape == cached.shape and len(table) == len(PROMPTS)
    for idx in (slice(None), slice(1, 3), [2, 0, 2], torch.tensor([[1], [0]]), 1):
        assert torch.allclose(table[idx], cached[idx], atol=1e-6)
    sub = table.subset(torch.tensor([False, True, True]))
    assert not sub.cached and sub.prompts == PROMPTS[1:] and torch.allclose(sub[:], cached[1:], atol=1e-6)
    # batches of uncaptioned real images: the cached table's rows, each batch's in one encoding when taken, none
    # for the batches a resumed run skips
    from onestep.runs import RealBatches

    encoded = []
    table._encode = lambda texts, f=table._encode: encoded.append(len(texts)) or f(texts)
    data, ref = (RealImages(torch.zeros(20, 4, 8, 8), cond_table=t, seed=3) for t in (table, cached))
    loader = torch.utils.data.DataLoader(data, batch_size=5)
    batch = next(RealBatches(loader))
    assert encoded == [len(set(data.prompt_rows[:5].tolist()))] and "real_cond_row" not in batch
    assert torch.allclose(batch["real_cond"], torch.stack([ref[i]["real_cond"] for i in range(5)]), atol=1e-6)
    resumed, encoded[:] = RealBatches(loader), []
    resumed.load_state_dict({"epoch_rng": torch.get_rng_state(), "offset": torch.tensor(3), "epoch": torch.tensor(0)})
    batch = next(resumed)  # the 4th batch: only its own rows encoded
    assert len(encoded) == 1 and torch.allclose(batch["real_cond"], torch.stack([ref[i]["real_cond"]
                                                                                 for i in range(15, 20)]), atol=1e-6)
    for idx in ([], slice(2, 2)):  # empty, as a tensor's
        assert table[idx].shape == cached[idx].shape == (0, *cached.shape[1:])
    with pytest.raises(TypeError, match="row indices only"):
        table[0, :3]
    from onestep.methods import build_method
    with pytest.raises(PromptError, match="--method sfd matches each condition against every prompt's embedding"):
        build_method("sfd", forget=[PROMPTS[0]], override=[PROMPTS[1]]).setup(table, PROMPTS)
    for bad in ("lots", "-1", "inf"):
        monkeypatch.setenv(CACHE_MB_ENV, bad)
        with pytest.raises(PromptError, match=f"ONESTEP_PROMPT_CACHE_MB='{bad}' is not a size in MiB"):
            load_teacher(sd_teacher, prompts=PROMPTS)
    from onestep.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="ONESTEP_PROMPT_CACHE_MB='inf' is not a size"):  # before any folder is made
        load_config([])


def test_frozen_parts_in_the_compute_dtype_and_default_prompts(sd_teacher):
    t = load_teacher(sd_teacher, frozen_dtype=torch.bfloat16)
    assert t.vae.dtype == torch.bfloat16 and not any(p.requires_grad for p in t.vae.parameters())
    assert len(t.prompts) > 1 and t.prompt_embeds.dtype == torch.float32 and t.prompt_embeds.shape[0] == len(t.prompts)
    triad = Triad.from_teacher(t.denoiser, fake_score="lora", lora_rank=4, frozen_dtype=torch.bfloat16)
    assert triad.teacher.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in triad.generator_parameters() + triad.critic_parameters())


def test_incomplete_pipelines_are_refused_with_one_line(sd_teacher, tmp_path):
    xl = tmp_path / "xl"
    shutil.copytree(sd_teacher, xl)
    index = json.loads((xl / "model_index.json").read_text())
    index.update({"_class_name": "StableDiffusionXLPipeline", "text_encoder_2": ["transformers", "CLIPTextModel"]})
    (xl / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(TeacherError, match="SDXL teacher needs .* lacks text_encoder_2/, tokenizer_2/$"):
        load_teacher(str(xl))
    shutil.rmtree(xl / "text_encoder")
    index.pop("text_encoder_2")
    index["_class_name"] = "StableDiffusionPipeline"
    (xl / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(TeacherError, match="lacks text_encoder/"):
        load_teacher(str(xl))


def test_a_text_teacher_with_an_edm_schedule_is_refused_before_training(sd_teacher, tmp_path):
    """An SD pipeline with an EDM scheduler (Playground v2.5's kind) loads (its samples can be measured), but a run
    stops before training: its student would have no stock one-step SD export."""
    from diffusers import EDMEulerScheduler

    from onestep.config import Config, ConfigError, check_teacher_fit

    root = tmp_path / "edm"
    shutil.copytree(sd_teacher, root)
    shutil.rmtree(root / "scheduler")
    EDMEulerScheduler().save_pretrained(str(root / "scheduler"))
    index = json.loads((root / "model_index.json").read_text())
    (root / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers", "EDMEulerScheduler"]}))
    teacher = load_teacher(str(root))
    assert teacher.denoiser.schedule.kind == "edm"
    with pytest.raises(ConfigError, match="text-to-image teacher's schedule is EDM, not VP .* no stock one-step"):
        check_teacher_fit(Config(teacher=str(root), generator_timesteps=[80.0], classifier="", eval_every=0), teacher)


def test_a_vae_with_statistics_the_stock_sd_pipeline_ignores_is_refused(sd_teacher, tmp_path):
    """StableDiffusionPipeline decodes by scaling_factor alone: per-channel statistics in an SD VAE config would
    make the student train in latents its export does not decode."""
    root = tmp_path / "sd"
    shutil.copytree(sd_teacher, root)
    cfg = json.loads((root / "vae" / "config.json").read_text())
    (root / "vae" / "config.json").write_text(json.dumps({**cfg, "latents_mean": [0.0] * 4, "latents_std": [0.5] * 4}))
    with pytest.raises(TeacherError, match="has latents_mean and latents_std, which the stock Stable Diffusion"):
        load_teacher(str(root))


def test_vsd_gradient_is_sigma_squared_eps_difference(teacher):
    sched = teacher.denoiser.schedule
    x, x_t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([100, 800])
    x0_real, x0_fake = torch.randn_like(x), torch.randn_like(x)
    eps = [sched.from_x0(v, x_t, t, "epsilon") for v in (x0_real, x0_fake)]
    _, s = sched.alpha_sigma(t)
    expected = s.reshape(-1, 1, 1, 1) ** 2 * (eps[0] - eps[1])  # sigma^2 (eps_T - eps_F)
    assert torch.allclose(vsd_gradient(sched, t, x0_real, x0_fake), expected, atol=1e-4)


def test_vsd_gradients_reach_only_generator_then_only_lora(teacher):
    triad = make_triad(teacher)
    method = build_method("vsd", real_guidance_scale=3.0)
    base = {n: p.detach().clone() for n, p in triad.teacher.backbone.named_parameters() if "lora_" not in n}
    loss, logs = method.generator_loss(triad, sd_batch(teacher))
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in triad.generator_parameters())
    assert all(p.grad is None for p in triad.teacher.backbone.parameters())  # LoRA and base weights alike
    assert torch.isfinite(loss) and "loss_vsd" in logs
    triad.raw("generator").zero_grad(set_to_none=True)

    loss, logs = method.fake_score_loss(triad, sd_batch(teacher))
    loss.backward()
    assert all(p.grad is None for p in triad.raw("generator").parameters())
    with_grad = [n for n, p in triad.teacher.backbone.named_parameters() if p.grad is not None]
    assert with_grad and all("lora_" in n for n in with_grad)
    assert len(with_grad) == len(triad.critic_parameters())
    assert all(torch.equal(base[n], p) for n, p in triad.teacher.backbone.named_parameters() if n in base)


def test_lora_fake_score_adds_only_adapters_and_never_changes_the_teacher(teacher):
    n_base = sum(p.numel() for p in teacher.backbone.parameters())
    triad = make_triad(teacher, trained=False)
    backbone = triad.teacher.backbone
    assert triad.raw("fake_score").backbone is backbone  # one copy of the base weights
    base = {n: p.detach().clone() for n, p in backbone.named_parameters() if "lora_" not in n}
    lora = sum(p.numel() for n, p in backbone.named_parameters() if "lora_" in n)
    assert lora > 0 and sum(p.numel() for p in backbone.parameters()) == n_base + lora
    method = build_method("vsd", random_guidance=True)
    opt_g = torch.optim.AdamW(triad.generator_parameters(), lr=1e-2)
    opt_f = torch.optim.AdamW(triad.critic_parameters(), lr=1e-2)
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([300, 700]), teacher.prompt_embeds[:2]
    out_before = triad.teacher(x, t, c)
    for _ in range(2):
        for fn, opt in ((method.generator_loss, opt_g), (method.fake_score_loss, opt_f)):
            opt.zero_grad()
            fn(triad, sd_batch(teacher))[0].backward()
            opt.step()
    assert all(torch.equal(base[n], p) for n, p in backbone.named_parameters() if n in base)
    assert torch.equal(triad.teacher(x, t, c), out_before)  # adapters off: the same teacher
    assert not torch.allclose(triad.fake_score(x, t, c), out_before)  # while the LoRA fake score moved


@pytest.mark.parametrize("draw,shared", [("sample", True), ("batch", True), ("sample", False)])
def test_pgsb_draws_kappa_per_sample_or_batch_shared_or_not(teacher, monkeypatch, draw, shared):
    """SNOOPI's choice (the default): a kappa per sample, the same draw for both branches; the options draw one per
    batch, or give the fake branch a draw of its own."""
    from onestep.denoiser import Denoiser

    triad, scales = make_triad(teacher), []
    original = Denoiser.guided

    def spy(self, x_t, t, cond, scale, uncond=None):
        scales.append((self.adapters, scale))
        return original(self, x_t, t, cond, scale, uncond)

    monkeypatch.setattr(Denoiser, "guided", spy)
    method = build_method("vsd", random_guidance=True, kappa_min=1.5, kappa_max=2.5, kappa_draw=draw,
                          kappa_shared=shared)
    loss, _ = method.generator_loss(triad, sd_batch(teacher, 4))
    assert torch.isfinite(loss)
    (who_t, k_t), (who_f, k_f) = scales
    assert (who_t, who_f) == (False, True)  # teacher (adapters off), then the LoRA fake score
    for k in (k_t, k_f):
        assert k.shape == (4,) and ((k >= 1.5) & (k <= 2.5)).all() and k.unique().numel() == (4 if draw == "sample" else 1)
    assert (k_t is k_f) == shared and (shared or not torch.equal(k_t, k_f))


def test_fake_score_condition_dropout_uses_the_empty_prompt(teacher):
    triad = make_triad(teacher)
    seen = []
    hook = triad.teacher.backbone.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["encoder_hidden_states"]), with_kwargs=True)
    build_method("vsd", cond_dropout=1.0).fake_score_loss(triad, sd_batch(teacher))
    build_method("vsd", cond_dropout=0.0).fake_score_loss(triad, sd_batch(teacher))
    hook.remove()
    null, cond = teacher.denoiser.null_cond, sd_batch(teacher)["cond"]
    assert torch.equal(seen[0], null.expand_as(cond)) and torch.equal(seen[1], cond)


@pytest.mark.parametrize("timesteps", [[700], [300], [999, 499]])
def test_stock_export_runs_the_student_at_its_timesteps(teacher, timesteps, tmp_path):
    from diffusers import LCMScheduler, StableDiffusionPipeline

    from onestep.generator import Generator
    from onestep.pipeline import OneStepPipeline, export_text_pipeline, stock_call_kwargs
    from onestep.streaming import SourceError, pipeline_source

    student = Generator(teacher.denoiser, timesteps)
    export_text_pipeline(student, teacher.scheduler_config, teacher.path, str(tmp_path / "p"))
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "p"))
    assert {k for k in pipe.scheduler.config if not k.startswith("_")} <= set(LCMScheduler().config)  # no teacher-only keys
    with pytest.raises(ValueError, match="a text-to-image export"):  # onestep's pixel pipeline refuses it
        OneStepPipeline.from_pretrained(str(tmp_path / "p"))
    with pytest.raises(SourceError, match="is a text-to-image student: pass prompts"):  # streams on prompts
        pipeline_source(str(tmp_path / "p"), 8)
    assert json.loads((tmp_path / "p" / "onestep.json").read_text()) == {"pipeline_call": stock_call_kwargs(student)}
    kwargs = stock_call_kwargs(student)
    assert ("num_inference_steps" in kwargs) == (timesteps == [700])  # LCM's one-step schedule can start at 700
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    out = pipe(PROMPTS[:2], latents=z, output_type="latent", generator=torch.Generator().manual_seed(1), **kwargs).images
    g = torch.Generator().manual_seed(1)  # the same re-noising draws as the scheduler's
    with torch.no_grad():
        ref = student.sample(z, teacher.prompt_embeds[:2], noise=lambda x: torch.randn(x.shape, generator=g))
    assert torch.allclose(out, ref, atol=1e-4)


def stock_output(folder: str, out: str, z: torch.Tensor, prompts: list[str], call: str, lora_on: str = "") -> dict:
    """Run the export with stock diffusers in a fresh process (no onestep import); latents and images as numpy.
    lora_on: a teacher folder to load the export's LoRA file onto (with the export's scheduler), as its card says."""
    torch.save(z, out + ".z.pt")
    load = (f"pipe = DiffusionPipeline.from_pretrained({lora_on!r}); pipe.load_lora_weights({folder!r})\n"
            f"pipe.scheduler = LCMScheduler.from_pretrained({folder!r}, subfolder='scheduler')\n") if lora_on else \
        f"pipe = DiffusionPipeline.from_pretrained({folder!r})\n"
    code = (
        "import sys, torch, numpy as np; from diffusers import DiffusionPipeline, LCMScheduler\n" + load +
        f"z = torch.load({out + '.z.pt'!r})\n"
        f"kw = dict({call})\n"
        f"lat = pipe({prompts!r}, latents=z, output_type='latent', **kw).images\n"
        f"img = pipe({prompts!r}, latents=z, output_type='pt', **kw).images\n"
        "assert 'onestep' not in sys.modules\n"
        f"np.savez({out!r}, latents=lat.numpy(), images=img.numpy(), name=type(pipe).__name__)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=os.path.dirname(out),
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    import numpy as np

    return dict(np.load(out + ".npz"))


def assert_stock_reproduces(run, metrics, teacher, student, tmp_path, pipeline_name: str) -> None:
    """The exported stock pipeline, called as the model card says in a fresh process, gives the student's
    latents and images for the same noise."""
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        latents = student.sample(z, teacher.prompt_embeds[:])
        images = ((teacher.to_images(latents) + 1) / 2).clamp(0, 1)
    call = metrics["pipeline_call"].split(",", 1)[1].rsplit(")", 1)[0]  # the card's keyword arguments
    out = stock_output(str(run / "pipeline"), str(tmp_path / "stock"), z, PROMPTS, call)
    assert str(out["name"]) == pipeline_name
    assert torch.allclose(torch.from_numpy(out["latents"]), latents, atol=1e-4)
    assert torch.allclose(torch.from_numpy(out["images"]), images, atol=1e-4)


def assert_lora_file_reproduces(run, metrics, teacher_dir, tmp_path, tensors: int) -> None:
    """A LoRA generator's export also holds its adapters alone (diffusers' LoRA format, `tensors` of them): loaded
    onto the teacher with the export's scheduler, as the model card says, in a fresh process, they give the merged
    export's latents and images."""
    import numpy as np

    card = (run / "pipeline" / "README.md").read_text()
    assert "pipe.load_lora_weights(" in card and "pytorch_lora_weights.safetensors" in card
    lora = load_file(str(run / "pipeline" / "pytorch_lora_weights.safetensors"))
    assert len(lora) == tensors and all(k.startswith("unet.") and ".lora_" in k for k in lora)
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)  # trained (B starts at 0)
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    call = metrics["pipeline_call"].split(",", 1)[1].rsplit(")", 1)[0]
    merged = stock_output(str(run / "pipeline"), str(tmp_path / "merged"), z, PROMPTS, call)
    on_teacher = stock_output(str(run / "pipeline"), str(tmp_path / "on-teacher"), z, PROMPTS, call, lora_on=teacher_dir)
    assert str(on_teacher["name"]) == str(merged["name"])
    np.testing.assert_allclose(on_teacher["latents"], merged["latents"], atol=1e-4)
    np.testing.assert_allclose(on_teacher["images"], merged["images"], atol=1e-4)


def student_from_checkpoint(run_dir, teacher_dir, step, generator_lora=0):
    """The trained generator rebuilt from the run's accelerate checkpoint (same code path as training); a LoRA
    generator's checkpoint holds its adapters, put on the teacher's weights and merged."""
    from onestep.denoiser import merge_adapters
    from onestep.generator import Generator
    from onestep.triad import DEFAULT_LORA_TARGETS, add_lora

    t = load_teacher(teacher_dir, prompts=PROMPTS)
    state = load_file(os.path.join(run_dir, "checkpoints", f"step_{step:07d}", "model.safetensors"))
    if generator_lora:
        add_lora(t.backbone, DEFAULT_LORA_TARGETS, generator_lora, "generator")
    missing, unexpected = t.backbone.load_state_dict({k.removeprefix("denoiser.backbone."): v for k, v in state.items()},
                                                     strict=False)
    assert not unexpected and all("lora_" not in k for k in missing) and (generator_lora or not missing)
    merge_adapters(t.backbone)
    return t, Generator(t.denoiser)


def distill_sd(preset: str, sd_teacher: str, tmp_path, *extra: str):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n\n")
    lora = ["--lora_rank", "4"] if preset.endswith("vsd") or "lora" in extra else []  # only a LoRA fake score takes it
    r = run_distill(["--preset", preset, "--teacher", sd_teacher, "--prompts", str(prompts), "--steps", "2",
                     "--batch_size", "2", "--output_dir", str(tmp_path), "--name", "run", *lora,
                     "--sample_every", "0", "--checkpoint_every", "0", "--log_every", "1", "--cpu_threads", "1", *extra])
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "run"
    m = json.loads((run / "metrics.json").read_text())
    assert m["text_to_image"] and m["prompts"] == 3 and m["student"]["fid"] is None  # no digits-FID for SD
    assert (run / "samples" / "step_0000002.png").exists()
    card = (run / "pipeline" / "README.md").read_text()
    assert "DiffusionPipeline.from_pretrained" in card and m["pipeline_call"] in card
    assert json.loads((run / "pipeline" / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == "LCMScheduler"
    return run, m


def test_sd_vsd_run_end_to_end_exports_a_stock_pipeline_that_reproduces_the_student(sd_teacher, tmp_path):
    run, m = distill_sd("sd15-vsd", sd_teacher, tmp_path, "--random_guidance", "true")
    assert "fake_score: lora" in (run / "config.yaml").read_text()  # VSD's default fake score
    teacher, student = student_from_checkpoint(str(run), sd_teacher, 2)
    assert_stock_reproduces(run, m, teacher, student, tmp_path, "StableDiffusionPipeline")


def test_sd_lora_generator_exports_a_merged_stock_pipeline_that_reproduces_the_student(sd_teacher, tmp_path):
    """A LoRA generator over VSD's LoRA fake score: one copy of the UNet's weights, the two adapters all that trains.
    The checkpoint holds the generator's adapters; the export is the stock pipeline with them merged into the UNet."""
    run, m = distill_sd("sd15-vsd", sd_teacher, tmp_path, "--generator_lora_rank", "4", "--lr_generator", "1e-3")
    state = load_file(str(run / "checkpoints" / "step_0000002" / "model.safetensors"))
    assert state and all(".lora_" in k and ".generator." in k for k in state)
    exported = load_file(str(run / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"))
    teacher = teacher_weights(sd_teacher)
    assert exported.keys() == teacher.keys() and any(not torch.equal(exported[k], teacher[k]) for k in teacher)
    teacher, student = student_from_checkpoint(str(run), sd_teacher, 2, generator_lora=4)
    assert_stock_reproduces(run, m, teacher, student, tmp_path, "StableDiffusionPipeline")
    assert_lora_file_reproduces(run, m, sd_teacher, tmp_path, len(state))


# the README's low-memory SD1.5 DMD2 recipe: LoRA fake score, gradient checkpointing, 8-bit AdamW, EMA in CPU memory
LOW_MEMORY = ("--fake_score", "lora", "--gradient_checkpointing", "true", "--optimizer", "adamw8bit", "--ema_decay",
              "0.999", "--offload_ema", "true")


@pytest.mark.parametrize("extra", [(), LOW_MEMORY], ids=["default", "low-memory"])
def test_sd_dmd2_run_end_to_end_with_the_gan_off(sd_teacher, tmp_path, extra):
    run, _ = distill_sd("sd15-dmd2", sd_teacher, tmp_path, "--update_ratio", "2", *extra)
    assert f"fake_score: {'lora' if extra else 'copy'}" in (run / "config.yaml").read_text()
    teacher, student = student_from_checkpoint(str(run), sd_teacher, 2)
    assert not torch.equal(student.denoiser.backbone.conv_in.weight, teacher_weights(sd_teacher)["conv_in.weight"])
    if not extra:  # the prompts are the conditions: resuming after the file's lines changed is another run
        (tmp_path / "prompts.txt").write_text("a different prompt\n")
        cmd = [sys.executable, os.path.join(ROOT, "train", "distill.py"), "--preset", "sd15-dmd2", "--teacher", sd_teacher,
               "--prompts", str(tmp_path / "prompts.txt"), "--output_dir", str(tmp_path), "--name", "run", "--steps", "3",
               "--batch_size", "2", "--update_ratio", "2", "--resume", "latest", "--cpu_threads", "1"]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 2 and len(lines) == 1 and "other prompts_sha256 (" in lines[0], r.stderr[-2000:]


def teacher_weights(folder):
    return load_file(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))


@pytest.mark.parametrize("flags, message", [(["--gan_generator_weight", "1e-3"], "needs real images"),
                                            (["--clip_sample", "1"], "latents have no fixed range")])
def test_sd_dmd2_bad_options_give_one_line_error(sd_teacher, tmp_path, flags, message):
    cmd = [sys.executable, os.path.join(ROOT, "train", "distill.py"), "--preset", "sd15-dmd2", "--teacher", sd_teacher,
           *flags, "--output_dir", str(tmp_path)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and message in lines[0], r.stderr[-2000:]
    assert not [f for f in tmp_path.rglob("*") if f.is_file()]  # nothing written
