"""Checks shared by the command-line scripts: bad input stops with one line `error: ...` and exit status 2."""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The script's docstring as written, and each option's default where its help does not already state one (also
    for an option without help, which argparse would otherwise print bare)."""

    def _format_action(self, action):
        if action.option_strings and "default" not in (action.help or "") and _shown(action.default):
            action = copy.copy(action)
            action.help = (f"{action.help}  " if action.help else "") + "(default: %(default)s)"
        return super()._format_action(action)


def _shown(default) -> bool:
    return not (default is None or default is False or default is argparse.SUPPRESS or (
        isinstance(default, (str, list)) and not default))  # 0 is shown


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block), exit status 2; --help shows the script's docstring whole
    and the options' defaults (HelpFormatter)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        if first_rank():
            print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def asset_path(path: str) -> str:
    """A relative `assets/...` path that the working folder lacks: the project's own shipped asset (so that the
    defaults work from any folder); any other path as given."""
    if path and not os.path.isabs(path) and not os.path.exists(path) and \
            os.path.normpath(path).split(os.sep)[0] == "assets" and os.path.exists(os.path.join(PROJECT_ROOT, path)):
        return os.path.join(PROJECT_ROOT, path)
    return path


def first_rank() -> bool:
    """Whether this process reports bad input: a launcher's rank 0, or a process on its own. Every process of a
    launch reads the same input and stops on it; one says so."""
    return os.environ.get("RANK", "0") in ("", "0")


def report(err) -> None:
    """Print an error as one line `error: ...`: on the first process (every process stops on the same bad input),
    or on any process for an error in its own share of the work (`err.local`, e.g. an image only it reads)."""
    rank = os.environ.get("RANK") or "0"
    if rank == "0" or getattr(err, "local", False):
        print(f"error: {'' if rank == '0' else f'(process {rank}) '}{err}", file=sys.stderr)


def run_script(main, args) -> None:
    """main(args) for a training script: bad input (OnestepError) -> one line `error: ...` and exit status 2, with
    any run folder it had just created and left empty removed; Ctrl-C -> one line and exit status 130."""
    from .errors import OnestepError
    from .runs import remove_unused_run_dirs

    try:
        main(args)
    except OnestepError as e:
        remove_unused_run_dirs()
        report(e)
        sys.exit(2)
    except KeyboardInterrupt:
        if first_rank():
            print("error: interrupted; the run's complete checkpoints are kept: continue it with --resume latest (the "
                  "same --name and --output_dir)", file=sys.stderr)
        sys.exit(130)


def output_problem(option: str, path: str, kind: str = "folder") -> str | None:
    """Why `path` cannot be written as a `kind` ("folder": created now if missing; "file": its folder must exist),
    or None."""
    if not path:
        return f"{option} is empty; pass a {kind}"
    if kind == "folder" and os.path.exists(path) and not os.path.isdir(path):
        return f"{option} {path!r} is a file; pass a folder"
    if kind == "file" and os.path.isdir(path):
        return f"{option} {path!r} is a folder; pass a file path"
    if kind == "file" and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        return f"{option} {path!r}: its folder does not exist; create it first"
    if kind == "folder":
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            return f"{option} {path!r} cannot be created ({e.strerror}); pass another folder"
    return None


def first_error(parser: argparse.ArgumentParser, problems) -> None:
    """parser.error with the first of `problems` (strings, falsy values, or callables giving either: checked only
    once those before them passed, e.g. an output folder created by its check) that is a message."""
    for problem in problems:
        problem = problem() if callable(problem) else problem
        if problem:
            parser.error(problem)


MAX_SAMPLES = 100_000_000  # far above any real evaluation (FID-50k is 50,000); more would only exhaust memory


def num_samples_problem(n: int, option: str = "--num-samples") -> str | None:
    """Why `n` samples cannot be evaluated (None: they can)."""
    if n < 2:
        return f"{option} must be >= 2 (a covariance needs two samples), got {n}"
    if n > MAX_SAMPLES:
        return (f"{option} {n} is more than the {MAX_SAMPLES:,} samples allowed (FID-50k uses 50,000); pass a smaller "
                "count")
    return None


def classifier_problem(path: str, option: str = "--classifier") -> str | None:
    """Why `path` is not a digits classifier folder (None: it may be one; DigitsClassifier.load reads it)."""
    fix = "pass assets/digits-classifier (train/train_digits_classifier.py makes it)"
    if not os.path.exists(path):
        return f"{option} {path!r} does not exist; {fix}"
    if not os.path.isdir(path):
        return f"{option} {path!r} is a file, not a digits classifier folder; {fix}"
    if not os.path.isfile(os.path.join(path, "config.json")):
        return f"{option} {path!r} is a folder without a config.json, not a digits classifier; {fix}"
    return None


def eval_args_problem(num_samples: int | None = None, guidance: float | None = None, seed: int | None = None,
                      json_path: str | None = None, folder: str | None = None) -> str | None:
    """What is wrong with the evaluation scripts' shared values (None: nothing), before any work."""
    if num_samples is not None and (problem := num_samples_problem(num_samples)):
        return problem
    if guidance is not None and not (math.isfinite(guidance) and guidance >= 0):
        return f"--guidance must be a finite number >= 0 (1: no guidance), got {guidance}"
    if seed is not None and not 0 <= seed < 2**32:
        return f"--seed must be in 0..{2**32 - 1}, got {seed}"
    if json_path and (problem := output_problem("--json", json_path, "file")):
        return problem
    if folder and not os.path.isdir(folder):
        return f"model folder {folder!r} " + ("is a file" if os.path.exists(folder) else "does not exist")
    return None
