"""The main job as users run it: `accelerate launch train/distill.py ...` end to end, and bad input."""
import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import ROOT, run_distill, save_teacher
from safetensors.torch import load_file

from onestep.config import PRESETS, ConfigError, load_config

SMOKE = ["--preset", "smoke"]


def student_from_checkpoint(run_dir: str, step: int):
    """Rebuild the trained generator from the run's last accelerate checkpoint."""
    from onestep.loading import load_teacher

    with open(os.path.join(run_dir, "config.yaml")) as f:
        teacher = load_teacher(yaml.safe_load(f)["teacher"])  # the student's architecture and schedule
    state = load_file(os.path.join(run_dir, "checkpoints", f"step_{step:07d}", "model.safetensors"))
    backbone = teacher.denoiser.backbone
    backbone.load_state_dict({k.removeprefix("denoiser.backbone."): v for k, v in state.items()})
    from onestep.generator import Generator

    return Generator(teacher.denoiser)


@pytest.mark.slow
def test_smoke_run_exports_a_pipeline_that_reproduces_the_generator(cond_teacher, tmp_path):
    r = run_distill([*SMOKE, "--teacher", cond_teacher, "--output_dir", str(tmp_path), "--name", "run"])
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "run"
    for p in ("config.yaml", "metrics.json", "fid_curve.png", "pipeline/model_index.json", "pipeline/README.md",
              "samples/step_0000004.png", "checkpoints/step_0000004/onestep_manifest.json"):
        assert (run / p).exists(), p
    assert any((run / "logs").rglob("events.out.tfevents*"))
    m = json.loads((run / "metrics.json").read_text())
    assert m["method"] == "dmd2" and m["steps"] == 4 and m["student"]["nfe"] == 1
    assert m["teacher"]["fid"] > 0 and m["student"]["fid"] > 0 and 0 <= m["student"]["class_accuracy"] <= 1
    assert m["replica_weight_spread"] == 0.0

    from onestep.pipeline import OneStepPipeline

    pipe = OneStepPipeline.from_pretrained(str(run / "pipeline"))
    gen = student_from_checkpoint(str(run), 4)
    z, labels = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(3)), torch.tensor([0, 1, 2, 3, 9])
    out = pipe(class_labels=labels, latents=z, output_type="pt").images
    with torch.no_grad():
        ref = (gen.sample(z, labels).clamp(-1, 1) + 1) / 2
    assert torch.allclose(out, ref, atol=1e-6)
    with pytest.raises(ValueError, match="class labels"):
        pipe(class_labels=[10])

    code = ("import sys; from onestep.pipeline import OneStepPipeline; import torch; "
            f"p = OneStepPipeline.from_pretrained({str(run / 'pipeline')!r}); "
            "im = p(class_labels=[0, 7], generator=torch.Generator().manual_seed(0)).images; "
            "assert len(im) == 2 and im[0].size == (8, 8); "
            "from diffusers import DiffusionPipeline; "  # the stock loader, once onestep.pipeline is imported
            f"q = DiffusionPipeline.from_pretrained({str(run / 'pipeline')!r}); "
            "im2 = q(class_labels=[0, 7], generator=torch.Generator().manual_seed(0)).images; "
            "assert type(q) is OneStepPipeline and [i.tobytes() for i in im] == [i.tobytes() for i in im2]; print('ok')")
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(tmp_path))
    assert fresh.returncode == 0 and "ok" in fresh.stdout, fresh.stderr[-2000:]

    # digits-FID of the export through clean-fid's generator path (eval/digits_fid.py)
    ev = subprocess.run([sys.executable, os.path.join(ROOT, "eval", "digits_fid.py"), "--pipeline", str(run / "pipeline"),
                         "--num_samples", "100", "--json", str(tmp_path / "fid.json")], capture_output=True, text=True,
                        cwd=ROOT)
    assert ev.returncode == 0, ev.stderr[-2000:]
    row = json.loads((tmp_path / "fid.json").read_text())[0]
    assert row["nfe"] == 1 and row["fid"] > 0 and 0 <= row["class_accuracy"] <= 1 and "| student | 1 | 1 |" in ev.stdout


