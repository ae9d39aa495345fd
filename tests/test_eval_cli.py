"""eval/benchmark.py as users run it: table + JSON + plot, reusable reference, 2 processes, bad input."""
import json
import os
import runpy
import socket
import subprocess
import sys

import pytest
from conftest import ROOT

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


def test_two_processes_give_the_one_process_result(bench, student, tmp_path):
    bench(["--pipeline", student, "--num-samples", "41", "--keep", "30", "--out", str(tmp_path / "one")])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                        "--main_process_port", port, BENCH, "--pipeline", student, "--num-samples", "41", "--keep", "30",
                        "--out", str(tmp_path / "two")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
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
    assert 0 <= figures["fid_between_variants_max"] < 1e-3
    r = subprocess.run([sys.executable, script, "--num-samples", "0"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: --num-samples")
    r = subprocess.run([sys.executable, script], cwd=ROOT, env=env, capture_output=True, text=True)  # no GPU, no --device
    assert r.returncode == 2 and r.stderr.startswith("error: no CUDA device") and "--device cpu" in r.stderr
