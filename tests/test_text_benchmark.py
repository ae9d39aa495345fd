"""Streaming FID of text-to-image models: a tiny Stable Diffusion teacher (onestep's DDIM + guidance on cached prompt
embeddings) and its exported students (their stock pipelines' own calls), sample i = prompt i % P."""
import json
import os
import runpy

import pytest
import torch
from conftest import ROOT
from test_eval_cli import one_error_line
from test_eval_metrics import _Base
from test_sd import save_tiny_sd

from onestep.benchmark import pipeline_model, teacher_models
from onestep.streaming import SourceError, sample_seed

PROMPTS = ["a photo of a cat", "a red car", "the sea at night"]


@pytest.fixture(scope="module")
def t2i(tmp_path_factory) -> dict:
    """A tiny SD teacher, its one-step student exported (LCM one step at t = 999) and a two-step one, a prompt file,
    a reference folder of 16x16 RGB images and stand-in Inception weights (a scripted network in the file's format)."""
    import numpy as np
    from PIL import Image

    from onestep.generator import Generator
    from onestep.loading import load_teacher
    from onestep.pipeline import export_text_pipeline

    d = tmp_path_factory.mktemp("t2i")
    sd = save_tiny_sd(str(d / "sd"))
    t = load_teacher(sd, prompts=PROMPTS)
    export_text_pipeline(Generator(t.denoiser), t.scheduler_config, sd, str(d / "one"))
    export_text_pipeline(Generator(t.denoiser, [999, 499]), t.scheduler_config, sd, str(d / "two"))
    (d / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (d / "ref").mkdir()
    for i in range(8):
        Image.fromarray(np.random.RandomState(i).randint(0, 256, (16, 16, 3), dtype=np.uint8)).save(d / "ref" / f"{i}.png")
    torch.manual_seed(0)
    torch.jit.script(_Base()).save(str(d / "inception.pt"))
    return {k: str(d / k) for k in ("sd", "one", "two", "prompts.txt", "ref", "inception.pt")}


def test_a_text_student_streams_as_its_stock_pipeline_runs_it(t2i):
    """Sample i: prompt i % 3, the noise of seed i, its own re-noising generator; batches do not matter."""
    from diffusers import StableDiffusionPipeline

    from onestep.prompt_sources import renoise_generators

    pipe = StableDiffusionPipeline.from_pretrained(t2i["two"])
    src = pipeline_model(t2i["two"], 5, prompts=PROMPTS).source
    assert (src.steps, src.sample_shape, src.image_shape) == (2, (4, 8, 8), (3, 16, 16))
    idx = torch.arange(5)
    images = src(idx)
    assert torch.allclose(torch.cat([src(idx[:2]), src(idx[2:])]), images, atol=1e-5)  # batches: rounding only
    z = torch.stack([torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(sample_seed(0, i))) for i in range(5)])
    stock = pipe([PROMPTS[i % 3] for i in range(5)], latents=z, generator=renoise_generators(0, idx), output_type="pt",
                 timesteps=[999, 499], guidance_scale=1.0).images
    assert torch.allclose(images, stock * 2 - 1, atol=1e-5)
    assert src.labels(idx).tolist() == [0, 1, 2, 0, 1]


def test_the_one_step_teacher_and_its_one_step_export_make_the_same_images(t2i):
    """DDIM's one trailing step at t = 999 without guidance is the teacher's x0 there: the one-step student, whose
    export runs LCM's one step at 999 through the stock pipeline (VAE decode included)."""
    teacher = teacher_models(t2i["sd"], [1, 3], 4, prompts=PROMPTS)
    student = pipeline_model(t2i["one"], 4, prompts=PROMPTS)
    idx, images = torch.arange(4), student.source(torch.arange(4))

    def teacher_images(m):  # the VAE's decoded range; the stock pipeline's images are clamped (as quantising does)
        return m.source(idx).clamp(-1, 1)
    assert [m.nfe for m in teacher] == [1, 3] and student.nfe == 1
    assert torch.allclose(teacher_images(teacher[0]), images, atol=1e-4)
    assert not torch.allclose(teacher_images(teacher[1]), images, atol=1e-3)  # three steps move the images
    guided = teacher_models(t2i["sd"], [1], 4, guidance=3.0, prompts=PROMPTS)[0]
    assert guided.nfe == 2 and not torch.allclose(teacher_images(guided), images, atol=1e-3)