@pytest.mark.slow
def test_unconditional_student_runs_in_stock_ddim_pipeline(uncond_teacher, tmp_path):
    r = run_distill([*SMOKE, "--teacher", uncond_teacher, "--method", "dmd", "--output_dir", str(tmp_path),
                     "--name", "u", "--classifier", ""])
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "u"
    assert json.loads((run / "pipeline-ddim" / "model_index.json").read_text())["_class_name"] == "DDIMPipeline"
    code = ("import torch, numpy as np; from diffusers import DDIMPipeline; "
            f"p = DDIMPipeline.from_pretrained({str(run / 'pipeline-ddim')!r}); "
            "x = p(batch_size=3, num_inference_steps=1, generator=torch.Generator().manual_seed(0), output_type='np').images; "
            f"np.save({str(tmp_path / 'ddim.npy')!r}, x)")
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(tmp_path))
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    import numpy as np

    from onestep.pipeline import OneStepPipeline

    ours = OneStepPipeline.from_pretrained(str(run / "pipeline"))(
        batch_size=3, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert np.abs(np.load(tmp_path / "ddim.npy") - ours).max() < 1e-3


BAD_INPUTS = [
    (["--teacher", "/no/such/teacher"], "teacher path"),
    (["--method", "nope"], "unknown method"),
    (["--steps", "1.5"], "steps: expected an integer"),
    (["--classes", "3,12"], "classes: label 12 is out of range"),
    (["--config", "{yaml}"], "unknown config key 'not_a_key'"),
    (["--fake_score", "full"], "fake_score"),
    (["--attention", "xformers"], "xformers"),
    (["--real_guidance_scale", "abc"], "real_guidance_scale: expected a number"),
    (["--gan_t_max", "0"], "gan_t_max must be in (0, 1]"),
    (["--lr_scheduler", "step"], "lr_scheduler: 'step' is not one of"),
    (["--fake_score", "lora", "--lora_targets", "no_such_module"], "none of the LoRA target modules"),
    (["--optimizer", "sgd"], "optimizer: 'sgd' is not one of"),
    (["--offload_ema", "true", "--ema_decay", "0"], "offload_ema: this run keeps no EMA"),
    (["--shared_critic_pass", "true", "--fake_first", "true"], "cannot run with fake_first"),
    (["--method", "dmd", "--regression_weight", "0.25", "--generator_timesteps", "999,499"],
     "regression_weight: DMD1's regression pairs one-step outputs"),
    (["--method", "dmd", "--forget", "3"], "forget: method 'dmd' has no option 'forget' (an option of sfd)"),
    (["--overwrite", "--resume", "latest"], "overwrite: --overwrite replaces a run and --resume continues it"),
    (["--classifier", "/no/such/classifier"], "classifier: '/no/such/classifier' is not a folder"),
    (["--method", "gndm", "--group_size", "3"], "group_size: 3 does not divide --batch_size"),
    (["--teacher", "README.md"], "teacher path 'README.md' is a file"),
]


@pytest.mark.parametrize("args,message", BAD_INPUTS, ids=[a[0][0] for a in BAD_INPUTS])
def test_bad_input_gives_one_line_error(args, message, cond_teacher, tmp_path):
    yaml_file = tmp_path / "bad.yaml"
    yaml_file.write_text("steps: 3\nnot_a_key: 1\n")
    args = [a.replace("{yaml}", str(yaml_file)) for a in args]
    if "--teacher" not in args:
        args += ["--teacher", cond_teacher]
    cmd = [sys.executable, os.path.join(ROOT, "train", "distill.py"), *SMOKE, "--output_dir", str(tmp_path), *args]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr[-2000:]
    assert not (tmp_path / "smoke-dmd2" / "config.yaml").exists()


def test_a_failed_overwrite_leaves_the_old_run_in_place(cond_teacher, tmp_path):
    """--overwrite clears the old run only once everything has loaded: a classifier folder holding no classifier, an
    exported student as teacher, stop with one line and the old run's files as they were."""
    old = tmp_path / "smoke-dmd2"
    for f in ("config.yaml", "metrics.json", "checkpoints/step_0000004/model.safetensors", "pipeline/model_index.json"):
        (old / f).parent.mkdir(parents=True, exist_ok=True)
        (old / f).write_text(f)
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "config.json").write_text('{"not": "a model"}')
    (garbage / "diffusion_pytorch_model.safetensors").write_bytes(os.urandom(100))
    student = tmp_path / "student"
    student.mkdir()
    (student / "model_index.json").write_text('{"_class_name": "OneStepPipeline"}')
    for args, message in ((["--classifier", str(garbage)], "holds no readable digits classifier"),
                          (["--teacher", str(student)], "is an exported one-step student, not a multi-step teacher")):
        args = args if "--teacher" in args else [*args, "--teacher", cond_teacher]
        cmd = [sys.executable, os.path.join(ROOT, "train", "distill.py"), *SMOKE, "--output_dir", str(tmp_path),
               "--overwrite", *args]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 2 and len(lines) == 1 and message in lines[0], r.stderr[-2000:]
        assert sorted(str(p.relative_to(old)) for p in old.rglob("*") if p.is_file()) == [
            "checkpoints/step_0000004/model.safetensors", "config.yaml", "metrics.json", "pipeline/model_index.json"]
    from onestep.runs import clear_run_dir

    (old / "fid_curve.png").write_text("old curve")
    (old / "notes.txt").write_text("the user's own file")
    clear_run_dir(str(old))  # once everything has loaded: the old run's outputs go, metrics and curve too
    assert sorted(str(p.relative_to(old)) for p in old.rglob("*")) == ["checkpoints", "config.yaml", "notes.txt",
                                                                       "samples"]


def test_bad_input_under_accelerate_launch(tmp_path):
    r = run_distill(["--steps", "x", "--output_dir", str(tmp_path)])
    assert r.returncode != 0 and "error: steps: expected an integer, got 'x'" in r.stderr


