"""Benchmark launches (onestep.launch): parallel jobs, per-run CPU seconds, the first failure stops the rest."""
import os
import sys
import time

import pytest

from onestep.launch import Job, error_line, run_jobs


def py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_jobs_run_in_parallel_and_report_their_cpu_seconds(tmp_path):
    busy = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\nprint('ok')"
    jobs = [Job(f"j{i}", py(busy), str(tmp_path / f"j{i}.log")) for i in range(3)]
    cpu = run_jobs(jobs, parallel=2, poll=0.05, quiet=True)
    assert sorted(cpu) == ["j0", "j1", "j2"] and all(s >= 0.3 for s in cpu.values())
    assert all((tmp_path / f"j{i}.log").read_text().strip() == "ok" for i in range(3))


def test_a_failure_stops_the_running_jobs_and_names_its_error_line(tmp_path):
    slow = Job("slow", py(f"import time, pathlib\ntime.sleep(60)\npathlib.Path({str(tmp_path / 'finished')!r}).touch()"),
               str(tmp_path / "slow.log"))
    bad = Job("bad", py("import sys, time\ntime.sleep(0.3)\nprint('step 1\\rstep 2')\n"
                        "print('error: --teacher: no such folder', file=sys.stderr)\nsys.exit(2)"), str(tmp_path / "bad.log"))
    later = Job("later", py("pass"), str(tmp_path / "later.log"))
    t0 = time.time()
    with pytest.raises(SystemExit, match=r"^error: run bad failed \(exit 2\): error: --teacher: no such folder; "
                                         r"stopped slow; log: .*bad\.log$"):
        run_jobs([slow, bad, later], parallel=2, poll=0.05, quiet=True)
    assert time.time() - t0 < 30 and not (tmp_path / "finished").exists()  # the sibling was stopped, not awaited
    assert not os.path.exists(later.log)  # nothing more started


def test_may_start_holds_jobs_back_and_error_line_falls_back_to_the_exception(tmp_path):
    order = str(tmp_path / "order")
    jobs = [Job(n, py(f"import time\nopen({order!r}, 'a').write('{n}+')\ntime.sleep(0.2)\nopen({order!r}, 'a').write('{n}-')"),
                str(tmp_path / f"{n}.log")) for n in ("a1", "b", "a2")]
    run_jobs(jobs, parallel=3, may_start=lambda job, running: not (job.name[0] == "a" and any(r[0] == "a" for r in running)),
             poll=0.02, quiet=True)
    seq = open(order).read()
    assert seq.index("a1-") < seq.index("a2+")  # never two "a" jobs at once
    (tmp_path / "t.log").write_text("Traceback (most recent call last):\n  x\nValueError: bad value\n")
    assert error_line(str(tmp_path / "t.log")) == "ValueError: bad value"
    assert error_line(str(tmp_path / "none.log")) == ""