def test_benchmark_cli_scores_text_models_on_a_prompt_file(t2i, tmp_path, capsys):
    bench = runpy.run_path(os.path.join(ROOT, "eval", "benchmark.py"), run_name="benchmark")["main"]
    out = str(tmp_path / "b")
    bench(["--teacher", t2i["sd"], "--steps", "1", "--pipeline", t2i["one"], "--prompts", t2i["prompts.txt"],
           "--features", "inception", "--inception-weights", t2i["inception.pt"], "--reference", t2i["ref"],
           "--num-samples", "6", "--keep", "0", "--batch-size", "4", "--out", out])
    assert "| student (one) | 1 | 1 |" in capsys.readouterr().out
    info = json.load(open(os.path.join(out, "benchmark.json")))
    teacher, student = info["rows"]
    assert info["prompts"] == t2i["prompts.txt"] and info["guidance"] == 1.0
    assert teacher["fid"] > 0 and student["fid"] == pytest.approx(teacher["fid"], rel=1e-4)  # the same images


def test_text_models_without_prompts_or_prompts_without_them_are_one_line(t2i, tmp_path, capsys):
    bench = runpy.run_path(os.path.join(ROOT, "eval", "benchmark.py"), run_name="benchmark")["main"]
    common = ["--features", "inception", "--inception-weights", t2i["inception.pt"], "--reference", t2i["ref"],
              "--out", str(tmp_path / "x")]
    old = tmp_path / "old"  # an export from before onestep.json recorded its call
    os.symlink(t2i["one"], old)
    os.rename(os.path.join(t2i["one"], "onestep.json"), str(tmp_path / "call.json"))
    try:
        line = one_error_line(lambda: bench(["--pipeline", str(old), "--prompts", t2i["prompts.txt"], *common]), capsys)
    finally:
        os.rename(str(tmp_path / "call.json"), os.path.join(t2i["one"], "onestep.json"))
    assert "has no onestep.json" in line and "pipeline_call" in line and "model card" in line
    call = os.path.join(t2i["one"], "onestep.json")
    kept = open(call).read()
    try:
        with open(call, "w") as f:  # a hand-edited call: guidance costs two evaluations per step
            json.dump({"pipeline_call": {"num_inference_steps": 1, "guidance_scale": 7.5}}, f)
        assert pipeline_model(t2i["one"], 4, prompts=PROMPTS).nfe == 2
        capsys.readouterr()
        with open(call, "w") as f:
            json.dump({"pipeline_call": {"num_inference_steps": 1, "eta": 0.5}}, f)
        line = one_error_line(lambda: bench(["--pipeline", t2i["one"], "--prompts", t2i["prompts.txt"], *common]), capsys)
        assert "is not a call onestep exports" in line and "re-export" in line
    finally:
        with open(call, "w") as f:
            f.write(kept)
    for args, words in [
        (["--pipeline", t2i["one"]], ["text-to-image student", "--prompts FILE"]),
        (["--teacher", t2i["sd"], "--steps", "1"], ["is text-to-image", "--prompts FILE"]),
        (["--teacher", "assets/digits-teacher", "--steps", "1", "--prompts", t2i["prompts.txt"]],
         ["--prompts is for text-to-image", "drop --prompts"]),
        (["--pipeline", t2i["one"], "--prompts", t2i["ref"]], ["is a folder", "one prompt per line"]),
    ]:
        line = one_error_line(lambda: bench([*args, *common]), capsys)
        assert all(w in line for w in words), line
    for model in (["--teacher", t2i["sd"]], ["--pipeline", t2i["one"]]):  # digits features: refused before loading
        line = one_error_line(lambda: bench([*model, "--prompts", t2i["prompts.txt"], "--out", str(tmp_path / "x")]),
                              capsys)
        assert "is text-to-image (RGB images)" in line and "use --features inception" in line, line
    assert not os.path.exists(tmp_path / "x")
    with pytest.raises(SourceError, match="text-to-image student: pass prompts"):
        pipeline_model(t2i["one"], 4)
    from onestep.loading import TeacherError

    (tmp_path / "msd").mkdir()
    (tmp_path / "msd" / "multistudent.json").write_text("{}")
    with pytest.raises(TeacherError, match="is an exported one-step student"):  # the loader's own message
        teacher_models(str(tmp_path / "msd"), [1], 4, prompts=PROMPTS)
    # only the prompts the samples use are encoded: sample i of 2 uses prompt i
    assert teacher_models(t2i["sd"], [1], 2, prompts=PROMPTS)[0].source.prompts == PROMPTS[:2]
