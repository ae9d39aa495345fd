"""Broken teacher folders are refused with one TeacherError line naming the file (or key) and the fix, never a
traceback: onestep.json labels that do not fit the UNet, configs that are not JSON objects, scheduler keys of the
wrong type, weights that cannot be loaded (truncated, empty, misnamed, of other shapes), broken tokenizers, text
encoders and VAEs, and model_index.json entries that are not [library, class] pairs."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, run_distill, save_teacher
from test_sd import save_tiny_sd

from onestep.loading import TeacherError, load_teacher

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one thread (conftest.py)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    """The intact folders each case copies: a class-conditional teacher (11 class rows, 10 labels + null 10) and a
    tiny Stable Diffusion pipeline."""
    return {"cond": save_teacher(str(tmp_path_factory.mktemp("cond"))),
            "sd": save_tiny_sd(str(tmp_path_factory.mktemp("sd")))}


def write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def update_json(path: str, **changes) -> None:
    with open(path) as f:
        data = json.load(f)
    write(path, json.dumps({**data, **changes}))


def weights(folder: str) -> str:
    return os.path.join(folder, next(f for f in sorted(os.listdir(folder)) if f.endswith(".safetensors")))


def truncate(path: str) -> None:
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])


def copy(folders: dict, kind: str, tmp_path) -> str:
    return shutil.copytree(folders[kind], str(tmp_path / kind))


def refused(folder: str, pattern: str) -> str:
    with pytest.raises(TeacherError, match=pattern) as info:
        load_teacher(folder)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


ONESTEP_JSON = [  # (onestep.json text, what the one line says); the UNet has num_class_embeds 11
    ('{"num_classes": 50, "null_class": 10}', "50 classes and a null class do not fit"),
    ('{"num_classes": 12}', "12 classes do not fit"),
    ('{"num_classes": 10, "null_class": 30}', r"null_class must be null or an integer in 0\.\.10, got 30"),
    ('{"num_classes": 10, "null_class": -1}', r"null_class must be null or an integer in 0\.\.10, got -1"),
    ('{"num_classes": 10, "null_class": "10"}', r"null_class must be .* got '10'"),
    ('{"num_classes": -3}', "num_classes must be an integer >= 1, got -3"),
    ('{"num_classes": 0, "null_class": 10}', "num_classes must be an integer >= 1, got 0"),
    ('{"num_classes": "ten"}', "num_classes must be an integer >= 1, got 'ten'"),
    ('{"num_classes": true}', "num_classes must be an integer >= 1, got True"),
    ('{"num_classes": 10, "null_class": 5}', r"null_class 5 is one of the labels 0\.\.9"),
    ('{"null_class": 3}', r"null_class 3 is one of the labels 0\.\.9"),
    ("[1]", "holds a JSON list, not an object"),
    ("xx", "is not valid JSON"),
]


@pytest.mark.parametrize("text, message", ONESTEP_JSON, ids=[t for t, _ in ONESTEP_JSON])
def test_onestep_json_that_does_not_fit_the_unet_is_refused(folders, tmp_path, text, message):
    root = copy(folders, "cond", tmp_path)
    write(os.path.join(root, "onestep.json"), text)
    line = refused(root, re.escape(os.path.join(root, "onestep.json")) + ".*" + message)
    if text.startswith("{"):
        assert "num_class_embeds 11" in line and '"null_class": 10' in line  # says what fits


@pytest.mark.parametrize("text, expected", [
    ('{"num_classes": 10, "null_class": 10}', (10, 10)),
    ('{"num_classes": 5, "null_class": 10}', (5, 10)),
    ('{"num_classes": 11}', (11, None)),
    ('{"null_class": 10}', (10, 10)),
    ("{}", (11, None)),
])
def test_onestep_json_that_fits_is_read(folders, tmp_path, text, expected):
    root = copy(folders, "cond", tmp_path)
    write(os.path.join(root, "onestep.json"), text)
    t = load_teacher(root)
    assert (t.num_classes, t.null_class) == expected and t.denoiser.null_cond == expected[1]


CONFIGS = [  # (folder, file, corruption): a config that is not a JSON object is named
    ("cond", "unet/config.json", "xx"), ("cond", "unet/config.json", "[1]"),
    ("cond", "scheduler/scheduler_config.json", '{"num_train_timesteps": 1000'),
    ("cond", "scheduler/scheduler_config.json", '"DDPMScheduler"'),
    ("sd", "model_index.json", "xx"), ("sd", "model_index.json", "[1, 2]"),
    ("sd", "vae/config.json", ""), ("sd", "vae/config.json", "null"),
    ("sd", "text_encoder/config.json", "{,}"), ("sd", "text_encoder/config.json", "3"),
    ("sd", "tokenizer/tokenizer_config.json", "[]"),
]


@pytest.mark.parametrize("kind, rel, text", CONFIGS, ids=[f"{r}:{t}" for _, r, t in CONFIGS])
def test_a_config_that_is_not_a_json_object_is_named(folders, tmp_path, kind, rel, text):
    root = copy(folders, kind, tmp_path)
    write(os.path.join(root, rel), text)
    refused(root, re.escape(os.path.join(root, rel)) + " (is not valid JSON|holds a JSON)")


@pytest.mark.parametrize("key, value, message", [
    ("num_train_timesteps", 0, "num_train_timesteps must be an integer >= 1, got 0"),
    ("num_train_timesteps", -5, "num_train_timesteps must be an integer >= 1, got -5"),
    ("num_train_timesteps", "1000", "num_train_timesteps must be an integer >= 1, got '1000'"),
    ("beta_start", "0.0001", 'beta_start must be a number, got "0.0001"'),
    ("beta_end", None, "beta_end must be a number, got null"),
    ("beta_end", [0.02], r"beta_end must be a number, got \[0.02\]"),
])
def test_scheduler_keys_of_the_wrong_type_are_named(folders, tmp_path, key, value, message):
    root = copy(folders, "cond", tmp_path)
    update_json(os.path.join(root, "scheduler", "scheduler_config.json"), **{key: value})
    refused(root, re.escape(os.path.join(root, "scheduler", "scheduler_config.json")) + ": " + message)


def test_a_scheduler_config_read_otherwise_than_diffusers_would_is_refused(folders, tmp_path):
    root = copy(folders, "cond", tmp_path)  # EDM keys without a class: it would be read as DDPM
    path = os.path.join(root, "scheduler", "scheduler_config.json")
    with open(path) as f:
        cfg = {k: v for k, v in json.load(f).items() if k != "_class_name"}
    write(path, json.dumps({**cfg, "sigma_min": 0.002, "sigma_max": 80.0}))
    refused(root, "has EDM keys .* but no _class_name, so it would be read as a DDPM schedule")
    root = copy(folders, "sd", tmp_path / "sd")  # the pipeline's index names another scheduler class
    update_json(os.path.join(root, "scheduler", "scheduler_config.json"), _class_name="EulerDiscreteScheduler")
    refused(root, "model_index.json names the scheduler PNDMScheduler but .* is a EulerDiscreteScheduler; make them "
                  "agree")


@pytest.mark.parametrize("changes, message", [
    ({"_class_name": "EulerDiscreteScheduler", "timestep_type": "continuous", "prediction_type": "v_prediction"},
     r'timestep_type "continuous" conditions the UNet on 0.25 ln\(sigma\)'),
    ({"rescale_betas_zero_snr": True}, "zero terminal SNR .* with epsilon prediction has no x0 at the last timestep"),
])
def test_a_schedule_onestep_would_misread_is_refused(folders, tmp_path, changes, message):
    """Schedules that would load and then train on a misread teacher (continuous-time Euler conditioning) or on NaN
    (epsilon prediction at zero terminal SNR) are refused when the teacher loads; v prediction at zero SNR loads."""
    root = copy(folders, "cond", tmp_path)
    path = os.path.join(root, "scheduler", "scheduler_config.json")
    update_json(path, **changes)
    refused(root, re.escape(path) + ": " + message)
    update_json(path, prediction_type="v_prediction", timestep_type="discrete")
    teacher = load_teacher(root)
    x_t = torch.randn(2, 1, 8, 8)
    assert torch.isfinite(teacher.denoiser(x_t, torch.tensor([999, 500]), torch.tensor([1, 2]))).all()


@pytest.mark.parametrize("changes, message", [
    ({"out_channels": 2}, "takes 1 channels and predicts 2; .*no learned variance"),
    ({"num_class_embeds": None, "class_embed_type": "timestep"},
     "takes class embeddings of type 'timestep' without an embedding table"),
])
def test_a_unet_whose_inputs_or_outputs_onestep_cannot_feed_is_refused(folders, tmp_path, changes, message):
    root = copy(folders, "cond", tmp_path)
    update_json(os.path.join(root, "unet", "config.json"), **changes)
    refused(root, message)


def test_a_text_unet_with_class_labels_is_refused(folders, tmp_path):
    root = copy(folders, "sd", tmp_path)
    update_json(os.path.join(root, "unet", "config.json"), num_class_embeds=1000)
    refused(root, "takes class labels besides text")


def _rename(folder: str, name: str) -> None:
    os.rename(weights(folder), os.path.join(folder, name))


FIX = r"; re-save it with save_pretrained\(safe_serialization=True\) or fix that file$"
WEIGHTS = {  # case: (folder, corruption, what the one line says)
    "unet-truncated": ("cond", lambda r: truncate(weights(f"{r}/unet")),
                       r"cannot load unet from .*/unet \(SafetensorError: .*\)" + FIX),
    "unet-empty": ("cond", lambda r: write(weights(f"{r}/unet"), ""),
                   r"cannot load unet from .*/unet \(SafetensorError: .*\)" + FIX),
    "unet-misnamed": ("cond", lambda r: _rename(f"{r}/unet", "model.safetensors"),
                      r"/unet holds model.safetensors but no diffusion_pytorch_model.safetensors; rename"),
    "unet-other-shapes": ("cond", lambda r: update_json(f"{r}/unet/config.json", block_out_channels=[8, 32]),
                          r"cannot load unet from .*/unet \(ValueError: .*expected shape.*\)" + FIX),
    "unet-bad-config-value": ("cond", lambda r: update_json(f"{r}/unet/config.json", layers_per_block="one"),
                              r"cannot load unet from .*/unet \(TypeError: .*\)" + FIX),
    "vae-truncated": ("sd", lambda r: truncate(weights(f"{r}/vae")),
                      r"cannot load vae from .*/vae \(SafetensorError: .*\)" + FIX),
    "vae-misnamed": ("sd", lambda r: _rename(f"{r}/vae", "vae.safetensors"),
                     r"/vae holds vae.safetensors but no diffusion_pytorch_model.safetensors"),
    "vae-scaling-factor": ("sd", lambda r: update_json(f"{r}/vae/config.json", scaling_factor="big"),
                           r"cannot load vae from .*/vae \(ValueError: .*'big'\)" + FIX),
    "text-encoder-truncated": ("sd", lambda r: truncate(weights(f"{r}/text_encoder")),
                               r"cannot load text_encoder from .*/text_encoder \(SafetensorError: .*\)" + FIX),
    "text-encoder-empty": ("sd", lambda r: write(weights(f"{r}/text_encoder"), ""),
                           r"cannot load text_encoder from .*/text_encoder \(SafetensorError: .*\)" + FIX),
    "text-encoder-misnamed": ("sd", lambda r: _rename(f"{r}/text_encoder", "pytorch.safetensors"),
                              r"/text_encoder holds pytorch.safetensors but no model.safetensors"),
    "text-encoder-other-shapes": ("sd", lambda r: update_json(f"{r}/text_encoder/config.json", hidden_size=32),
                                  r"cannot load text_encoder from .*/text_encoder \(RuntimeError: the weights' "
                                  r"shapes do not fit its config.json\)" + FIX),
    "tokenizer-truncated": ("sd", lambda r: truncate(f"{r}/tokenizer/tokenizer.json"),
                            r"/tokenizer/tokenizer.json is not valid JSON"),
    "tokenizer-broken": ("sd", lambda r: write(f"{r}/tokenizer/tokenizer.json", '{"model": 3}'),
                         r"cannot load tokenizer from .*/tokenizer \(\w+: .*\)" + FIX),
    "tokenizer-no-vocabulary": ("sd", lambda r: os.remove(f"{r}/tokenizer/tokenizer.json"),
                                r"tokenizer in .*/tokenizer knows no words .* vocabulary files .* are missing"),
    "tokenizer-no-length": ("sd", lambda r: update_json(f"{r}/tokenizer/tokenizer_config.json", model_max_length=None),
                            r"has model_max_length \d+, not a length its text encoder takes \(max_position_embeddings "
                            r"\d+\); set \"model_max_length\": \d+ in .*/tokenizer/tokenizer_config.json$"),
    "tokenizer-too-long": ("sd", lambda r: update_json(f"{r}/tokenizer/tokenizer_config.json", model_max_length=4096),
                           r"has model_max_length 4096, not a length its text encoder takes"),
    "model-index-missing": ("sd", lambda r: os.remove(f"{r}/model_index.json"),
                            r"has no model_index.json; a text-to-image teacher is read as a diffusers pipeline folder"),
    "model-index-no-tokenizer": ("sd", lambda r: update_json(f"{r}/model_index.json", tokenizer=[None, None]),
                                 r"has no 'tokenizer' entry in its model_index.json"),
    "model-index-string": ("sd", lambda r: update_json(f"{r}/model_index.json", text_encoder="CLIPTextModel"),
                           r"model_index.json: entry 'text_encoder' is \"CLIPTextModel\", not a \[library, class\] "
                           r"pair"),
    "model-index-triple": ("sd", lambda r: update_json(f"{r}/model_index.json", vae=["diffusers", "A", "B"]),
                           r"model_index.json: entry 'vae' is .* not a \[library, class\] pair"),
}


@pytest.mark.parametrize("case", list(WEIGHTS))
def test_a_component_that_cannot_be_loaded_is_one_line(folders, tmp_path, case):
    kind, corrupt, message = WEIGHTS[case]
    root = copy(folders, kind, tmp_path)
    corrupt(root)
    line = refused(root, message)
    assert len(line) < 600, line


def test_a_broken_teacher_is_one_error_line_from_the_command(folders, tmp_path):
    """The trainer exits 2 with one stderr line; under accelerate launch (which adds its own report and exits 1) that
    line is the one error line."""
    root = copy(folders, "cond", tmp_path)
    truncate(weights(os.path.join(root, "unet")))
    args = ["--preset", "smoke", "--teacher", root, "--output_dir", str(tmp_path / "runs")]
    direct = subprocess.run([sys.executable, os.path.join(ROOT, "train", "distill.py"), *args], cwd=ROOT,
                            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1",
                                                                 "OMP_NUM_THREADS": "1"})
    launched = run_distill(args)
    for r in (direct, launched):
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert r.returncode != 0 and len(lines) == 1, r.stderr[-3000:]
        assert lines[0].startswith("error: teacher: cannot load unet from ") and "SafetensorError" in lines[0], lines
    assert direct.returncode == 2 and direct.stderr.strip() == lines[0], direct.stderr[-3000:]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.safetensors"))