def test_hub_teacher_offline_says_what_to_place_where(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "train", "distill.py"), *SMOKE, "--teacher", "google/ddpm-cifar10-32",
           "--output_dir", str(tmp_path), "--classifier", "", "--method", "dmd"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "huggingface-cli download google/ddpm-cifar10-32" in r.stderr


def test_an_unreachable_hub_fails_at_once_without_the_download_retries(tmp_path, monkeypatch):
    """Without HF_HUB_OFFLINE and without a network the hub is tried once (a connection to its endpoint) before the
    download, whose client would retry for tens of seconds: here a refused local port stands for the hub."""
    import huggingface_hub
    from huggingface_hub import constants

    from onestep.loading import TeacherError, resolve_teacher_path

    calls = []
    real = huggingface_hub.snapshot_download

    def recorded(*a, **k):
        calls.append(k.get("local_files_only"))
        return real(*a, **k)

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", recorded)
    with pytest.raises(TeacherError, match="could not get teacher 'someone/some-teacher' from the hub"):
        resolve_teacher_path("someone/some-teacher")
    assert False not in calls  # the local cache was looked at; no download was attempted


def test_hub_download_patterns_take_a_flat_pipeline_repo_and_a_pipelines_main_weights():
    """A hub teacher's download, filtered by huggingface_hub's own pattern matching over repo listings: a pipeline
    repo keeping its UNet and scheduler at the root (google/ddpm-cifar10-32's layout, which diffusers loads) gets
    them; a Stable Diffusion repo gets its components' main weights and configs, no fp16 / non-EMA / single-file
    copies and no safety checker."""
    from huggingface_hub.utils import filter_repo_objects

    from onestep.loading import hub_patterns

    def fetched(index, files):
        allow, ignore = hub_patterns(index)
        return set(filter_repo_objects(files, allow_patterns=allow, ignore_patterns=ignore))

    flat = ["README.md", "config.json", "diffusion_pytorch_model.bin", "diffusion_pytorch_model.safetensors",
            "model_index.json", "scheduler_config.json", "images/generated_image.png"]
    index = {"_class_name": "DDPMPipeline", "scheduler": ["diffusers", "DDPMScheduler"],
             "unet": ["diffusers", "UNet2DModel"]}
    assert fetched(index, flat) == {"config.json", "diffusion_pytorch_model.safetensors", "model_index.json",
                                    "scheduler_config.json"}
    assert fetched(None, flat) == {"config.json", "diffusion_pytorch_model.safetensors", "model_index.json",
                                   "scheduler_config.json"}  # a model repo: its JSON and safetensors
    sd = ["model_index.json", "v1-5-pruned.safetensors", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
          "unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.non_ema.safetensors",
          "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json",
          "text_encoder/model.safetensors", "tokenizer/vocab.json", "tokenizer/merges.txt",
          "scheduler/scheduler_config.json", "safety_checker/model.safetensors",
          "feature_extractor/preprocessor_config.json"]
    index = {k: ["diffusers", "X"] for k in ("unet", "vae", "text_encoder", "tokenizer", "scheduler",
                                             "safety_checker", "feature_extractor")}
    assert fetched(index, sd) == {"model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                                  "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
                                  "text_encoder/config.json", "text_encoder/model.safetensors",
                                  "tokenizer/vocab.json", "tokenizer/merges.txt", "scheduler/scheduler_config.json"}


def test_an_incomplete_hub_cache_is_not_taken_for_the_teacher(tmp_path, monkeypatch):
    """The local hub cache is used where it holds a whole teacher; one holding only what another load left there
    (the fp16 weights of `variant="fp16"`) is not: offline, that is the download instruction, not a load error."""
    from huggingface_hub import constants

    from onestep.loading import TeacherError, resolve_teacher_path

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-teacher"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = save_teacher(str(repo / "snapshots" / commit), conditional=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert os.path.samefile(resolve_teacher_path("someone/tiny-teacher"), snapshot)
    unet = os.path.join(snapshot, "unet")
    os.rename(os.path.join(unet, "diffusion_pytorch_model.safetensors"),
              os.path.join(unet, "diffusion_pytorch_model.fp16.safetensors"))
    with pytest.raises(TeacherError, match="huggingface-cli download someone/tiny-teacher"):
        resolve_teacher_path("someone/tiny-teacher")


def test_a_teacher_of_non_square_samples_is_refused(tmp_path):
    import json

    from onestep.loading import TeacherError, load_teacher

    folder = save_teacher(str(tmp_path / "t"))
    cfg_file = tmp_path / "t" / "unet" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**cfg, "sample_size": [8, 16]}))
    with pytest.raises(TeacherError, match=r"non-square samples \(sample_size \[8, 16\]\)"):
        load_teacher(folder)
    cfg_file.write_text(json.dumps({**cfg, "sample_size": [8, 8]}))
    assert load_teacher(folder).sample_shape == (1, 8, 8)


