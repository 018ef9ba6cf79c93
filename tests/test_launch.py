"""End to end through launch.py: real processes, real sockets, real pyvips."""

import json
import os
import shlex
import subprocess
import time

import pyvips
import pytest

from conftest import ROOT, components_of, make_photo, python_cmd, run_launch


def read_jsonl(path):
    return [json.loads(line) for line in open(path) if line.strip()]


@pytest.fixture
def mixed_folder(tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    for i in range(6):
        make_photo(str(src / f"good{i}.jpg"), 800 + 16 * i, 600)
    (src / "nested").mkdir()
    make_photo(str(src / "nested" / "deep.png"), 500, 500)
    (src / "text.jpg").write_text("this is a text file, not a photo\n")
    whole = (src / "good0.jpg").read_bytes()
    (src / "truncated.jpg").write_bytes(whole[: len(whole) // 3])
    (src / "zero.jpg").write_bytes(b"")
    (src / "README.txt").write_text("not an image and not named like one")
    return src


def test_mixed_batch_reports_failures_and_finishes_the_rest(mixed_folder, tmp_path):
    out, report, results = tmp_path / "out", tmp_path / "r.json", tmp_path / "res.jsonl"
    proc = run_launch([mixed_folder, "-o", out, "--workers", 2, "--format", "webp", "--resize", "longest:400",
                       "--report-json", report, "--results-jsonl", results, "--log-dir", tmp_path / "logs"])
    assert proc.returncode == 1, proc.stderr
    r = json.loads(report.read_text())
    lines = read_jsonl(results)
    assert r["tasks"]["total"] == 10 == len(lines)
    assert (r["tasks"]["completed"], r["tasks"]["failed"]) == (7, 3)
    errors = {os.path.basename(l["input"]): l["error"] for l in lines if not l["ok"]}
    assert "not an image" in errors["text.jpg"]
    assert "corrupt or truncated" in errors["truncated.jpg"]
    assert "empty file" in errors["zero.jpg"]
    # The console report lists every failure with its file; the log on stderr
    # tells each once (the broker's line), not once per process that saw it.
    for name in errors:
        assert name in proc.stdout
        assert sum(f"{name} failed" in line for line in proc.stderr.splitlines()) == 1, proc.stderr
    # Outputs: decodable WebP at the right size; byte totals are the files' real sizes.
    total_out = 0
    for line in lines:
        if line["ok"]:
            image = pyvips.Image.new_from_file(line["output"])
            assert image.get("vips-loader") == "webpload"
            assert max(image.width, image.height) == 400 == max(line["width"], line["height"])
            total_out += os.path.getsize(line["output"])
        else:
            assert not os.path.exists(line["output"])
    assert r["bytes"]["out"] == total_out
    assert r["bytes"]["in"] == sum(os.path.getsize(l["input"]) for l in lines if l["ok"])
    assert os.path.isfile(out / "nested" / "deep.webp")
    # Tasks per worker come from completions and add up to the jobs workers did.
    per = r["workers"]["per_worker"]
    assert r["workers"]["total"] == 2 == len({p["id"] for p in per})
    assert sum(p["tasks"] for p in per) == 10
    # Memory is known even for a batch shorter than a heartbeat interval.
    assert all(p["peak_rss_mb"] > 20 for p in per if p["tasks"])
    assert {l["worker_id"] for l in lines} == {p["id"] for p in per}
    # Inputs untouched, no temporary files anywhere in the output tree.
    assert (mixed_folder / "zero.jpg").read_bytes() == b""
    assert not [f for _, _, files in os.walk(out) for f in files if "imgbus-tmp" in f]
    # One JSON-lines log per process, each line carrying the component.
    logs = os.listdir(tmp_path / "logs")
    assert {name.split("-")[0] for name in logs} == {"launch", "broker", "sidecar", "reporter"}
    sidecar_log = next(n for n in logs if n.startswith("sidecar"))
    record = json.loads(open(tmp_path / "logs" / sidecar_log).readline())
    assert record["component"] == "sidecar" and record["worker_id"] and record["level"] and record["message"]
    # Every image a worker did is one line there, with its job id.
    done_lines = [json.loads(line) for name in logs if name.startswith("sidecar")
                  for line in open(tmp_path / "logs" / name) if " -> " in line]
    assert sorted(line["job_id"] for line in done_lines) == sorted(l["job_id"] for l in lines if l["ok"])
    # The last line a worker logs, just before its quick exit, reached the file.
    for name in logs:
        if name.startswith("sidecar"):
            assert "stopping after" in (tmp_path / "logs" / name).read_text().splitlines()[-1]


def test_all_good_exits_zero_and_prints_every_section(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(4):
        make_photo(str(src / f"p{i}.jpg"), 300, 200)
    proc = run_launch([src, "-o", tmp_path / "out", "--workers", 2, "--log-dir", tmp_path / "logs"])
    assert proc.returncode == 0, proc.stderr
    for heading in ("Time", "Worker pool", "Batch", "Optimization"):
        assert f"\n{heading}\n" in proc.stdout
    assert "Finished/total:        4/4" in proc.stdout


def test_output_folder_inside_the_input_folder(tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    make_photo(str(src / "a.jpg"))
    for _ in range(2):  # the second run must not pick up the first run's outputs
        proc = run_launch([src, "-o", src / "optimized", "--workers", 1, "--results-jsonl", tmp_path / "r.jsonl",
                           "--log-dir", tmp_path / "logs"])
        assert proc.returncode == 0, proc.stderr
        assert len(read_jsonl(tmp_path / "r.jsonl")) == 1
    assert os.listdir(src / "optimized") == ["a.jpg"]


@pytest.mark.parametrize("args, fragment", [
    (["--format", "bmp"], "invalid choice: 'bmp'"),
    (["--quality", "0"], "quality must be an integer from 1 to 100"),
    (["/no/such/folder"], "input not found: /no/such/folder"),
    (["--resize", "longest"], "MODE:SIZE"),
    (["--workers", "0"], "at least 1"),
    (["--log-level", "loud"], "'loud' is not one of TRACE, DEBUG, INFO"),
])
def test_bad_usage_is_one_clear_line_and_exit_2(tmp_path, args, fragment):
    proc = run_launch([*args, "--log-dir", tmp_path / "logs"], timeout=30)
    assert proc.returncode == 2
    assert fragment in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_default_run_uses_the_shipped_samples(tmp_path):
    proc = run_launch(["--workers", 2, "--log-dir", tmp_path / "logs", "--results-jsonl", tmp_path / "r.jsonl"],
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = read_jsonl(tmp_path / "r.jsonl")
    assert len(lines) >= 5 and all(l["ok"] for l in lines)
    assert all(l["output"].startswith(str(tmp_path / "out")) for l in lines)


def test_rerun_with_skip_existing_skips_finished_outputs(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        make_photo(str(src / f"p{i}.jpg"), 300, 200)
    common = [src, "-o", tmp_path / "out", "--workers", 1, "--format", "webp", "--log-dir", tmp_path / "logs"]
    assert run_launch(common).returncode == 0
    os.remove(tmp_path / "out" / "p1.webp")
    proc = run_launch([*common, "--skip-existing", "--report-json", tmp_path / "r.json",
                       "--results-jsonl", tmp_path / "res.jsonl"])
    assert proc.returncode == 0, proc.stderr
    r = json.loads((tmp_path / "r.json").read_text())
    assert (r["tasks"]["total"], r["tasks"]["completed"], r["tasks"]["skipped"]) == (3, 1, 2)
    lines = {os.path.basename(l["input"]): l for l in read_jsonl(tmp_path / "res.jsonl")}
    assert lines["p0.jpg"]["skipped"] and lines["p2.jpg"]["skipped"] and not lines["p1.jpg"].get("skipped")
    assert "skipped 2)" in proc.stdout


def test_output_that_is_a_file_is_bad_usage(tmp_path):
    (tmp_path / "file").write_text("x")
    proc = run_launch(["-o", tmp_path / "file", "--log-dir", tmp_path / "logs"], timeout=30)
    assert proc.returncode == 2 and "output folder is a file" in proc.stderr


def test_an_input_folder_that_is_or_lies_inside_the_output_folder_is_bad_usage(tmp_path):
    src = tmp_path / "photos"
    (src / "sub").mkdir(parents=True)
    make_photo(str(src / "sub" / "a.jpg"), 64, 48)
    for output, says in ((src, "is the output folder"), (tmp_path, "is inside the output folder")):
        proc = run_launch([src, "-o", output, "--log-dir", tmp_path / "logs"], timeout=30)
        assert proc.returncode == 2 and says in proc.stderr, proc.stderr
    assert sorted(p.name for p in src.rglob("*")) == ["a.jpg", "sub"]  # nothing written
    # The other way round is fine: the output folder is left out of the walk.
    proc = run_launch([src, "-o", src / "out", "--log-dir", tmp_path / "logs"], timeout=60)
    assert proc.returncode == 0 and (src / "out" / "sub" / "a.jpg").is_file(), proc.stderr


def test_batch_file_output_is_renamed_for_its_real_format(tmp_path):
    src = make_photo(str(tmp_path / "x.jpg"))
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"input": src, "output": "y.jpg", "settings": {"format": "webp"}}) + "\n")
    proc = run_launch(["--jobs", jobs, "-o", tmp_path / "out", "--workers", 1, "--results-jsonl",
                       tmp_path / "r.jsonl", "--log-dir", tmp_path / "logs"])
    assert proc.returncode == 0, proc.stderr
    line, = read_jsonl(tmp_path / "r.jsonl")
    assert line["output"] == str(tmp_path / "out" / "y.webp") and line["format"] == "webp"
    assert pyvips.Image.new_from_file(line["output"]).get("vips-loader") == "webpload"


@pytest.mark.parametrize("workers", [1, 2])
def test_bytes_transport_inputs_the_broker_cannot_send_fail_alone(tmp_path, workers):
    """An input over --max-image-mb fails before it is sent; the worker it was
    meant for must still get the rest of the batch."""
    src = tmp_path / "in"
    src.mkdir()
    for name in ("huge1.jpg", "huge2.jpg"):
        (src / name).write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(1_500_000))
    for i in range(3):
        make_photo(str(src / f"small{i}.jpg"), 200, 150)
    proc = run_launch([src, "-o", tmp_path / "out", "--workers", workers, "--transport", "bytes",
                       "--max-image-mb", 1, "--report-json", tmp_path / "r.json", "--log-dir", tmp_path / "logs"],
                      timeout=60)
    assert proc.returncode == 1, proc.stderr
    r = json.loads((tmp_path / "r.json").read_text())
    assert (r["tasks"]["completed"], r["tasks"]["failed"]) == (3, 2)
    assert sorted(os.listdir(tmp_path / "out")) == ["small0.jpg", "small1.jpg", "small2.jpg"]


@pytest.mark.parametrize("redirect", [">&-", "2>&-", "| true"])
def test_a_closed_or_unread_stdout_or_stderr_is_not_a_failure(tmp_path, redirect):
    src = tmp_path / "in"
    src.mkdir()
    make_photo(str(src / "a.jpg"), 300, 200)
    launch = " ".join(shlex.quote(str(a)) for a in python_cmd(
        os.path.join(ROOT, "launch.py"), src, "-o", tmp_path / "out", "--report-json", tmp_path / "r.json",
        "--log-dir", tmp_path / "logs"))
    proc = subprocess.run(["bash", "-c", f"set -o pipefail; {launch} {redirect}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert json.loads((tmp_path / "r.json").read_text())["tasks"]["completed"] == 1


def test_cpu_sets_split_the_cpus_only_when_every_worker_fits():
    from broker.config import parse_cpus, plan_cpu_sets

    assert parse_cpus("0") == [0] and parse_cpus("3,0-1") == [0, 1, 3]
    for bad in ("", "a", "2-1", "-1", "0-99999999", "4294967296"):
        with pytest.raises(ValueError):
            parse_cpus(bad)
    assert plan_cpu_sets(2, 1, [0, 1]) == [[0], [1]]
    assert plan_cpu_sets(2, 2, [0, 1, 4, 5]) == [[0, 1], [4, 5]]
    assert plan_cpu_sets(1, 1, [0, 1]) == [[0]]
    assert plan_cpu_sets(3, 1, [0, 1]) is None   # more workers than CPUs: the scheduler decides
    assert plan_cpu_sets(2, 2, [0, 1, 2]) is None


def _worker_cpus(log_dir) -> list[set[int]]:
    found = []
    for name in os.listdir(log_dir):
        if name.startswith("sidecar"):
            for line in read_jsonl(os.path.join(log_dir, name)):
                if "connecting to" in line["message"]:
                    found.append({int(c) for c in line["message"].rsplit("(CPUs ", 1)[1].rstrip(")").split(",")})
    return found


def test_workers_under_the_launcher_get_cpus_of_their_own(tmp_path):
    from broker.config import usable_cpus

    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        make_photo(str(src / f"p{i}.jpg"), 200, 150)
    cpus = set(usable_cpus())

    def worker_cpus(*flags):
        logs = tmp_path / f"logs{len(flags)}"
        proc = run_launch([src, "-o", tmp_path / "out", "--log-dir", logs, *flags])
        assert proc.returncode == 0, proc.stderr
        return _worker_cpus(logs)

    pinned = worker_cpus("--workers", len(cpus), "--vips-threads", 1)
    assert len(pinned) == len(cpus) and all(len(s) == 1 for s in pinned) and set.union(*pinned) == cpus
    assert worker_cpus("--workers", len(cpus), "--vips-threads", 1, "--pin-workers", "off") == [cpus] * len(cpus)
    assert worker_cpus("--workers", len(cpus) + 1, "--vips-threads", 1, "--skip-existing") == [cpus] * (len(cpus) + 1)


@pytest.mark.parametrize("cpus", ["nope", "99999", "", "4000"])
def test_a_standalone_sidecar_refuses_cpus_it_cannot_have(cpus):
    proc = subprocess.run(python_cmd("-m", "sidecar", "--cpus", cpus), cwd=ROOT, capture_output=True, text=True,
                          timeout=30, env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 2 and f"--cpus {cpus}" in proc.stderr


@pytest.mark.parametrize("module, args, fragment", [
    ("sidecar", ["--connect", "tcp://127.0.0.1:99999"], "the port must be a number from 1 to 65535"),
    ("sidecar", ["--results", "tcp://127.0.0.1:abc"], "the port must be a number from 1 to 65535"),
    ("reporter", ["--connect", "localhost:5559"], "expected tcp://HOST:PORT or ipc://PATH"),
    ("broker", ["--jobs-endpoint", "tcp://:5557", "x"], "the port must be a number"),
    ("reporter", ["--log-level", "chatty"], "'chatty' is not one of"),
])
def test_components_refuse_endpoints_and_levels_they_cannot_use(module, args, fragment):
    proc = subprocess.run(python_cmd("-m", module, *args), cwd=ROOT, capture_output=True, text=True,
                          timeout=30, env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 2 and fragment in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_log_levels_are_taken_in_any_case(tmp_path):
    proc = run_launch(["--log-level", "debug", "-o", tmp_path / "out", "--log-dir", tmp_path / "logs"])
    assert proc.returncode == 0, proc.stderr
    assert "DEBUG" in proc.stderr


def test_bytes_transport_output_too_large_for_the_broker_fails_clearly(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    noise = pyvips.Image.gaussnoise(1800, 1400, sigma=60)
    noise.bandjoin([noise, noise]).cast("uchar").jpegsave(str(src / "noise.jpg"), Q=25)
    assert os.path.getsize(src / "noise.jpg") < 1_000_000   # under --max-image-mb 1 going in...
    make_photo(str(src / "small.jpg"), 200, 150)
    proc = run_launch([src, "-o", tmp_path / "out", "--transport", "bytes", "--max-image-mb", 1, "--format", "tiff",
                       "--results-jsonl", tmp_path / "r.jsonl", "--log-dir", tmp_path / "logs"])
    assert proc.returncode == 1, proc.stderr
    lines = {os.path.basename(l["input"]): l for l in read_jsonl(tmp_path / "r.jsonl")}
    # ...but its TIFF is over what the broker's socket takes back: one clear failure, no retries.
    assert "larger than the broker accepts" in lines["noise.jpg"]["error"]
    assert lines["noise.jpg"]["attempt"] == 1 and lines["small.jpg"]["ok"]


def test_stage_timings_come_from_a_sample_drawn_by_the_broker(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(12):
        make_photo(str(src / f"p{i:02d}.jpg"), 300 + 10 * i, 200)
    proc = run_launch([src, "-o", tmp_path / "out", "--resize", "longest:100", "--results-jsonl",
                       tmp_path / "r.jsonl", "--log-dir", tmp_path / "logs"])
    assert proc.returncode == 0, proc.stderr
    timed = [l for l in read_jsonl(tmp_path / "r.jsonl") if l["timings"]]
    assert len(timed) == 8 and "(8 images timed)" in proc.stdout
    assert all(set(l["timings"]) == {"decode", "resize", "encode", "write"} for l in timed)


def test_inputs_may_follow_options(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        make_photo(str(tmp_path / name / f"{name}.jpg"), 120, 90)
    proc = run_launch([tmp_path / "a", "-o", tmp_path / "out", tmp_path / "b", "--log-dir", tmp_path / "logs"])
    assert proc.returncode == 0, proc.stderr
    assert sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*.jpg")) == \
        ["a/a.jpg", "b/b.jpg"]


def test_linked_folders_and_files_outside_the_input_are_optimized(tmp_path):
    src, elsewhere = tmp_path / "in", tmp_path / "elsewhere"
    (src / "real").mkdir(parents=True)
    elsewhere.mkdir()
    make_photo(str(src / "real" / "a.jpg"), 400, 300)
    make_photo(str(elsewhere / "b.jpg"), 400, 300)
    make_photo(str(tmp_path / "c.jpg"), 400, 300)
    (src / "linked").symlink_to(elsewhere)
    (src / "c.jpg").symlink_to(tmp_path / "c.jpg")
    out = tmp_path / "out"
    proc = run_launch([src, "-o", out, "--workers", 2, "--report-json", tmp_path / "r.json",
                       "--log-dir", tmp_path / "logs"])
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "r.json").read_text())["tasks"]["completed"] == 3
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.jpg")) == ["c.jpg", "linked/b.jpg", "real/a.jpg"]


@pytest.mark.parametrize("which", ["results", "report"])
def test_a_results_or_report_file_that_cannot_be_written_does_not_stop_the_batch(tmp_path, which):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(4):
        make_photo(str(src / f"p{i}.jpg"), 400, 300)
    if which == "results":
        files = ["--results-jsonl", "/dev/full", "--report-json", tmp_path / "r.json"]  # every write: ENOSPC
    else:
        (tmp_path / "r.json.tmp").mkdir()  # where the report is written first: it cannot be
        files = ["--report-json", tmp_path / "r.json"]
    proc = run_launch([src, "-o", tmp_path / "out", "--workers", 2, *files, "--log-dir", tmp_path / "logs"])
    assert proc.returncode == 1, proc.stderr
    assert "died" not in proc.stderr and "Traceback" not in proc.stderr
    assert ("cannot write /dev/full" if which == "results" else "cannot write the report") in proc.stderr
    assert "(done)" in proc.stdout and "4/4   (succeeded 4, failed 0" in proc.stdout, proc.stdout
    assert len(list((tmp_path / "out").glob("*.jpg"))) == 4
    if which == "results":
        assert json.loads((tmp_path / "r.json").read_text())["tasks"]["completed"] == 4


# -- how the launcher starts its components -------------------------------------

PROBE = '''
import os, signal, sys, time
from broker.config import StopFlag

def main(argv):
    if argv[0] == "signalled":  # the launcher's Ctrl-C arrives while this one is still starting
        time.sleep(0.3)
        stop = StopFlag().install()
        print("stopped by", stop.signal_name, stop.count)
        return 0
    launcher_logs = [fd for fd in os.listdir("/proc/self/fd")
                     if os.path.realpath(f"/proc/self/fd/{fd}").endswith(f"launch-{os.getppid()}.jsonl")]
    print("launcher's log open in child:", len(launcher_logs))
    comm = open("/proc/self/comm").read().strip()
    handlers = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD)]
    print("child", comm, os.getsid(0) == os.getpid(), signal.set_wakeup_fd(-1),
          handlers == [signal.default_int_handler, signal.SIG_DFL, signal.SIG_DFL], *argv)
    if argv[0] == "usage":
        raise SystemExit(2)
    if argv[0] == "crash":
        raise RuntimeError("probe crashed")
    if argv[0] == "bare-exit":
        sys.exit()
    if argv[0] == "exit-text":
        sys.exit("probe gave up")
    return int(argv[0])
'''

FORKER = '''
import os, signal, sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]
import launch
from broker import config

stop = config.StopFlag().install(wake_on_child_exit=True)
config.setup_logging("launch", sys.argv[2])
print("launcher text, still buffered (stdout is a pipe)")
for how in ["0", "3", "usage", "crash", "bare-exit", "exit-text"]:
    child = launch.start_component("probe", [how], stop)
    print("exit", how, child.wait(30), flush=True)
child = launch.start_component("probe", ["signalled"], stop)
os.kill(child.pid, signal.SIGINT)
print("exit signalled", child.wait(30), flush=True)
'''


def test_components_start_as_forks_that_keep_nothing_of_the_launcher(tmp_path):
    (tmp_path / "probe").mkdir()
    (tmp_path / "probe" / "__init__.py").write_text("")
    (tmp_path / "probe" / "cli.py").write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # as on most machines
    proc = subprocess.run(python_cmd("-c", FORKER, ROOT, str(tmp_path)), capture_output=True, text=True,
                          timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    # The launcher's unwritten output is written once, by the launcher.
    assert proc.stdout.count("launcher text") == 1
    # Each child: named for ps, a session of its own (Ctrl-C reaches only the
    # launcher), none of the launcher's signal handlers or wakeup fd.
    children = [line for line in out if line.startswith("child")]
    hows = ["0", "3", "usage", "crash", "bare-exit", "exit-text"]
    assert children == [f"child imgbus-probe True -1 True {how}" for how in hows]
    # Its exit status is main()'s; bad usage is 2 as with python -m; a crash is 1 with its traceback.
    assert [line.split()[-2:] for line in out if line.startswith("exit ")] == [
        ["0", "0"], ["3", "3"], ["usage", "2"], ["crash", "1"], ["bare-exit", "0"], ["exit-text", "1"],
        ["signalled", "0"]]
    assert "probe gave up" in proc.stderr
    # A stop signal sent before the component has its handlers waits for them.
    assert "stopped by SIGINT 1" in out
    # The launcher's log file is the launcher's alone.
    assert len(list(tmp_path.glob("launch-*.jsonl"))) == 1
    assert [line for line in out if line.startswith("launcher's log")] == ["launcher's log open in child: 0"] * 6
    assert "RuntimeError: probe crashed" in proc.stderr


def test_a_batch_runs_in_named_forks_of_the_launcher_that_end_with_it(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(8):
        make_photo(str(src / f"p{i}.jpg"), 2400, 1800)
    proc = subprocess.Popen(python_cmd(os.path.join(ROOT, "launch.py"), str(src), "-o", str(tmp_path / "out"),
                                       "--workers", "2", "--format", "png", "--quality", "100"),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = {}
        while proc.poll() is None and len(seen) < 3:
            for name in ("broker", "sidecar", "reporter"):
                if pids := components_of(proc, name):
                    seen[name] = pids
            time.sleep(0.02)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert len(seen["broker"]) == 1 and len(seen["sidecar"]) == 2 and len(seen["reporter"]) == 1
    assert "Finished/total:        8/8" in stdout
    assert components_of(proc) == []


ARENAS = """
import ctypes, os, re, sys, tempfile, threading
sys.path.insert(0, sys.argv[1])
if sys.argv[2] == "limit":
    from sidecar.cli import limit_malloc_arenas
    limit_malloc_arenas(2)
libc = ctypes.CDLL(None)
libc.fopen.restype = ctypes.c_void_p
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.fclose.argtypes = [ctypes.c_void_p]
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
together = threading.Barrier(8)

def allocate():  # eight threads allocating at once, as libvips' would
    block = libc.malloc(4096)
    together.wait()
    libc.free(block)

threads = [threading.Thread(target=allocate) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
path = tempfile.mktemp()
stream = libc.fopen(path.encode(), b"w")
libc.malloc_info(0, stream)
libc.fclose(stream)
print(len(re.findall('<heap nr=', open(path).read())))
os.unlink(path)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/maps") or os.confstr("CS_GNU_LIBC_VERSION") is None,
                    reason="malloc arenas are glibc's")
def test_a_worker_keeps_two_malloc_arenas_unless_the_user_chose(tmp_path):
    def arenas(how, **env):
        proc = subprocess.run(python_cmd("-c", ARENAS, ROOT, how), capture_output=True, text=True, timeout=30,
                              env={k: v for k, v in {**os.environ, **env}.items() if v is not None})
        assert proc.returncode == 0, proc.stderr
        return int(proc.stdout)

    assert arenas("free", MALLOC_ARENA_MAX=None) > 2   # glibc's own: one per thread, up to 8 per core
    assert arenas("limit", MALLOC_ARENA_MAX=None) == 2
    assert arenas("limit", MALLOC_ARENA_MAX="4") == 4
