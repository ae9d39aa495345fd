"""Checks shared by the command-line scripts: bad input stops with one line `error: ...` and exit status 2."""
from __future__ import annotations

import argparse
import os
import sys


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block), exit status 2."""

    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


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
