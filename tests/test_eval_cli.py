"""eval/benchmark.py as users run it: table + JSON + plot, reusable reference, 2 processes, bad input."""
import json
import os
import runpy
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, launch_cmd

BENCH = os.path.join(ROOT, "eval", "benchmark.py")


@pytest.fixture(scope="module")
def bench():
    return runpy.run_path(BENCH, run_name="benchmark")["main"]


@pytest.fixture(scope="module")
def student(cond_teacher, tmp_path_factory) -> str:
    """An exported OneStepPipeline whose student is the tiny teacher evaluated once."""
    from onestep.generator import Generator
    from onestep.loading import load_teacher
    from onestep.pipeline import export_pipeline

    t = load_teacher(cond_teacher)
    out = str(tmp_path_factory.mktemp("student") / "pipeline")
    export_pipeline(Generator(t.denoiser), t.scheduler_config, out, num_classes=t.num_classes, null_class=t.null_class)
    return out


def test_benchmark_writes_table_json_plot_and_a_reusable_reference(bench, cond_teacher, student, tmp_path, capsys):
    out = str(tmp_path / "b")
    bench(["--teacher", cond_teacher, "--steps", "1,2", "--pipeline", student, "--num-samples", "40", "--out", out])
    stdout = capsys.readouterr().out
    assert "| model | steps | NFE | FID | KID | precision | recall |" in stdout and "| student (student0) | 1 | 1 |" in stdout
    rows = json.load(open(os.path.join(out, "benchmark.json")))["rows"]
    assert [(r["model"], r["steps"], r["nfe"]) for r in rows] == [("teacher", 1, 1), ("teacher", 2, 2), ("student", 1, 1)]
    for r in rows:
        assert r["fid"] > 0 and 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1 and r["seconds_per_image"] > 0
        assert 0 <= r["class_accuracy"] <= 1 and 0 < r["coverage_entropy"] <= 1 and len(r["per_class_accuracy"]) == 10
    # the 1-step teacher and the student are the same network on the same noise
    assert rows[0]["fid"] == pytest.approx(rows[2]["fid"], rel=1e-6)
    assert os.path.getsize(os.path.join(out, "benchmark.png")) > 0
    assert open(os.path.join(out, "benchmark.md")).read().count("\n") == 5
    again = str(tmp_path / "again")
    bench(["--pipeline", student, "--num-samples", "40", "--reference", os.path.join(out, "reference.npz"), "--out", again])
    assert json.load(open(os.path.join(again, "benchmark.json")))["rows"][0]["fid"] == pytest.approx(rows[2]["fid"], rel=1e-9)


def test_an_edm_teacher_is_sampled_at_every_step_count(bench, tmp_path, capsys):
    """EDM teachers sample through EDMEulerScheduler: one step is the one-step student at sigma_max on the same noise
    (to float32 rounding of x at sigma 80), more steps run."""
    from conftest import tiny_unet
    from diffusers import EDMEulerScheduler

    from onestep.generator import Generator
    from onestep.loading import load_teacher
    from onestep.pipeline import export_pipeline

    teacher = str(tmp_path / "edm")
    tiny_unet().save_pretrained(os.path.join(teacher, "unet"))
    EDMEulerScheduler().save_pretrained(os.path.join(teacher, "scheduler"))
    with open(os.path.join(teacher, "onestep.json"), "w") as f:
        json.dump({"num_classes": 10, "null_class": 10}, f)
    t = load_teacher(teacher)
    student = str(tmp_path / "student")
    export_pipeline(Generator(t.denoiser), t.scheduler_config, student, num_classes=t.num_classes, null_class=t.null_class)
    bench(["--teacher", teacher, "--steps", "1,3", "--pipeline", student, "--num-samples", "40", "--out", str(tmp_path / "b")])
    rows = json.load(open(tmp_path / "b" / "benchmark.json"))["rows"]
    assert [(r["model"], r["steps"]) for r in rows] == [("teacher", 1), ("teacher", 3), ("student", 1)]
    assert rows[0]["fid"] == pytest.approx(rows[2]["fid"], rel=1e-3) and rows[1]["fid"] != rows[0]["fid"]


