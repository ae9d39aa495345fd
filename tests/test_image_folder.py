"""Real images for DMD2's GAN on text-to-image teachers: a folder of images (captions from metadata.jsonl or
NAME.txt, or none) read once, encoded by the teacher's VAE into latents, captions into cached embeddings; DMD2
runs with the GAN on tiny SD and SDXL pipelines built from configs.
"""
import json
import os

import numpy as np
import pytest
import torch
from conftest import run_distill
from PIL import Image
from test_sd import PROMPTS, save_tiny_sd
from test_sdxl import save_tiny_sdxl

from onestep.config import ConfigError, load_config
from onestep.data import DataError, folder_dataset, load_images, read_image_folder
from onestep.loading import load_teacher

CAPTIONS = ["a red square", "a blue field", "a green wall", "a grey sky"]

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one thread (conftest.py)


def write_images(folder, captions: str | None = None, n: int = 4) -> list[str]:
    """n small RGB images of other sizes than the teacher's (20x24: resized and centre-cropped); captions as
    "jsonl" (metadata.jsonl), "txt" (NAME.txt) or None."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    names = [f"img{i}.png" for i in range(n)]
    for name, text in zip(names, CAPTIONS):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(os.path.join(folder, name))
        if captions == "txt":
            with open(os.path.join(folder, name[:-4] + ".txt"), "w") as f:
                f.write(text + "\n")
    if captions == "jsonl":
        with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
            f.writelines(json.dumps({"file_name": name, "text": text}) + "\n" for name, text in zip(names, CAPTIONS))
    return names


@pytest.fixture(scope="module")
def sd_teacher(tmp_path_factory) -> str:
    return save_tiny_sd(str(tmp_path_factory.mktemp("tiny-sd")))


@pytest.mark.parametrize("captions", ["jsonl", "txt", None])
def test_folder_captions_from_metadata_or_text_files_or_none(captions, tmp_path):
    names = write_images(tmp_path / "data", captions)
    folder = read_image_folder(str(tmp_path / "data"))
    assert folder.files == names
    assert folder.captions == (None if captions is None else CAPTIONS)


def test_bad_folders_give_one_line_errors_that_say_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match="dataset: .* not 'digits', 'none' or an existing folder"):
        load_config(["--dataset", str(tmp_path / "missing")])
    with pytest.raises(DataError, match="holds no images"):
        read_image_folder(str(tmp_path))
    write_images(tmp_path / "txt", "txt")
    os.remove(tmp_path / "txt" / "img2.txt")
    with pytest.raises(DataError, match="'img2.png' has no caption file 'img2.txt'"):
        read_image_folder(str(tmp_path / "txt"))
    write_images(tmp_path / "jsonl", "jsonl", n=4)
    Image.new("RGB", (4, 4)).save(tmp_path / "jsonl" / "extra.png")
    with pytest.raises(DataError, match="'extra.png' has no line in .*metadata.jsonl"):
        read_image_folder(str(tmp_path / "jsonl"))
    os.remove(tmp_path / "jsonl" / "extra.png")
    (tmp_path / "jsonl" / "metadata.jsonl").write_bytes(b"\xef\xbb\xbf" + (tmp_path / "jsonl" / "metadata.jsonl").read_bytes())
    assert read_image_folder(str(tmp_path / "jsonl")).captions == CAPTIONS  # a byte-order mark is not text
    (tmp_path / "txt" / "img2.txt").write_bytes(b"\xff\xfea caption in UTF-16")
    with pytest.raises(DataError, match="img2.txt' cannot be read as UTF-8 text .*save the captions as UTF-8"):
        read_image_folder(str(tmp_path / "txt"))
    (tmp_path / "txt" / "img2.txt").write_text(" \n")  # an empty caption would be the null condition
    with pytest.raises(DataError, match=r"caption of image 'img2.png' \(its .txt file\) is empty"):
        read_image_folder(str(tmp_path / "txt"))
    assert read_image_folder(str(tmp_path / "txt"), text=False).captions[2] == ""  # other teachers ignore captions
    (tmp_path / "jsonl" / "metadata.jsonl").write_text('{"file_name": "img0.png", "text": null}\n')
    with pytest.raises(DataError, match=r"line 1 of .* \"text\" \(a string\)"):
        read_image_folder(str(tmp_path / "jsonl"))


def test_images_become_vae_latents_and_captions_cached_embeddings(sd_teacher, tmp_path):
    from diffusers import StableDiffusionPipeline

    write_images(tmp_path / "data", "jsonl")
    folder = read_image_folder(str(tmp_path / "data"))
    teacher = load_teacher(sd_teacher, prompts=PROMPTS, captions=folder.captions)
    data = folder_dataset(folder, teacher, chunk=3)  # chunks of 3: 4 images in two encoder calls
    images = load_images([str(tmp_path / "data" / f) for f in folder.files], 16)
    assert images.shape == (4, 3, 16, 16) and images.min() >= -1 and images.max() <= 1
    pipe = StableDiffusionPipeline.from_pretrained(sd_teacher)
    with torch.no_grad():
        latents = pipe.vae.encode(images).latent_dist.mode() * pipe.vae.config.scaling_factor
    assert len(data) == 4 and torch.allclose(torch.stack([data[i]["real"] for i in range(4)]), latents, atol=1e-5)
    ref = pipe.encode_prompt(CAPTIONS, "cpu", 1, False)[0]
    assert torch.allclose(torch.stack([data[i]["real_cond"] for i in range(4)]), ref, atol=1e-6)
    assert teacher.prompts == PROMPTS  # --prompts wins; without it the captions are the prompts
    assert load_teacher(sd_teacher, captions=folder.captions).prompts == CAPTIONS


def test_uncaptioned_images_draw_a_training_prompt(sd_teacher, tmp_path):
    write_images(tmp_path / "data", None)
    teacher = load_teacher(sd_teacher, prompts=PROMPTS)
    data = folder_dataset(read_image_folder(str(tmp_path / "data")), teacher)
    drawn = []
    for epoch in range(6):  # a new draw each epoch, from (seed, epoch) alone
        data.set_epoch(epoch)
        drawn += [data[i]["real_cond"] for i in range(4)]
    drawn = torch.stack(drawn)
    rows = [next(j for j in range(len(PROMPTS)) if torch.equal(c, teacher.prompt_embeds[j])) for c in drawn]
    assert set(rows) == set(range(len(PROMPTS)))  # every training prompt, never the null condition


def test_pixel_teachers_take_the_images_as_they_are_and_class_teachers_refuse(uncond_teacher, cond_teacher, tmp_path):
    write_images(tmp_path / "data", "txt")
    folder = read_image_folder(str(tmp_path / "data"))
    data = folder_dataset(folder, load_teacher(uncond_teacher))  # a 1x8x8 teacher: grey 8x8 images, no condition
    expected = load_images([str(tmp_path / "data" / f) for f in folder.files], 8, channels=1)
    assert set(data[0]) == {"real"} and torch.equal(torch.stack([data[i]["real"] for i in range(4)]), expected)
    with pytest.raises(DataError, match="no class labels for this class-conditional teacher"):
        folder_dataset(folder, load_teacher(cond_teacher))


def distill_with_folder(teacher: str, preset: str, data: str, tmp_path, *extra: str, env: dict | None = None):
    r = run_distill(["--preset", preset, "--teacher", teacher, "--dataset", data, "--steps", "2", "--batch_size", "2",
                     "--update_ratio", "1", "--gan_generator_weight", "1e-3", "--gan_critic_weight", "1e-2",
                     "--output_dir", str(tmp_path), "--name", "run", "--sample_every", "0", "--checkpoint_every", "0",
                     "--log_every", "1", "--cpu_threads", "1", *extra], env_extra=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "loss_gan_d" in r.stderr and "loss_gan_g" in r.stderr  # the GAN ran, on both turns (progress bar)
    return json.loads((tmp_path / "run" / "metrics.json").read_text()), (tmp_path / "run" / "config.yaml").read_text()


def test_sd_dmd2_with_gan_on_a_captioned_folder_and_a_negative_prompt(sd_teacher, tmp_path):
    write_images(tmp_path / "data", "txt")
    m, cfg = distill_with_folder(sd_teacher, "sd15-dmd2", str(tmp_path / "data"), tmp_path,
                                 "--negative_prompt", "blurry, low quality")
    assert m["prompts"] == len(CAPTIONS)  # no --prompts: the captions are the training prompts
    assert "negative_prompt: blurry, low quality" in cfg
    assert os.path.isfile(tmp_path / "run" / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")


def test_sdxl_dmd2_with_gan_on_an_uncaptioned_folder_encoding_prompts_as_drawn(tmp_path):
    teacher = save_tiny_sdxl(str(tmp_path / "xl"))
    write_images(tmp_path / "data", None)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    m, _ = distill_with_folder(teacher, "sdxl-dmd2", str(tmp_path / "data"), tmp_path, "--prompts", str(prompts),
                               env={"ONESTEP_PROMPT_CACHE_MB": "0"})  # no cached table: each batch's rows encoded
    assert m["prompts"] == len(PROMPTS) and m["pipeline_call"].endswith("timesteps=[399], guidance_scale=1.0)")
