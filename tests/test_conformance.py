"""The shared conformance suite (../shared/cases), run against the real product.

C cases share one run; each P case is staged as its ``harness`` block says.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, components_of

TIMEOUT_S = 150


@pytest.fixture(scope="module")
def cases_input(cases_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cases") / "in"
    subprocess.run([sys.executable, os.path.join(cases_dir, "make_cases.py"), str(folder), "--verify"],
                   check=True, capture_output=True, timeout=120)
    return folder


def emit_jobs(cases_dir, in_dir, out_dir, cases, path):
    jobs = subprocess.run([sys.executable, os.path.join(cases_dir, "check.py"), str(in_dir), str(out_dir),
                           "--emit-jobs", "--cases", cases], check=True, capture_output=True, text=True)
    path.write_text(jobs.stdout)


def check(cases_dir, in_dir, out_dir, results, cases, run_info=None):
    cmd = [sys.executable, os.path.join(cases_dir, "check.py"), str(in_dir), str(out_dir), str(results),
           "--cases", cases]
    if run_info:
        cmd += ["--run-info", str(run_info)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    return proc


def launch(jobs, results, logs, workers):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "launch.py"), "--jobs", str(jobs),
                             "--results-jsonl", str(results), "--workers", str(workers), "--log-dir", str(logs)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def count_lines(path):
    try:
        with open(path) as f:
            return sum(1 for line in f if line.strip())
    except FileNotFoundError:
        return 0


def staged_run(tmp_path, cases_dir, cases_input, case, workers, kill_after=None):
    """Run one case under launch.py; return (checker output, run info)."""
    out, jobs, results = tmp_path / "out", tmp_path / "jobs.jsonl", tmp_path / "results.jsonl"
    emit_jobs(cases_dir, cases_input, out, case, jobs)
    started = time.monotonic()
    proc = launch(jobs, results, tmp_path / "logs", workers)
    killed, last_count, last_change = None, 0, started
    timed_out = False
    while proc.poll() is None:
        n = count_lines(results)
        if n != last_count:
            last_count, last_change = n, time.monotonic()
        if kill_after is not None and killed is None and n >= kill_after:
            sidecars = components_of(proc, "sidecar")
            killed = sidecars[0]
            os.kill(killed, signal.SIGKILL)
        if time.monotonic() - started > TIMEOUT_S:
            timed_out = True
            proc.kill()
            break
        time.sleep(0.02)
    ended = time.monotonic()
    stdout, stderr = proc.communicate()
    orphans = components_of(proc)
    for pid in orphans:
        os.kill(pid, signal.SIGKILL)
    info = {"exit_code": proc.returncode, "timed_out": timed_out, "wall_s": ended - started,
            "exit_after_last_result_s": ended - last_change, "orphan_processes": len(orphans)}
    (tmp_path / "run.json").write_text(json.dumps(info))
    verdict = check(cases_dir, cases_input, out, results, case, tmp_path / "run.json")
    return verdict, info, stdout, stderr, killed


def test_c_cases_in_one_batch(tmp_path, cases_dir, cases_input):
    verdict, info, stdout, stderr, _ = staged_run(tmp_path, cases_dir, cases_input, "C", workers=2)
    assert info["exit_code"] == 1, stderr        # some jobs must fail
    assert verdict.returncode == 0, verdict.stdout
    assert " 0 failed" in verdict.stdout and "FAIL" not in verdict.stdout


def test_p01_every_worker_gets_a_share(tmp_path, cases_dir, cases_input):
    verdict, info, stdout, stderr, _ = staged_run(tmp_path, cases_dir, cases_input, "P01", workers=4)
    assert verdict.returncode == 0, verdict.stdout + stderr
    assert "PASS  P01" in verdict.stdout


def test_p02_sigkilled_worker_loses_no_job(tmp_path, cases_dir, cases_input):
    verdict, info, stdout, stderr, killed = staged_run(tmp_path, cases_dir, cases_input, "P02", workers=4,
                                                       kill_after=5)
    assert killed is not None
    assert verdict.returncode == 0, verdict.stdout + stderr
    assert "PASS  P02" in verdict.stdout
    assert info["exit_code"] == 0
    # The report names the dead worker.
    assert "Lost workers:" in stdout and str(killed) in stdout


def test_p03_clean_prompt_exit(tmp_path, cases_dir, cases_input):
    verdict, info, stdout, stderr, _ = staged_run(tmp_path, cases_dir, cases_input, "P03", workers=2)
    assert verdict.returncode == 0, verdict.stdout + stderr
    assert "PASS  P03" in verdict.stdout
    assert info["orphan_processes"] == 0