def test_a_folder_of_generated_images_is_scored_as_it_is(bench, tmp_path, capsys):
    """--images: every image of the folder, read as the features take them; the 1797 digits against their own
    statistics score 0; no NFE or sampling time (and no plot point); images of another size are refused first."""
    from PIL import Image

    from onestep.data import load_digits
    from onestep.streaming import to_uint8_levels

    x, _ = load_digits("all")
    for name, images in (("digits", x), ("big", torch.nn.functional.interpolate(x[:5], size=16))):
        (tmp_path / name).mkdir()
        for i, im in enumerate(to_uint8_levels(images)[:, 0].to(torch.uint8).numpy()):
            Image.fromarray(im, mode="L").save(tmp_path / name / f"{i:05d}.png")
    bench(["--images", str(tmp_path / "digits"), "--keep", "0", "--out", str(tmp_path / "b")])
    row = json.load(open(tmp_path / "b" / "benchmark.json"))["rows"][0]
    assert row["model"] == "images" and row["num_samples"] == 1797 and row["fid"] == pytest.approx(0, abs=1e-6)
    assert row["nfe"] is None and row["steps"] is None and row["seconds_per_image"] is None
    assert "| images (digits) | — | — | 0.000 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench(["--images", str(tmp_path / "big"), "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert "its first image, 00000.png, is (1, 16, 16)" in err and not (tmp_path / "c").exists()


