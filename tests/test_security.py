"""CURVE keys, the loopback rule, and the bytes transport, on loopback TCP."""

import json
import os
import stat
import subprocess
import sys
import time

import pytest
import zmq

from broker.security import SecurityError, is_loopback, load_secret, make_keys
from conftest import ROOT, make_photo, start, stop, tcp_endpoints


@pytest.mark.parametrize("endpoint, expected", [
    ("tcp://127.0.0.1:5557", True), ("tcp://127.3.2.1:1", True), ("tcp://localhost:5557", True),
    ("tcp://[::1]:5557", True), ("ipc:///tmp/x", True),
    ("tcp://0.0.0.0:5557", False), ("tcp://*:5557", False), ("tcp://10.1.2.3:5557", False),
    ("tcp://example.org:5557", False),
])
def test_is_loopback(endpoint, expected):
    assert is_loopback(endpoint) is expected


def test_keys_command_makes_owner_only_secrets_and_never_overwrites(tmp_path):
    keys = tmp_path / "keys"
    proc = subprocess.run([sys.executable, "-m", "broker", "keys", str(keys)], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "--authorized-keys" in proc.stdout
    for name in ("broker", "sidecar", "reporter"):
        assert stat.S_IMODE(os.stat(keys / f"{name}.key_secret").st_mode) == 0o600
        assert (keys / f"{name}.key").exists()
    assert sorted(os.listdir(keys / "authorized")) == ["reporter.key", "sidecar.key"]
    before = (keys / "broker.key_secret").read_bytes()
    assert make_keys(str(keys), ["sidecar", "host2"]) == [str(keys / "host2.key"), str(keys / "host2.key_secret")]
    assert (keys / "broker.key_secret").read_bytes() == before
    assert (keys / "authorized" / "host2.key").exists()


def test_secret_readable_by_others_is_refused(tmp_path):
    make_keys(str(tmp_path), ["w"])
    secret = tmp_path / "w.key_secret"
    os.chmod(secret, 0o644)
    with pytest.raises(SecurityError, match="readable by others.*chmod 600"):
        load_secret(str(secret))


@pytest.mark.parametrize("module, args", [
    ("broker", ["--jobs-endpoint", "tcp://0.0.0.0:5557"]),
    ("sidecar", ["--connect", "tcp://192.0.2.10:5557"]),
    ("reporter", ["--connect", "tcp://192.0.2.10:5559"]),
])
def test_non_loopback_without_keys_refuses_to_start(tmp_path, module, args):
    photo = make_photo(str(tmp_path / "a.jpg"))
    extra = [photo, "-o", str(tmp_path / "out")] if module == "broker" else []
    proc = subprocess.run([sys.executable, "-m", module, *extra, *args, "--log-dir", str(tmp_path / "logs")],
                          cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "without CURVE keys" in proc.stderr and "--insecure" in proc.stderr


@pytest.fixture
def curve(tmp_path):
    keys = tmp_path / "keys"
    make_keys(str(keys), ["sidecar", "reporter"])
    make_keys(str(tmp_path / "stranger"), ["sidecar"])      # a valid key pair nobody authorised
    return keys


def photos(folder, n):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        make_photo(str(folder / f"p{i}.jpg"), 320, 240)
    return folder


def test_curve_admits_authorised_clients_only(tmp_path, curve):
    ep = tcp_endpoints()
    src = photos(tmp_path / "in", 8)
    logs = tmp_path / "logs"
    broker = start("broker", src, "-o", tmp_path / "out", "--jobs-endpoint", ep["jobs"],
                   "--results-endpoint", ep["results"], "--metrics-endpoint", ep["metrics"],
                   "--key", curve / "broker.key_secret", "--authorized-keys", curve / "authorized",
                   "--report-json", tmp_path / "r.json", "--log-dir", logs, "--linger", 5, "--min-workers", 1)
    common = ["--connect", ep["jobs"], "--results", ep["results"], "--log-dir", logs,
              "--input-root", tmp_path, "--output-root", tmp_path]
    procs = [broker]
    try:
        # A stranger first: it holds a valid key pair, but not an authorised one.
        stranger = start("sidecar", *common, "--key", tmp_path / "stranger" / "sidecar.key_secret",
                         "--broker-key", curve / "broker.key")
        keyless_reporter = start("reporter", "--connect", ep["metrics"], "--log-dir", logs,
                                 stdout=subprocess.PIPE, text=True)
        procs += [stranger, keyless_reporter]
        # Forged traffic from a client without keys: never reaches the broker.
        with zmq.Context() as ctx, ctx.socket(zmq.PUSH) as push:
            push.linger = 0
            push.connect(ep["results"])
            forged = {"v": 1, "job_id": "j000001", "batch_id": "x", "worker_id": "forger", "ok": True}
            push.send_multipart([b"done", json.dumps(forged).encode()])
            time.sleep(1.5)
        assert broker.poll() is None          # nothing could be dispatched: no authorised worker yet
        worker = start("sidecar", *common, "--key", curve / "sidecar.key_secret", "--broker-key", curve / "broker.key")
        reporter = start("reporter", "--connect", ep["metrics"], "--key", curve / "reporter.key_secret",
                         "--broker-key", curve / "broker.key", "--log-dir", logs, stdout=subprocess.PIPE, text=True)
        procs += [worker, reporter]
        out, _ = reporter.communicate(timeout=60)
        assert "Finished/total:        8/8" in out
        assert broker.wait(30) == 0
        r = json.loads((tmp_path / "r.json").read_text())
        ids = [w["id"] for w in r["workers"]["per_worker"]]
        assert ids == [f"{os.uname().nodename}-{worker.pid}"]
        assert r["tasks"]["completed"] == 8 and r["tasks"]["duplicates_ignored"] == 0
        keyless_reporter.terminate()
        silent, _ = keyless_reporter.communicate(timeout=10)
        assert "Finished/total" not in silent   # the keyless reporter never saw a thing
        # The stranger says why it gets nothing, once a socket (libzmq keeps retrying).
        told = (logs / f"sidecar-{stranger.pid}.jsonl").read_text()
        for port in ("jobs", "results"):
            assert told.count(f"handshake ended: it is not a broker's {port} port") == 1, told
    finally:
        stop(*procs)


def test_bytes_transport_needs_no_file_access_on_the_worker(tmp_path):
    ep = tcp_endpoints()
    src = photos(tmp_path / "in", 6)
    (src / "broken.jpg").write_text("<html>not an image</html>")
    nowhere = tmp_path / "worker-sees-nothing"
    nowhere.mkdir()
    broker = start("broker", src, "-o", tmp_path / "out", "--format", "webp", "--transport", "bytes",
                   "--jobs-endpoint", ep["jobs"], "--results-endpoint", ep["results"],
                   "--metrics-endpoint", ep["metrics"], "--report-json", tmp_path / "r.json",
                   "--results-jsonl", tmp_path / "res.jsonl", "--log-dir", tmp_path / "logs", "--linger", 0)
    # Confined to an empty folder: in the path transport every job would be refused.
    worker = start("sidecar", "--connect", ep["jobs"], "--results", ep["results"], "--log-dir", tmp_path / "logs",
                   "--input-root", nowhere, "--output-root", nowhere, cwd=nowhere)
    try:
        assert broker.wait(60) == 1
        r = json.loads((tmp_path / "r.json").read_text())
        assert (r["tasks"]["completed"], r["tasks"]["failed"]) == (6, 1)
        assert "not an image" in r["failures"][0]["error"]
        lines = [json.loads(l) for l in open(tmp_path / "res.jsonl")]
        for line in lines:
            if line["ok"]:
                assert os.path.getsize(line["output"]) == line["out_bytes"]
        assert r["bytes"]["out"] == sum(os.path.getsize(tmp_path / "out" / f) for f in os.listdir(tmp_path / "out"))
        assert os.listdir(nowhere) == []
    finally:
        stop(broker, worker)
