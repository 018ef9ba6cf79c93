"""Shared fixtures: synthetic images made with pyvips, the real corpus, runners."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pyvips
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("IMGBUS_SHARED", os.path.join(os.path.dirname(ROOT), "shared"))
CORPUS_CACHE = os.environ.get("IMGBUS_CORPUS", os.path.expanduser("~/.cache/imgbus/wallpapers"))

pyvips.cache_set_max(0)


def make_photo(path, width=640, height=480, *, orientation=None, alpha=False, q=92):
    """A photo-like test image (smooth gradients plus noise), saved by extension."""
    x = pyvips.Image.xyz(width, height)
    r = (x[0] * 255 / max(1, width - 1))
    g = (x[1] * 255 / max(1, height - 1))
    b = pyvips.Image.gaussnoise(width, height, mean=128, sigma=40)
    image = r.bandjoin([g, b]).cast("uchar").copy(interpretation="srgb")
    if alpha:
        image = image.bandjoin((x[0] > width // 2).ifthenelse(255, 0).cast("uchar"))
    if orientation:
        image = image.copy()
        image.set_type(pyvips.GValue.gint_type, "orientation", orientation)
    ext = os.path.splitext(path)[1].lower()
    if ext in (".jpg", ".jpeg"):
        image.jpegsave(path, Q=q, keep="exif" if orientation else "none")
    else:
        image.write_to_file(path)
    return path


@pytest.fixture
def photo(tmp_path):
    def factory(name="photo.jpg", **kwargs):
        path = tmp_path / "in" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return make_photo(str(path), **kwargs)
    return factory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tcp_endpoints() -> dict[str, str]:
    return {k: f"tcp://127.0.0.1:{free_port()}" for k in ("jobs", "results", "metrics")}


def python_cmd(*args) -> list[str]:
    return [sys.executable, *args]


def run_launch(args, *, timeout=180, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(python_cmd(os.path.join(ROOT, "launch.py"), *map(str, args)),
                          cwd=cwd, capture_output=True, text=True, timeout=timeout)


def start(module: str, *args, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": ROOT}
    popen.setdefault("cwd", ROOT)
    return subprocess.Popen(python_cmd("-m", module, *map(str, args)), env=env, **popen)


def stop(*procs, timeout=10.0) -> None:
    """Everything a test starts, it stops (by pid)."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def logs_of(tmp_path, component: str) -> str:
    """Every log line ``component`` processes wrote under ``tmp_path/logs``."""
    return "".join(p.read_text() for p in (tmp_path / "logs").glob(f"{component}-*.jsonl"))


def wait_for_results(proc: subprocess.Popen, path, lines: int = 1, timeout: float = 60) -> None:
    """Until the results file ``path`` has ``lines`` lines; fails if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while not path.exists() or len(path.read_text().splitlines()) < lines:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)


def components_of(launcher: subprocess.Popen, component: str = "") -> list[int]:
    """The live processes ``launcher`` forked, named ``imgbus-<component>``
    (all of them when empty), found even after the launcher is gone: a forked
    process keeps the launcher's command line, which names this test's files."""
    cmdline = b"".join(os.fsencode(str(arg)) + b"\0" for arg in launcher.args)
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == launcher.pid:
            continue
        try:
            with open(f"/proc/{entry}/comm") as f:
                name = f.read().strip()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if cmd == cmdline and (not component or name == f"imgbus-{component}"):
            pids.append(int(entry))
    return pids


@pytest.fixture(scope="session")
def corpus() -> str:
    """The 51 real wallpapers, fetched once into a cache outside the repo."""
    have = [f for f in os.listdir(CORPUS_CACHE)] if os.path.isdir(CORPUS_CACHE) else []
    if len(have) < 51:
        script = os.path.join(SHARED, "corpus", "fetch-wallpapers.sh")
        if not os.path.isfile(script):
            pytest.skip(f"corpus not cached in {CORPUS_CACHE} and no fetch script at {script}")
        subprocess.run(["bash", script, CORPUS_CACHE], check=True, timeout=900)
    return CORPUS_CACHE


@pytest.fixture(scope="session")
def cases_dir() -> str:
    path = os.path.join(SHARED, "cases")
    if not os.path.isfile(os.path.join(path, "check.py")):
        pytest.skip(f"conformance suite not found at {path} (set IMGBUS_SHARED)")
    return path