def test_two_processes_give_the_one_process_result(bench, student, tmp_path):
    bench(["--pipeline", student, "--num-samples", "41", "--keep", "30", "--out", str(tmp_path / "one")])
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([*launch_cmd("--multi_gpu", "--num_processes", "2"), BENCH, "--pipeline", student, "--num-samples", "41", "--keep", "30",
                        "--threads", "1", "--out", str(tmp_path / "two")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.load(open(tmp_path / "two" / "benchmark.json"))["threads"] == 1
    one, two = (json.load(open(tmp_path / d / "benchmark.json"))["rows"][0] for d in ("one", "two"))
    assert two["num_samples"] == one["num_samples"] == 41
    for key in ("fid", "kid", "precision", "recall", "class_accuracy", "coverage_entropy"):
        assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("args, message", [
    (["--teacher", "assets/digits-teacher", "--steps", "1,two"], "--steps must be a comma-separated list"),
    (["--teacher", "assets/digits-teacher", "--steps", "0"], "--steps must be"),
    (["--pipeline", "no/such/pipeline"], "pipeline folder 'no/such/pipeline' does not exist"),
    (["--teacher", "/no/such/teacher"], "teacher path '/no/such/teacher' does not exist"),
    (["--pipeline", "assets/digits-teacher"], "not an exported OneStepPipeline"),
    (["--teacher", "assets/digits-teacher", "--reference", "digits:val"], "digits split is all, train or test"),
    (["--teacher", "assets/digits-teacher", "--reference", "no/such/folder"], "image folder 'no/such/folder' does not"),
    (["--teacher", "assets/digits-teacher", "--features", "inception", "--inception-weights", "/no/inception.pt"],
     "/no/inception.pt does not exist"),
    (["--num-samples", "1"], "--num-samples must be >= 2"),
    (["--threads", "-1"], "--threads >= 0 (0: torch's default)"),
    (["--teacher", "assets/digits-teacher", "--keep", "3"], "need more than 3 features of each model"),
    (["--teacher", "assets/digits-teacher", "--num-samples", "3"], "raise both above 3, or --keep 0"),
    (["--teacher", "assets/digits-teacher", "--reference", "cleanfid:cifar10:32"], "clean-fid's statistics are Inception"),
    (["--teacher", "assets/digits-teacher", "--guidance", "nan"], "--guidance must be a finite number >= 0"),
    (["--teacher", "assets/digits-teacher", "--mode", "legacy_pytorch"], "--mode is the clean-fid mode of the Inception"),
    (["--teacher", "assets/digits-teacher", "--seed", "-1"], "--seed must be in 0..4294967295"),
    (["--pipeline", "README.md"], "pipeline folder 'README.md' is a file"),
    (["--frobnicate"], "unrecognized arguments"),
])
def test_bad_input_is_one_error_line_and_exit_2(bench, args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        bench([*args, "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_help_names_the_outputs_and_options():
    r = subprocess.run([sys.executable, BENCH, "--help"], cwd=ROOT, capture_output=True, text=True)
    for word in ("--teacher", "--pipeline", "--steps", "--inception-weights", "--reference", "benchmark.md",
                 "benchmark.json", "benchmark.png", "cleanfid:NAME"):
        assert word in r.stdout, word


def test_fid_speed_times_the_stream_and_refuses_bad_counts(tmp_path):
    """eval/fid_speed.py end to end on the CPU at a tiny size: the stand-in Inception, a JSON of the times."""
    script, out = os.path.join(ROOT, "eval", "fid_speed.py"), tmp_path / "speed.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, script, "--num-samples", "4", "--batch-size", "2", "--device", "cpu",
                        "--layouts", "nchw,nhwc", "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    figures = json.loads(out.read_text())
    for layout in ("NCHW", "NHWC"):  # channels-last features: the same samples, the same statistics up to rounding
        row = figures[f"end to end, eager generator, {layout} features"]
        assert row["samples"] == 4 and row["seconds"] >= row["sampling_seconds"] > 0
    assert 0 <= figures["fid_between_variants_max"] < 1e-3 and figures["fid_from_moments_seconds"] > 0
    r = subprocess.run([sys.executable, script, "--num-samples", "0"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: --num-samples")
    r = subprocess.run([sys.executable, script], cwd=ROOT, env=env, capture_output=True, text=True)  # no GPU, no --device
    assert r.returncode == 2 and r.stderr.startswith("error: no CUDA device") and "--device cpu" in r.stderr


def script_main(name: str):
    return runpy.run_path(os.path.join(ROOT, "eval", name), run_name=name[:-3])["main"]


def one_error_line(call, capsys) -> str:
    """Run `call`; it must stop with exit status 2 and one stderr line `error: ...`; returns that line."""
    with pytest.raises(SystemExit) as e:
        call()
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.fixture(scope="module")
def odd(cond_teacher, student, tmp_path_factory) -> dict:
    """Inputs the user test found: teachers the digits features cannot take (3x16x16, 2 channels) and an export of
    one, a run folder, a multi-student export, broken references, a file."""
    import numpy as np
    from conftest import tiny_unet
    from diffusers import DDPMScheduler
    from PIL import Image

    from onestep.features import digits_extractor
    from onestep.generator import Generator
    from onestep.loading import load_teacher
    from onestep.multistudent import Router
    from onestep.pipeline import export_pipeline
    from onestep.pipeline_multi import export_multi_pipeline

    d = tmp_path_factory.mktemp("odd")
    paths = {"run": str(os.path.dirname(student) if os.path.basename(student) == "pipeline" else student)}
    for name, channels, size in (("rgb16", 3, 16), ("two", 2, 8)):
        tiny_unet(11, channels, size).save_pretrained(str(d / name / "unet"))
        DDPMScheduler(num_train_timesteps=1000, clip_sample=False).save_pretrained(str(d / name / "scheduler"))
        (d / name / "onestep.json").write_text(json.dumps({"num_classes": 10, "null_class": 10}))
        paths[name] = str(d / name)
    t = load_teacher(paths["rgb16"])
    paths["rgb16_export"] = str(d / "rgb16-run" / "pipeline")
    export_pipeline(Generator(t.denoiser), t.scheduler_config, paths["rgb16_export"], num_classes=10, null_class=10)
    c = load_teacher(cond_teacher)
    paths["multi"] = export_multi_pipeline([Generator(c.denoiser)] * 2, Router("balanced", [[0, 1, 2, 3, 4],
                                           [5, 6, 7, 8, 9]]), c.scheduler_config, str(d / "multi"), num_classes=10,
                                           null_class=10)
    rng = np.random.default_rng(0)
    for name, n, size in (("three", 3, 8), ("big", 5, 16), ("trunc", 5, 8)):
        (d / name).mkdir()
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(d / name / f"{i}.png")
    png = (d / "trunc" / "2.png").read_bytes()
    (d / "trunc" / "2.png").write_bytes(png[:len(png) // 2])
    (d / "empty.npz").write_bytes(b"")
    meta = np.array(json.dumps(digits_extractor("assets/digits-classifier").meta))
    np.savez(d / "listmeta.npz", mu=np.zeros(64), sigma=np.eye(64), meta=np.array(json.dumps([1, 2])))
    np.savez(d / "dim.npz", mu=np.zeros(10), sigma=np.eye(10), meta=meta)
    (d / "file").write_text("not a folder")
    return {**paths, **{k: str(d / k) for k in ("three", "big", "trunc", "file")},
            **{k: str(d / f"{k}.npz") for k in ("empty", "listmeta", "dim")}, "student": student, "d": str(d)}


def fill(args, odd):
    return [a.format(**odd) for a in args]


BENCH_BAD = [  # the user test's findings: each refused in one line before any sampling
    (["--teacher", "{rgb16}", "--steps", "1"], ["digits features take 1x8x8", "(3, 16, 16)", "--features inception"]),
    (["--pipeline", "{rgb16_export}"], ["digits features take 1x8x8", "(3, 16, 16)", "--features inception"]),
    (["--teacher", "{two}", "--steps", "1"], ["2-channel images", "grey (1) or RGB (3)"]),
    (["--teacher", "assets/digits-teacher", "--steps", "1,5000"], ["--steps 5000", "at most 1000 steps"]),
    (["--teacher", "assets/digits-teacher", "--out", "{file}/sub"], ["--out", "cannot be created", "another folder"]),
    (["--teacher", "assets/digits-teacher", "--reference", "{empty}"], ["empty file", "recompute"]),
    (["--teacher", "assets/digits-teacher", "--reference", "{listmeta}"], ["metadata is a JSON list", "recompute"]),
    (["--teacher", "assets/digits-teacher", "--reference", "{dim}"], ["10-d statistics", "64-d", "recompute"]),
    (["--teacher", "assets/digits-teacher", "--num-samples", "1000000000000"], ["100,000,000", "smaller"]),
    (["--teacher", "assets/digits-teacher", "--classifier", "assets/digits-teacher"], ["without a config.json",
                                                                                       "assets/digits-classifier"]),
    (["--teacher", "assets/digits-teacher", "--classifier", "{file}"], ["is a file", "assets/digits-classifier"]),
    (["--teacher", "assets/digits-teacher", "--reference", "{file}"], ["is a file but not statistics", "image folder"]),
    (["--teacher", "assets/digits-teacher", "--features", "inception", "--inception-weights", "{d}"],
     ["is a folder", "weights file"]),
    (["--pipeline", "{student}", "--reference", "{trunc}"], ["2.png", "truncated", "replace that file"]),
    (["--pipeline", "{student}", "--reference", "{three}"], ["reference has 3", "larger reference", "--keep 0"]),
    (["--pipeline", "{student}", "--reference", "{big}"], ["digits features take 1x8x8", "0.png", "(1, 16, 16)"]),
    (["--pipeline", "{student}", "--guidance", "2"], ["--guidance sets the teachers' sampler", "--teacher"]),
    (["--pipeline", "{student}", "--steps", "2"], ["--steps sets the teachers' sampler", "--teacher"]),
    (["--pipeline", "{student}", "--inception-weights", "x.pt"], ["--inception-weights", "--features inception"]),
    (["--reference", "{dim}"], ["nothing to score", "--pipeline, --teacher or --images"]),
    (["--pipeline", "{run}"], ["run folder", "{student}"]),
]


@pytest.mark.parametrize("args, words", BENCH_BAD, ids=range(len(BENCH_BAD)))
def test_the_user_tests_findings_are_one_line_before_sampling(bench, odd, args, words, tmp_path, capsys, monkeypatch):
    import onestep.streaming as streaming

    def no_sampling(*a, **k):
        raise AssertionError("sampled before refusing")

    monkeypatch.setattr(streaming.GeneratorSource, "__call__", no_sampling)
    line = one_error_line(lambda: bench(["--out", str(tmp_path / "out"), *fill(args, odd)]), capsys)
    for word in fill(words, odd):
        assert word in line, (word, line)
    assert not (tmp_path / "out").exists()  # nothing written, and the --out folder it made is gone again


def test_errors_while_scoring_are_one_line_too(bench, student, tmp_path, capsys, monkeypatch):
    import onestep.benchmark as ob
    from onestep.metrics import MetricsError

    def fails(*a, **k):
        raise MetricsError("KID: too few features (--keep)")

    monkeypatch.setattr(ob, "evaluate_model", fails)
    line = one_error_line(lambda: bench(["--pipeline", student, "--num-samples", "8", "--out", str(tmp_path)]), capsys)
    assert "KID: too few features" in line


SCRIPTS_BAD = [
    ("digits_fid.py", ["--teacher", "{rgb16}", "--steps", "1"], ["1x8x8", "(3, 16, 16)", "--features inception"]),
    ("digits_fid.py", ["--teacher", "{rgb16}", "--steps", "1", "--cleanfid"], ["1x8x8", "(3, 16, 16)"]),
    ("digits_fid.py", ["--teacher", "assets/digits-teacher", "--steps", "5000"], ["at most 1000 steps"]),
    ("digits_fid.py", ["--teacher", "assets/digits-teacher", "--num_samples", "1"], ["--num-samples must be >= 2"]),
    ("digits_fid.py", ["--teacher", "assets/digits-teacher", "--num-samples", "1000000000000"], ["100,000,000"]),
    ("digits_fid.py", ["--teacher", "assets/digits-teacher", "--classifier", "assets/digits-teacher"],
     ["without a config.json"]),
    ("digits_fid.py", ["--pipeline", "{run}"], ["run folder", "{student}"]),
    ("digits_fid.py", ["--pipeline", "{student}", "--frobnicate"], ["unrecognized arguments"]),
    ("forgetting.py", ["--teacher", "assets/digits-teacher", "--steps", "5000", "--forget", "3"], ["at most 1000 steps"]),
    ("forgetting.py", ["--teacher", "{rgb16}", "--steps", "1", "--forget", "3"], ["1x8x8", "(3, 16, 16)"]),
    ("forgetting.py", ["--pipeline", "{run}", "--forget", "3"], ["run folder", "{student}"]),
    ("forgetting.py", ["--pipeline", "{student}", "--forget", "3", "--classifier", "{file}"], ["is a file"]),
    ("forgetting.py", ["--pipeline", "{student}", "--forget", "3", "--num-samples", "1000000000000"], ["100,000,000"]),
    ("bench_streaming.py", ["--teacher", "{rgb16}"], ["1x8x8", "(3, 16, 16)"]),
    ("bench_streaming.py", ["--num-samples", "1000000000000"], ["100,000,000"]),
    ("bench_streaming.py", ["--classifier", "assets/digits-teacher"], ["without a config.json"]),
    ("fid_speed.py", ["--num-samples", "1000000000000"], ["100,000,000"]),
    ("fid_speed.py", ["--frobnicate"], ["unrecognized arguments"]),
]


@pytest.mark.parametrize("script, args, words", SCRIPTS_BAD,
                         ids=[f"{s[:-3]}-{i}" for i, (s, _, _) in enumerate(SCRIPTS_BAD)])
def test_the_other_eval_scripts_refuse_the_findings_in_one_line(odd, script, args, words, capsys):
    main = script_main(script)
    line = one_error_line(lambda: main(fill(args, odd)), capsys)
    for word in fill(words, odd):
        assert word in line, (word, line)


def test_forgetting_scores_a_multi_student_export(odd, capsys):
    script_main("forgetting.py")(["--pipeline", odd["multi"], "--forget", "3", "--num-samples", "10"])
    out = capsys.readouterr().out
    assert f"| {odd['multi']} | [3] |" in out


def test_fid_speed_help_shows_the_whole_description(capsys):
    with pytest.raises(SystemExit) as e:
        script_main("fid_speed.py")(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "streamed batch by batch (onestep.streaming)" in out and "same seeds, so the same" in out


def test_the_table_prints_a_zero_with_rounding_error_as_zero():
    """Self-FID computes to about -1e-7 on some thread counts: the table shows 0.000 (never -0.000), figures kept."""
    from onestep.benchmark import markdown_table

    row = {"model": "images", "path": "/data/digits", "fid": -1e-7, "kid": -2e-9, "class_accuracy": 0.98765}
    line = markdown_table([row]).splitlines()[-1]
    assert line.startswith("| images (digits) | — | — | 0.000 | 0.00000 | — | — | 0.988 |") and "-0" not in line
