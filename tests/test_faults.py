"""Fault injection with real processes: interrupts and jobs that hang workers."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, components_of, logs_of, make_photo, wait_for_results


def photos(tmp_path, n, width, height):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(n):
        make_photo(str(src / f"p{i:02d}.jpg"), width, height)
    return src


def launch_async(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "launch.py"), *map(str, args)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigint_to_launcher_prints_partial_report_and_leaves_nothing(tmp_path):
    src = photos(tmp_path, 40, 2400, 1800)
    out = tmp_path / "out"
    proc = launch_async(src, "-o", out, "--workers", "2", "--format", "png", "--quality", "100",
                        "--report-json", tmp_path / "r.json", "--results-jsonl", tmp_path / "res.jsonl",
                        "--log-dir", tmp_path / "logs")
    try:
        wait_for_results(proc, tmp_path / "res.jsonl", lines=2)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["state"] == "interrupted"
    done = r["tasks"]["completed"] + r["tasks"]["failed"]
    assert 2 <= done < 40 and r["tasks"]["failed"] == 0
    assert r["tasks"]["redelivered"] == 0  # the stopping workers' queued jobs went nowhere
    assert len(r["unfinished"]) == 40 - done
    assert "(interrupted)" in stdout and "Not finished" in stdout
    broker_log = logs_of(tmp_path, "broker")
    assert "SIGINT: no new jobs" in broker_log   # the user's Ctrl-C, by its name
    lines = [json.loads(l) for l in open(tmp_path / "res.jsonl")]
    assert len(lines) == 40 and sum(1 for l in lines if l.get("unfinished")) == 40 - done
    # Every finished job has its output; nothing half-written; no process left.
    files = [f for _, _, fs in os.walk(out) for f in fs]
    assert len(files) == done and not [f for f in files if "imgbus-tmp" in f]
    assert components_of(proc) == []


@pytest.mark.parametrize("how", ["grace 0", "two signals"])
def test_after_ctrl_c_no_output_appears_for_a_job_reported_unfinished(tmp_path, how):
    # Short jobs: each worker holds many queued at once when the Ctrl-C comes.
    src = photos(tmp_path, 600, 320, 240)
    out = tmp_path / "out"
    proc = launch_async(src, "-o", out, "--workers", "2", "--results-jsonl", tmp_path / "res.jsonl",
                        "--report-json", tmp_path / "r.json", "--log-dir", tmp_path / "logs",
                        *(["--grace", "0"] if how == "grace 0" else []))
    try:
        wait_for_results(proc, tmp_path / "res.jsonl", lines=40)
        proc.send_signal(signal.SIGINT)
        if how == "two signals":
            time.sleep(0.005)
            proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    time.sleep(0.5)  # a worker that still wrote would have done so by now
    lines = [json.loads(l) for l in open(tmp_path / "res.jsonl")]
    finished = {os.path.basename(l["output"]) for l in lines if l.get("ok")}
    unfinished = {os.path.basename(l["output"]) for l in lines if l.get("unfinished")}
    assert unfinished and len(finished) + len(unfinished) == 600
    on_disk = {f for _, _, fs in os.walk(out) for f in fs}
    assert on_disk == finished, f"outputs of unfinished jobs: {sorted(on_disk & unfinished)[:5]}"
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["tasks"]["completed"] == len(on_disk)


def test_a_broker_paused_for_seconds_loses_no_completion(tmp_path):
    # The workers finish what they hold, report it and, idle, say so every
    # 2 s; all of that waits until the broker runs again.
    src = photos(tmp_path, 40, 800, 600)
    proc = launch_async(src, "-o", tmp_path / "out", "--workers", "2", "--max-attempts", "1",
                        "--report-json", tmp_path / "r.json", "--results-jsonl", tmp_path / "res.jsonl",
                        "--log-dir", tmp_path / "logs")
    try:
        wait_for_results(proc, tmp_path / "res.jsonl", lines=4)
        broker = components_of(proc, "broker")[0]
        os.kill(broker, signal.SIGSTOP)
        time.sleep(5)
        os.kill(broker, signal.SIGCONT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["tasks"]["completed"] == 40 and r["tasks"]["failed"] == 0
    broker_log = logs_of(tmp_path, "broker")
    assert "never came back" not in broker_log


def test_a_job_that_hangs_workers_is_retried_then_failed(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    make_photo(str(src / "huge.jpg"), 6000, 6000)     # far slower than the timeout below
    for i in range(4):
        make_photo(str(src / f"small{i}.jpg"), 200, 150)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch.py"), src, "-o", tmp_path / "out",
                           "--workers", "2", "--format", "png", "--quality", "100", "--job-timeout", "0.5",
                           "--max-attempts", "2", "--report-json", tmp_path / "r.json",
                           "--log-dir", tmp_path / "logs"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    r = json.loads((tmp_path / "r.json").read_text())
    assert (r["tasks"]["completed"], r["tasks"]["failed"]) == (4, 1)
    failure, = r["failures"]
    assert failure["input"].endswith("huge.jpg")
    assert "gave up after 2 attempts" in failure["error"] and "--job-timeout" in failure["error"]
    assert r["tasks"]["redelivered"] >= 1
    # The launcher replaced the workers that gave up, so the pool kept going.
    assert "starting a new one" in proc.stderr
    assert not os.path.exists(tmp_path / "out" / "huge.png")


def test_all_workers_killed_under_the_launcher_ends_with_an_error(tmp_path):
    src = photos(tmp_path, 20, 2400, 1800)
    proc = launch_async(src, "-o", tmp_path / "out", "--workers", "2", "--format", "png", "--quality", "100",
                        "--no-worker-timeout", "2", "--report-json", tmp_path / "r.json",
                        "--results-jsonl", tmp_path / "res.jsonl", "--log-dir", tmp_path / "logs")
    try:
        wait_for_results(proc, tmp_path / "res.jsonl")
        for pid in components_of(proc, "sidecar"):
            os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        stdout, stderr = proc.communicate(timeout=60)
        assert time.monotonic() - killed_at < 20
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["state"] == "aborted" and len(r["workers"]["dead"]) == 2
    assert r["tasks"]["completed"] + r["tasks"]["failed"] == 20
    assert "no live worker" in stdout
    assert components_of(proc) == []


def kill_a_worker_mid_batch(tmp_path, src, ctrl_c_first: bool = False):
    """A PNG batch with one sidecar killed once a result is in (just after a
    Ctrl-C to the launcher, if asked); (launcher, stdout, stderr, victim's pid)."""
    proc = launch_async(src, "-o", tmp_path / "out", "--workers", "2", "--format", "png", "--quality", "100",
                        "--report-json", tmp_path / "r.json", "--results-jsonl", tmp_path / "res.jsonl",
                        "--log-dir", tmp_path / "logs")
    try:
        wait_for_results(proc, tmp_path / "res.jsonl")
        victim = components_of(proc, "sidecar")[0]
        if ctrl_c_first:
            proc.send_signal(signal.SIGINT)
            time.sleep(0.05)
        os.kill(victim, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc, stdout, stderr, victim


def test_a_killed_worker_is_written_off_at_once_under_the_launcher(tmp_path):
    """The launcher sees the exit: it tells the broker, which need not wait
    for the heartbeats to stop before the worker's jobs go to the others."""
    proc, stdout, stderr, victim = kill_a_worker_mid_batch(tmp_path, photos(tmp_path, 12, 2400, 1800))
    assert proc.returncode == 0, stderr
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["tasks"]["completed"] == 12 and r["tasks"]["failed"] == 0
    gone = f"{socket.gethostname()}-{victim}"
    assert gone in r["workers"]["dead"]
    broker_log = logs_of(tmp_path, "broker")
    assert f"worker {gone} left: its process killed by SIGKILL" in broker_log
    assert "stopped responding" not in broker_log


def test_a_worker_killed_after_ctrl_c_is_written_off_at_once_too(tmp_path):
    # Seconds an image: the victim is still on its image when killed.
    proc, _, stderr, victim = kill_a_worker_mid_batch(tmp_path, photos(tmp_path, 8, 5000, 4000), ctrl_c_first=True)
    assert proc.returncode == 130, stderr
    broker_log = logs_of(tmp_path, "broker")
    gone = f"{socket.gethostname()}-{victim}"
    # Not "stopped responding" 5 s later: the stop waited for nothing.
    assert f"worker {gone} left: its process killed by SIGKILL" in broker_log, broker_log
    assert "stopped responding" not in broker_log


def test_killed_reporter_is_replaced_and_the_batch_goes_on(tmp_path):
    src = photos(tmp_path, 16, 1600, 1200)
    proc = launch_async(src, "-o", tmp_path / "out", "--workers", "2", "--format", "png", "--quality", "100",
                        "--report-json", tmp_path / "r.json", "--log-dir", tmp_path / "logs")
    try:
        deadline = time.monotonic() + 30
        reporters = []
        while not reporters:
            assert time.monotonic() < deadline
            reporters = components_of(proc, "reporter")
            time.sleep(0.05)
        time.sleep(0.5)
        os.kill(reporters[0], signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert "Finished/total:        16/16" in stdout
    assert json.loads((tmp_path / "r.json").read_text())["state"] == "done"


def test_names_that_look_like_flags_are_still_inputs(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    make_photo(str(src / "-dash.jpg"))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch.py"), "--output=-weird", "--workers", "1",
                           "--log-dir", tmp_path / "logs", "--", "-dash.jpg"],
                          cwd=src, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert os.path.isfile(src / "-weird" / "-dash.jpg")


def test_two_stop_signals_during_one_long_c_call_count_as_two(tmp_path):
    """Python runs its handler once for both; the second must still count
    (it is what tells a worker to abandon its image)."""
    script = (
        "import hashlib, sys\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "from broker.config import StopFlag\n"
        "stop = StopFlag().install()\n"
        "data = bytes(600_000_000)\n"
        "print('ready', flush=True)\n"
        "hashlib.sha256(data).digest()  # one C call of a second or so\n"
        "print(stop.count, bool(stop), stop.signal_name, flush=True)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=60)
    assert stdout.split() == ["2", "True", "SIGTERM"]


def test_ctrl_c_during_a_long_encode_ends_soon_after_the_grace(tmp_path):
    src = photos(tmp_path, 2, 4000, 3000)
    out = tmp_path / "out"
    proc = launch_async(src, "-o", out, "--workers", "1", "--format", "avif", "--quality", "90",
                        "--grace", "0.5", "--report-json", tmp_path / "r.json", "--log-dir", tmp_path / "logs")
    try:
        deadline = time.monotonic() + 30
        while not any("stopping" not in line and "-> " not in line and "connecting" in line
                      for f in (tmp_path / "logs").glob("sidecar-*.jsonl") for line in f.read_text().splitlines()):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        time.sleep(1.0)  # well inside the first image's AVIF encode
        interrupted = time.monotonic()
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
        took = time.monotonic() - interrupted
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    # Not the grace plus two patient waits for a worker that cannot hear signals mid-encode.
    assert took < 7, (took, stderr)
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["state"] == "interrupted" and len(r["unfinished"]) == 2
    # Unfinished means no output, whole or partial; and no process is left.
    assert [f for _, _, fs in os.walk(out) for f in fs] == []
    assert components_of(proc) == []


def test_a_broker_that_dies_is_named_in_the_launchers_error(tmp_path):
    src = photos(tmp_path, 30, 1600, 1200)
    proc = launch_async(src, "-o", tmp_path / "out", "--workers", "2", "--format", "png", "--quality", "100",
                        "--log-dir", tmp_path / "logs")
    try:
        deadline = time.monotonic() + 30
        while not components_of(proc, "broker"):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        time.sleep(1.0)
        os.kill(components_of(proc, "broker")[0], signal.SIGKILL)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1
    assert "the broker died (killed by SIGKILL)" in stderr
    assert components_of(proc) == []


def test_when_the_broker_dies_workers_write_nothing_more(tmp_path):
    src = photos(tmp_path, 40, 1600, 1200)
    out = tmp_path / "out"
    proc = launch_async(src, "-o", out, "--workers", "2", "--format", "png", "--quality", "100",
                        "--results-jsonl", tmp_path / "res.jsonl", "--log-dir", tmp_path / "logs")
    try:
        wait_for_results(proc, tmp_path / "res.jsonl", lines=4)
        os.kill(components_of(proc, "broker")[0], signal.SIGKILL)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "the broker died (killed by SIGKILL)" in stderr
    time.sleep(0.5)
    # The images the workers were on are dropped, not written (before, each
    # worker went on through the jobs it held while the launcher waited).
    worker_logs = logs_of(tmp_path, "sidecar")
    assert "abandoned" in worker_logs
    recorded = sum(1 for line in open(tmp_path / "res.jsonl") if json.loads(line).get("ok"))
    written = sum(1 for _, _, files in os.walk(out) for f in files if "imgbus-tmp" not in f)
    # At most a completion per worker that the broker had not read yet.
    assert recorded <= written <= recorded + 2, (recorded, written)