def test_existing_run_folder_is_not_overwritten(cond_teacher, tmp_path):
    run = tmp_path / "kept"
    run.mkdir()
    (run / "config.yaml").write_text("precious: true\n")
    cmd = [sys.executable, os.path.join(ROOT, "train", "distill.py"), *SMOKE, "--teacher", cond_teacher,
           "--output_dir", str(tmp_path), "--name", "kept"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "--overwrite" in r.stderr
    assert (run / "config.yaml").read_text() == "precious: true\n"


@pytest.mark.parametrize("flags, message", [
    (["--classes", "12"], "classes: label 12 is out of range"),  # found once the teacher is loaded
    (["--students", "2", "--student_channels", "8,16,16"], "student_channels: [8, 16, 16] has 3 levels"),  # multi-student
])
def test_overwrite_with_bad_input_replaces_nothing(cond_teacher, tmp_path, flags, message):
    run = tmp_path / "kept"
    old = {"config.yaml": "precious: true\n", "metrics.json": "{}", "checkpoints/step_0000004/onestep_manifest.json": "{}",
           "samples/step_0000004.png": "png", "pipeline/model_index.json": "{}", "student_0/config.yaml": "s: 0\n"}
    for name, text in old.items():
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text(text)
    cmd = [sys.executable, os.path.join(ROOT, "train", "distill.py"), *SMOKE, "--teacher", cond_teacher,
           "--output_dir", str(tmp_path), "--name", "kept", "--overwrite", *flags]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and message in lines[0], r.stderr[-2000:]
    assert {name: (run / name).read_text() for name in old} == old  # the run --overwrite would replace is intact


def test_help_lists_keys_presets_and_methods():
    """--help: every Config key and every method option, each with its default and the comment beside its
    declaration; a method built on another lists what it adds or changes, and what it refuses of the other's."""
    from onestep.config import Config
    from onestep.methods import METHODS, method_options

    r = subprocess.run([sys.executable, os.path.join(ROOT, "train", "distill.py"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "digits-dmd" in r.stdout
    keys = {ln.split()[0] for ln in r.stdout.splitlines() if ln.startswith("  --")}
    assert keys == {f"--{f.name}" for f in dataclasses.fields(Config)} - {"--method_args"}
    assert "  --steps 1200  training iterations" in r.stdout and "  --lr_generator 5e-05 [digits: 0.0001]  the gen" in r.stdout
    sections = dict(re.findall(r"\n (\w+): (.*?)(?=\n \w+: |\Z)", r.stdout.split("\nMethods (")[1], re.S))
    assert set(sections) == set(METHODS)
    assert "   --shared_critic_pass False  the critic turn's" in sections["dmd"]
    # an inherited option the method refuses is named (gndm runs its own generator turn)
    flat = {m: " ".join(text.split()) for m, text in sections.items()}  # wrapped lines joined
    assert "Takes dmd's options except shared_critic_pass;" in flat["gndm"] and "--group_size 4" in flat["gndm"]
    assert "--forget (required)" in flat["sfd"] and "Sets adam_beta1 0.0" in flat["sid"]
    assert all(f"--{k} " in sections["dmd"] for k in method_options("dmd"))


@pytest.mark.slow
def test_resume_latest_continues_from_the_newest_checkpoint(cond_teacher, tmp_path):
    """... and its metrics cover the whole run (the FID curve's earlier points, the training seconds before); its
    config.yaml is a new run's (no resume), and a resume as another kind of run (here: two students) is refused."""
    base = [sys.executable, os.path.join(ROOT, "train", "distill.py"), *SMOKE, "--teacher", cond_teacher,
            "--output_dir", str(tmp_path), "--name", "r", "--ema_decay", "0.9", "--eval_samples", "20",
            "--eval_every", "2", "--classifier", os.path.join(ROOT, "assets", "digits-classifier")]
    first = subprocess.run(base, cwd=ROOT, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-2000:]
    old = json.loads((tmp_path / "r" / "metrics.json").read_text())
    before = load_file(str(tmp_path / "r" / "checkpoints" / "step_0000004" / "model.safetensors"))
    second = subprocess.run([*base, "--resume", "latest", "--steps", "6"], cwd=ROOT, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "4/6" in second.stderr  # the progress bar starts at the checkpoint's step
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["steps"] == 6 and [p["step"] for p in metrics["curve"]] == [2, 4, 6]
    assert metrics["curve"][:2] == old["curve"] and metrics["train_seconds"] >= old["train_seconds"]
    after = load_file(str(tmp_path / "r" / "checkpoints" / "step_0000006" / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)  # training went on from there
    assert yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())["resume"] == ""
    done = tmp_path / "r" / "checkpoints" / "step_0000006"  # a finished run resumed: evaluated and exported again only
    files = {f: (done / f).read_bytes() for f in os.listdir(done)}
    third = subprocess.run([*base, "--resume", "latest", "--steps", "6"], cwd=ROOT, capture_output=True, text=True)
    assert third.returncode == 0, third.stderr[-2000:]
    assert {f: (done / f).read_bytes() for f in os.listdir(done)} == files  # the checkpoint is not written again
    assert [p["step"] for p in json.loads((tmp_path / "r" / "metrics.json").read_text())["curve"]] == [2, 4, 6]
    other = subprocess.run([*base, "--resume", "latest", "--steps", "8", "--students", "2"], cwd=ROOT,
                           capture_output=True, text=True)
    lines = [ln for ln in other.stderr.splitlines() if ln.strip()]
    assert other.returncode == 2 and len(lines) == 1 and "holds a run with students 1, this command has 2" in lines[0]
    import contextlib
    import io

    from onestep.runs import resolve_resume

    err = io.StringIO()  # a branch from an earlier checkpoint of this run: the later ones are named
    with contextlib.redirect_stderr(err):
        assert resolve_resume(str(tmp_path / "r"), str(tmp_path / "r" / "checkpoints" / "step_0000004")) is not None
    assert "also holds step_0000006, after step_0000004" in err.getvalue()


@pytest.mark.parametrize("check", ["host", "device"])
def test_non_finite_updates_are_skipped_then_stop_the_run(cond_teacher, tmp_path, check):
    """A teacher whose output is NaN makes every update non-finite: each is skipped (nothing written), and after
    max_nonfinite_steps in a row the run stops with one line naming the step and the loss terms (the smoke preset
    logs every step, so a device-side count is read there too)."""
    import shutil

    from safetensors.torch import save_file

    bad = tmp_path / "nan-teacher"
    shutil.copytree(cond_teacher, bad)
    weights = next((bad / "unet").glob("*.safetensors"))
    state = load_file(str(weights))
    state["conv_out.bias"] = torch.full_like(state["conv_out.bias"], float("nan"))
    save_file(state, str(weights))
    out = tmp_path / "runs"
    r = run_distill(["--preset", "smoke", "--teacher", str(bad), "--output_dir", str(out), "--steps", "6",
                     "--max_nonfinite_steps", "3", "--checkpoint_every", "0", "--nonfinite_check", check])
    assert r.returncode != 0, r.stderr[-2000:]  # 2 from the trainer; accelerate launch reports 1
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "was not finite" in err[0] and "step 2" in err[0] and "loss_" in err[0], r.stderr[-2000:]
    assert "No checkpoint was written" in err[0]  # (--checkpoint_every 0: nothing to resume from)
    assert not (out / "smoke-dmd2" / "checkpoints").exists() or not any((out / "smoke-dmd2" / "checkpoints").iterdir())
    assert not (out / "smoke-dmd2" / "metrics.json").exists()


def test_device_side_skip_check_trains_the_same_weights(cond_teacher, tmp_path):
    """--nonfinite_check device (no host read per update) and host give the same checkpoint when nothing is skipped:
    generator, fake score, GAN head, EMA and optimiser states."""
    states = {}
    for check in ("host", "device"):
        r = run_distill([*SMOKE, "--teacher", cond_teacher, "--output_dir", str(tmp_path), "--name", check, "--steps", "2",
                         "--ema_decay", "0.9", "--export", "false", "--nonfinite_check", check])
        assert r.returncode == 0, r.stderr[-2000:]
        ckpt = tmp_path / check / "checkpoints" / "step_0000002"
        states[check] = {f.name: load_file(str(f)) for f in ckpt.glob("*.safetensors")}
        for pattern in ("optimizer*.bin", "custom_checkpoint_*.pkl"):  # AdamW states; the EMA
            states[check].update({f.name: torch.load(f, weights_only=True) for f in ckpt.glob(pattern)})
    assert {"model.safetensors", "optimizer.bin", "custom_checkpoint_0.pkl"} <= states["host"].keys() == states["device"].keys()

    def flat(tree, out):
        if torch.is_tensor(tree):
            out.append(tree)
        elif isinstance(tree, dict):
            for v in tree.values():
                flat(v, out)
        elif isinstance(tree, (list, tuple)):
            for v in tree:
                flat(v, out)
        return out

    for name in states["host"]:
        a, b = flat(states["host"][name], []), flat(states["device"][name], [])
        assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b)), name


@pytest.mark.parametrize("flags", [["--method", "dmd2"], ["--method", "sid", "--fake_score", "lora"]],
                         ids=["dmd2-gan", "sid-lora"])
def test_gradient_checkpointing_runs_with_a_frozen_critic(cond_teacher, tmp_path, flags):
    """The smoke preset's DMD2 (GAN on real digits) and SiD on a LoRA fake score run their critic frozen with
    gradients to its input: with checkpointing the recomputations in the backward must see it as the forward did."""
    r = run_distill([*SMOKE, "--teacher", cond_teacher, "--output_dir", str(tmp_path), "--name", "run", "--steps", "2",
                     "--eval_every", "0", "--gradient_checkpointing", "true", *flags])
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"] == 2


@pytest.mark.parametrize("script, args, marker", [
    ("train_teacher.py", ["--steps", "2", "--batch_size", "8"], "unet/diffusion_pytorch_model.safetensors"),
    ("train_digits_classifier.py", ["--epochs", "1"], "diffusion_pytorch_model.safetensors"),
])
def test_asset_scripts_write_a_loadable_asset_and_never_replace_one_silently(script, args, marker, tmp_path):
    """The scripts that reproduce assets/: a fresh folder gets the asset; an existing one (by default the shipped
    asset) is refused in one line with nothing rewritten, unless --overwrite; a bad value stops before any work."""
    cmd = [sys.executable, os.path.join(ROOT, "train", script), "--out", str(tmp_path / "a")]
    r = subprocess.run(cmd + args, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    written = tmp_path / "a" / marker
    before = written.read_bytes()
    if script == "train_teacher.py":
        from onestep.loading import load_teacher

        assert load_teacher(str(tmp_path / "a")).num_classes == 10
    else:
        from onestep.fid import DigitsClassifier

        DigitsClassifier.from_pretrained(str(tmp_path / "a"))
    r = subprocess.run(cmd + args + ["--seed", "1"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: ") and "--overwrite" in r.stderr
    assert written.read_bytes() == before
    r = subprocess.run(cmd + args + ["--seed", "1", "--overwrite"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and written.read_bytes() != before
    bad = ["--steps", "0"] if script == "train_teacher.py" else ["--epochs", "0"]
    r = subprocess.run(cmd[:-1] + [str(tmp_path / "b")] + bad, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "must be > 0" in r.stderr and not (tmp_path / "b").exists()


SCRIPT_BAD_INPUTS = [
    ("train/train_teacher.py", ["--out", "", "--steps", "1"], "--out is empty; pass a folder"),
    ("train/train_teacher.py", ["--out", "README.md"], "--out 'README.md' is a file; pass a folder"),
    ("train/train_teacher.py", ["--out", "{tmp}/t", "--lr", "inf"], "--lr must be a finite number > 0"),
    ("train/train_digits_classifier.py", ["--out", "README.md"], "is a file; pass a folder"),
    ("eval/step_benchmark.py", ["--device", "gpu"], "--device: unknown device 'gpu'"),
    ("eval/step_benchmark.py", ["--peak-tflops", "nan"], "--peak-tflops must be a finite number > 0"),
    ("eval/step_benchmark.py", ["--out", "{tmp}/no/x.json"], "its folder does not exist"),
    ("eval/fid_speed.py", ["--device", "cpu", "--num-samples", "4", "--out", "{tmp}"], "is a folder; pass a file path"),
    ("eval/bench_streaming.py", ["--num-samples", "0"], "--num-samples must be >= 2"),
    ("eval/msd_benchmark.py", ["--rows", "k1", "--jobs", "0", "--out", "{tmp}/m"], "--steps and --jobs must be >= 1"),
    ("eval/gndm_benchmark.py", ["--seeds", "0,0", "--out", "{tmp}/g"], "--seeds: [0, 0] repeats a seed"),
    ("eval/disback_benchmark.py", ["--seeds", "0", "--jobs", "0", "--out", "{tmp}/d"], "--steps and --jobs must"),
    ("eval/disback_benchmark.py", ["--seeds", "0", "--update_ratio", "0", "--out", "{tmp}/d"],  # passed to the runs
     "update_ratio: must be >= 1"),
    ("eval/disback_benchmark.py", ["--seeds", "0", "--report_only", "--bogus", "3", "--out", "{tmp}/d"],
     "--bogus: unknown option"),
]


@pytest.mark.parametrize("script,args,message", SCRIPT_BAD_INPUTS,
                         ids=[f"{s.split('/')[1][:-3]}-{i}" for i, (s, _, _) in enumerate(SCRIPT_BAD_INPUTS)])
def test_the_other_scripts_refuse_bad_input_in_one_line_before_any_work(script, args, message, tmp_path):
    """The asset and benchmark scripts: one line, exit 2, nothing started (a --jobs 0 once waited forever)."""
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    r = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert not (tmp_path / "t" / "unet").exists() and not (tmp_path / "g" / "dmd2-s0").exists()


def test_prompt_files_that_cannot_be_read_say_so_in_one_line(tmp_path):
    from onestep.prompts import PromptError, read_prompts

    (tmp_path / "bin").write_bytes(b"\xff\xfe\x00\x81 not text")
    (tmp_path / "blank").write_text("\n  \n")
    (tmp_path / "ok").write_text("a cat\n\n  a dog  \n")
    for path, message in (("bin", "cannot be read as UTF-8 text (UnicodeDecodeError)"), ("blank", "holds no prompts"),
                          (".", "is a folder"), ("none", "does not exist")):
        with pytest.raises(PromptError, match=re.escape(message)):
            read_prompts(str(tmp_path / path))
    assert read_prompts(str(tmp_path / "ok")) == ["a cat", "a dog"]
    (tmp_path / "bom").write_bytes(b"\xef\xbb\xbfa cat\n")  # saved by an editor that writes a byte-order mark
    assert read_prompts(str(tmp_path / "bom")) == ["a cat"]


@pytest.mark.parametrize("preset", list(PRESETS))
def test_a_runs_own_config_yaml_loads_back_to_the_same_config(preset, tmp_path):
    """config.yaml lists every key, the unused ones too: reloaded as --config it gives the run's config again; a
    file that changes an option the run would ignore is refused like the same option on the command line."""
    cfg = load_config(["--preset", preset])
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    assert dataclasses.asdict(load_config(["--config", str(path)])) == dataclasses.asdict(cfg)
    if cfg.fake_score != "lora":
        path.write_text(yaml.safe_dump({**dataclasses.asdict(cfg), "lora_rank": cfg.lora_rank + 1}, sort_keys=False))
        with pytest.raises(ConfigError, match=r"lora_rank: only used with --fake_score lora, which this run does not "
                                              r"have; drop it \(from config file '.*config.yaml'\) or add that"):
            load_config(["--config", str(path)])


@pytest.mark.parametrize("values", [{"method": "dmd", "regression_steps": 10},
                                    {"method": "dmd", "method_args": {"regression_steps": 10}}])
def test_a_config_files_method_option_that_the_run_ignores_is_refused(values, tmp_path):
    """A method option in a config file, top level or under method_args, counts as given like one on the command
    line; the same key at the preset's own value (a run's config.yaml) does not."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(values))
    with pytest.raises(ConfigError, match="regression_steps: only used with --regression_weight > 0"):
        load_config(["--config", str(path)])
    cfg = load_config(["--preset", "sd15-dmd2"])
    assert cfg.method_args["gan_critic_weight"] == 0.0
    path.write_text(yaml.safe_dump({"preset": "sd15-dmd2", "method_args": {"gan_critic_weight": 0.0}}))
    assert load_config(["--config", str(path)]).method_args == cfg.method_args


def test_help_shows_the_default_runs_values_from_any_folder(tmp_path):
    """`--help` shows each key's Config default and, where the digits preset (the no-argument run) sets it, that
    value; likewise the default method's options; it needs no file from the current folder."""
    from onestep.config import Config
    from onestep.usage import _show

    r = subprocess.run([sys.executable, os.path.join(ROOT, "train", "distill.py"), "--help"], capture_output=True,
                       text=True, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    preset, default = PRESETS["digits"], Config()
    for key, value in preset.items():
        if key != "method_args":
            assert f"  --{key} {_show(getattr(default, key))} [digits: {_show(value)}]" in r.stdout, key
    section = r.stdout.split(f"\n {preset.get('method', default.method)}: ")[1]
    assert all(f"[digits: {_show(v)}]" in next(ln for ln in section.splitlines() if ln.startswith(f"   --{k} "))
               for k, v in preset["method_args"].items())


def test_only_the_first_process_reports_bad_input_and_ctrl_c_is_one_line(monkeypatch, capsys):
    """Every process of a launch stops on the same bad input (exit 2); rank 0 alone says so. Ctrl-C: one line, 130."""
    from onestep.cli import run_script
    from onestep.config import ConfigError

    def bad(args):
        raise ConfigError("steps: bad")

    def interrupted(args):
        raise KeyboardInterrupt

    for rank, lines in (("1", []), ("0", ["error: steps: bad"])):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as e:
            run_script(bad, [])
        assert e.value.code == 2 and capsys.readouterr().err.splitlines() == lines

    def unreadable(args):  # an error in this process's own share of the work: every process reports its own
        from onestep.streaming import SourceError

        err = SourceError("cannot read image 'x.png'")
        err.local = True
        raise err

    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit):
        run_script(unreadable, [])
    assert capsys.readouterr().err.splitlines() == ["error: (process 1) cannot read image 'x.png'"]
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as e:
        run_script(interrupted, [])
    err = capsys.readouterr().err.splitlines()
    assert e.value.code == 130 and len(err) == 1 and "--resume latest" in err[0]


@pytest.mark.parametrize("text, extra, message", [
    ("steps: 4\nsteps: 6\n", [], "key 'steps' is given twice (line 2)"),
    ("method_args:\n  update_ratio: 2\nmethod_args:\n  update_ratio: 4\n", [], "key 'method_args' is given twice"),
    ("mixed_precision: no\n", [], "mixed_precision: got the YAML boolean False"),
    ("steps: 4\n\tbatch_size: 8\n", [], "(line 2, column 1)"),
    ("preset: smoke\n", ["--preset", "digits-dmd"], "names preset 'smoke' and the command line 'digits-dmd'"),
    ("lr_warmup_steps: 2\n", [], "the constant schedule takes no warm-up"),
    ("update_ratio: 2\nmethod_args:\n  update_ratio: 4\n", [], "2 as an option and 4 under method_args; keep one"),
], ids=["duplicate", "duplicate-block", "yaml-boolean", "tab", "two-presets", "warmup-unused", "top-and-nested"])
def test_config_file_mistakes_are_one_line(tmp_path, text, extra, message):
    from onestep.config import ConfigError, load_config

    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(["--config", str(tmp_path / "c.yaml"), *extra])
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    (tmp_path / "ok.yaml").write_text("preset: smoke\nmixed_precision: 'no'\nlr_scheduler: constant_with_warmup\n"
                                      "lr_warmup_steps: 2\nupdate_ratio: 3\nmethod_args:\n  update_ratio: 3\n")
    with pytest.raises(ConfigError, match="under method_args; keep one"):  # on the command line too
        load_config(["--update_ratio", "2", "--method_args", "{update_ratio: 4}"])
    same = load_config(["--config", str(tmp_path / "ok.yaml"), "--method", "sfd", "--fake_forget_coef", "0.001",
                        "--method_args", "{fake_forget_coef: 1e-3, forget: [3]}", "--forget", "3"])  # the same values
    assert same.method_args["fake_forget_coef"] == 0.001 and same.method_args["forget"] == [3]
    prompts = load_config(["--method", "sfd", "--forget", '["a red car, at night", "style: watercolor"]',
                           "--override", "yes, a cat"])  # list items kept as written (commas: a YAML list)
    assert prompts.method_args["forget"] == ["a red car, at night", "style: watercolor"]
    assert prompts.method_args["override"] == ["yes", "a cat"]
    weights = load_config(["--method", "gndm", "--rewards", "classifier", "--reward_weights", "1e-3",
                           "--method_args", "{reward_weights: [1e-3]}"])  # 1e-3 is a number in YAML lists too
    assert weights.method_args["reward_weights"] == [0.001]
    with pytest.raises(ConfigError, match="method: unknown method 'nosuch'; choose one of"):
        load_config(["--method", "nosuch", "--update_ratio", "2"])
    cfg = load_config(["--config", str(tmp_path / "ok.yaml"), "--preset", "smoke"])  # the same value twice: fine
    assert (cfg.preset, cfg.mixed_precision, cfg.lr_warmup_steps, cfg.method_args["update_ratio"]) == \
        ("smoke", "no", 2, 3)


def test_every_logging_step_logs_the_generators_newest_losses_and_the_learning_rates(cond_teacher, tmp_path):
    """Generator updates every 3rd iteration (0, 3), logging every 2nd (after 2 and 4): both logging steps show the
    generator's terms (its newest values), with both learning rates."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cmd = [sys.executable, os.path.join(ROOT, "train", "distill.py"), *SMOKE, "--teacher", cond_teacher, "--update_ratio",
           "3", "--log_every", "2", "--checkpoint_every", "0", "--teacher_eval_steps", "[]", "--output_dir", str(tmp_path),
           "--name", "tb"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    events = EventAccumulator(str(tmp_path / "tb" / "logs" / "onestep")).Reload()
    steps = {tag: [e.step for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert steps["loss_dm"] == steps["loss_fake"] == steps["lr_generator"] == steps["lr_fake"] == [2, 4]
    assert steps["fid"] == steps["class_accuracy"] == [4]


def test_another_method_drops_the_presets_method_options_and_says_which(capsys):
    """A preset's method options belong to its method: --method X starts from X's defaults, and the options X has
    too (which a user might expect to carry over) are named in a note printed once the run starts; options given
    again are kept, not named; bad input found after the configuration still ends in its one line."""
    from onestep.config import print_notes

    cfg = load_config(["--preset", "sd15-dmd2", "--method", "vsd", "--update_ratio", "2"])
    assert cfg.method_args == {"update_ratio": 2} and capsys.readouterr().err == ""
    print_notes(cfg)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("note: method vsd") and "real_guidance_scale 1.75" in err[0]
    assert "update_ratio" not in err[0]
    print_notes(load_config(["--preset", "sd15-dmd2"]))
    assert capsys.readouterr().err == ""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train", "distill.py"), "--method", "sid", "--teacher",
                        "/nonexistent/teacher"], cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_script_help_shows_the_docstring_whole_and_each_default_once():
    """The scripts' shared Parser: the docstring as written (examples keep their lines), every option with a default
    says it (0 too, also without help text), once where the help states it already, never an empty one."""
    from onestep.cli import Parser

    p = Parser(description="Title.\n\n    python x.py --a 1   # an example\nText.")
    p.add_argument("--a", type=int, default=0)
    p.add_argument("--b", default="x", help="b things (default: x, as the paper)")
    p.add_argument("--c", default="", help="c things")
    p.add_argument("--d", action="store_true", help="d")
    text = " ".join(p.format_help().split("options:")[1].split())
    assert "\n    python x.py --a 1   # an example\n" in p.format_help()
    assert "--a A (default: 0)" in text and text.count("default") == 2 and "c things --d" in text


def test_a_config_files_method_options_belong_to_the_method_it_names(tmp_path, capsys):
    """A run's config.yaml (method dmd2 and its options) with --method sid: the file's dmd2 options are left out as
    a preset's are, in one note; a file that names no method gives its options to the command line's --method;
    integers read 1e3 on the command line as a file does."""
    from onestep.config import print_notes

    run = tmp_path / "config.yaml"
    run.write_text(yaml.safe_dump(dataclasses.asdict(load_config([]))))
    cfg = load_config(["--config", str(run), "--method", "sid", "--steps", "1e3"])
    assert cfg.method == "sid" and cfg.method_args == {} and cfg.steps == 1000
    print_notes(cfg)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("note: method sid starts from its own option defaults, not from")
    assert "t_min 0.001" in err[0] and f"config file {str(run)!r} for dmd2" in err[0]
    plain = tmp_path / "plain.yaml"
    plain.write_text("alpha: 1.0\n")
    assert load_config(["--config", str(plain), "--method", "sid"]).method_args == {"alpha": 1.0}
    assert load_config(["--config", str(run)]).method_args == load_config([]).method_args
