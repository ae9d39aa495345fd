"""Training runs side by side for the benchmark scripts: at most N at a time, each logging to its own file; the
first failure stops the others and names its error line.

    cpu = run_jobs([Job("base-s0", cmd, "out/base-s0.log"), ...], parallel=2)   # {name: CPU seconds}
"""
from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from typing import Callable


@dataclass
class Job:
    """One command, its log file (stdout and stderr), and its environment (None: this process's)."""

    name: str
    command: list[str]
    log: str
    env: dict | None = None
    cwd: str | None = None


def error_line(log: str, tail: int = 65536) -> str:
    """The last `error: ...` line of a log (a training script's one-line error), else its last exception line."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, os.path.getsize(log) - tail))
            lines = [ln.strip() for ln in f.read().decode("utf-8", "replace").replace("\r", "\n").split("\n")]
    except OSError:
        return ""
    lines = [ln for ln in lines if ln]
    for ln in reversed(lines):
        if ln.startswith("error:"):
            return ln
    return next((ln for ln in reversed(lines) if ln.split(":")[0].endswith(("Error", "Exception", "Interrupt"))), "")


def run_jobs(jobs: list[Job], parallel: int, may_start: Callable[[Job, list[str]], bool] | None = None,
             poll: float = 0.5, quiet: bool = False) -> dict[str, float]:
    """Run the jobs, at most `parallel` at a time, in order (a job `may_start(job, running names)` refuses waits);
    returns {name: CPU seconds of its process tree}. A failed job stops the running ones (SIGTERM, then SIGKILL
    after 10 s) and raises SystemExit with one line naming it, its exit status, its error line and its log; an
    interrupt stops them too."""
    pending, running, cpu = list(jobs), {}, {}
    try:
        while pending or running:
            for job in list(pending):
                if len(running) >= parallel:
                    break
                if may_start is None or may_start(job, [j.name for j, _ in running.values()]):
                    pending.remove(job)
                    os.makedirs(os.path.dirname(os.path.abspath(job.log)), exist_ok=True)
                    log = open(job.log, "w")
                    if not quiet:
                        print(f"start {job.name} (log: {job.log})", flush=True)
                    proc = subprocess.Popen(job.command, cwd=job.cwd, env=job.env, stdout=log, stderr=subprocess.STDOUT)
                    running[proc] = (job, log)
            if not running:
                raise ValueError(f"run_jobs: no pending job may start ({', '.join(j.name for j in pending)})")
            time.sleep(poll)
            for proc, (job, log) in list(running.items()):
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid == 0:
                    continue
                del running[proc]
                log.close()
                proc.returncode = code = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
                if code:
                    why = error_line(job.log)
                    stopped = f"; stopped {', '.join(j.name for j, _ in running.values())}" if running else ""
                    raise SystemExit(f"error: run {job.name} failed (exit {code}){': ' + why if why else ''}{stopped}; "
                                     f"log: {job.log}")
                cpu[job.name] = round(usage.ru_utime + usage.ru_stime, 1)
                if not quiet:
                    print(f"done {job.name}", flush=True)
    finally:
        for proc, (_, log) in running.items():
            proc.terminate()
        for proc, (_, log) in running.items():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
    return cpu
