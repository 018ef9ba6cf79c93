"""Several hosts on real, separate network stacks: the broker in one network
namespace, sidecars and a reporter in another, joined only by a veth pair,
with CURVE on. Needs root and iproute2 (.ci/run installs it); the namespaces
are this test's own and are removed afterwards, also on failure.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from broker.security import make_keys
from conftest import ROOT, make_photo

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("unshare"),
    reason="needs root, ip (iproute2) and unshare",
)

PORTS = {"jobs": 5557, "results": 5558, "metrics": 5559}


def sh(*cmd):
    subprocess.run(cmd, check=True, capture_output=True, timeout=30)


@pytest.fixture
def hosts():
    """Two namespaces, 'broker' and 'workers', on a private /24 of their own."""
    tag = f"{os.getpid() % 10000}"
    net = f"10.213.{os.getpid() % 250}"
    ns = {"broker": f"imgbus-b{tag}", "workers": f"imgbus-w{tag}"}
    veth = (f"ib{tag}", f"iw{tag}")
    try:
        for name in ns.values():
            sh("ip", "netns", "add", name)
        sh("ip", "link", "add", veth[0], "type", "veth", "peer", "name", veth[1])
        for (role, name), dev, addr in zip(ns.items(), veth, (f"{net}.1", f"{net}.2")):
            sh("ip", "link", "set", dev, "netns", name)
            sh("ip", "-n", name, "addr", "add", f"{addr}/24", "dev", dev)
            sh("ip", "-n", name, "link", "set", dev, "up")
            sh("ip", "-n", name, "link", "set", "lo", "up")
        yield {"ns": ns, "broker_ip": f"{net}.1"}
    finally:
        for name in ns.values():
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def in_ns(ns, *cmd, hide=None, **popen):
    """Start ``cmd`` inside namespace ``ns``; ``hide`` mounts an empty tmpfs over that folder first."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    if hide:
        inner = f"mount -t tmpfs imgbus-empty {hide} && exec " + " ".join(f"'{c}'" for c in map(str, cmd))
        cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", inner]
    return subprocess.Popen(["ip", "netns", "exec", ns, *map(str, cmd)], cwd=ROOT, env=env, **popen)


def endpoints(ip):
    return {k: f"tcp://{ip}:{p}" for k, p in PORTS.items()}


def photos(folder, n, width, height):
    folder.mkdir()
    for i in range(n):
        make_photo(str(folder / f"p{i:02d}.jpg"), width, height)
    return folder


def broker_in(ns, ep, *args, **popen):
    """The broker in namespace ``ns``, bound to the endpoints ``ep``."""
    return in_ns(ns, sys.executable, "-m", "broker", *args, "--jobs-endpoint", ep["jobs"],
                 "--results-endpoint", ep["results"], "--metrics-endpoint", ep["metrics"], **popen)


def stop_all(procs):
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


GARBAGE = r"""
import os, socket, sys, time, zmq
ip = sys.argv[1]
with zmq.Context() as ctx:
    socks = []
    for port, kind in ((5557, zmq.DEALER), (5558, zmq.PUSH), (5559, zmq.SUB)):
        s = ctx.socket(kind); s.linger = 0; s.connect(f"tcp://{ip}:{port}"); socks.append(s)
    for frames in ([b"ready", b'{"v":1,"worker_id":"x","host":"h","pid":1,"credit":9}'],
                   [b"done", b'{"v":1,"job_id":"j000001","batch_id":"b","worker_id":"x","ok":true}'],
                   [os.urandom(100)]):
        socks[0].send_multipart(frames); socks[1].send_multipart(frames)
    time.sleep(1)
for port in (5557, 5558, 5559):   # raw bytes, not even ZMTP
    for blob in (os.urandom(4096), b"\xff" * 10 + b"\x7f" + os.urandom(64), b"GET / HTTP/1.0\r\n\r\n"):
        try:
            with socket.create_connection((ip, port), timeout=2) as c:
                c.sendall(blob)
                time.sleep(0.1)
        except OSError:
            pass
print("garbage sent")
"""


def test_curve_batch_across_namespaces_in_bytes_transport(hosts, tmp_path):
    ns, ip = hosts["ns"], hosts["broker_ip"]
    ep = endpoints(ip)
    src = photos(tmp_path / "in", 12, 800, 600)
    keys, stranger = tmp_path / "keys", tmp_path / "stranger"
    make_keys(str(keys), ["w1", "w2", "reporter"])
    make_keys(str(stranger), ["w3"])
    logs = tmp_path / "logs"
    report = tmp_path / "r.json"
    broker = broker_in(ns["broker"], ep, src, "-o", tmp_path / "out", "--transport", "bytes", "--format", "webp",
                       "--key", keys / "broker.key_secret",
                   "--authorized-keys", keys / "authorized", "--min-workers", 2, "--linger", 5,
                   "--report-json", report, "--results-jsonl", tmp_path / "res.jsonl", "--log-dir", logs)
    procs = [broker]
    try:
        time.sleep(1.0)
        # Garbage from the other host to every port, before any worker is there.
        garbage = subprocess.run(["ip", "netns", "exec", ns["workers"], sys.executable, "-c", GARBAGE, ip],
                                 capture_output=True, text=True, timeout=60)
        assert "garbage sent" in garbage.stdout, garbage.stderr
        # Where the workers run, the input folder is empty.
        peek = in_ns(ns["workers"], "ls", "-A", src, hide=src, stdout=subprocess.PIPE, text=True)
        assert peek.communicate(timeout=30)[0] == "" and os.listdir(src)
        assert broker.poll() is None
        client = ["--connect", ep["jobs"], "--results", ep["results"], "--broker-key", keys / "broker.key",
                  "--log-dir", logs]
        # An unauthorised worker (valid key pair, not in the authorised folder).
        procs.append(in_ns(ns["workers"], sys.executable, "-m", "sidecar", *client[:4],
                           "--key", stranger / "w3.key_secret", "--broker-key", keys / "broker.key",
                           "--log-dir", logs, hide=src))
        # Two real workers that cannot see the input folder at all.
        workers = [in_ns(ns["workers"], sys.executable, "-m", "sidecar", *client, "--key", keys / f"{w}.key_secret",
                         hide=src) for w in ("w1", "w2")]
        procs += workers
        reporter = in_ns(ns["workers"], sys.executable, "-m", "reporter", "--connect", ep["metrics"],
                         "--key", keys / "reporter.key_secret", "--broker-key", keys / "broker.key",
                         "--log-dir", logs, stdout=subprocess.PIPE, text=True)
        procs.append(reporter)
        out, _ = reporter.communicate(timeout=120)
        assert broker.wait(30) == 0
    finally:
        stop_all(procs)
    r = json.loads(report.read_text())
    assert (r["tasks"]["total"], r["tasks"]["completed"], r["tasks"]["failed"]) == (12, 12, 0)
    assert r["tasks"]["duplicates_ignored"] == 0
    ids = {w["id"] for w in r["workers"]["per_worker"]}
    assert len(ids) == 2 and all(w["tasks"] > 0 for w in r["workers"]["per_worker"])
    assert ids == {f"{os.uname().nodename}-{w.pid}" for w in workers}
    assert "Finished/total:        12/12" in out
    for w in r["workers"]["per_worker"]:
        assert w["id"] in out
    assert len(os.listdir(tmp_path / "out")) == 12


def test_path_transport_across_namespaces(hosts, tmp_path):
    ns, ip = hosts["ns"], hosts["broker_ip"]
    ep = endpoints(ip)
    src = photos(tmp_path / "in", 6, 640, 480)
    keys = tmp_path / "keys"
    make_keys(str(keys), ["w"])
    logs = tmp_path / "logs"
    broker = broker_in(ns["broker"], ep, src, "-o", tmp_path / "out", "--key", keys / "broker.key_secret",
                   "--authorized-keys", keys / "authorized", "--linger", 0,
                   "--report-json", tmp_path / "r.json", "--log-dir", logs)
    worker = in_ns(ns["workers"], sys.executable, "-m", "sidecar", "--connect", ep["jobs"],
                   "--key", keys / "w.key_secret", "--broker-key", keys / "broker.key",
                   "--input-root", src, "--output-root", tmp_path / "out", "--log-dir", logs)
    try:
        assert broker.wait(60) == 0
    finally:
        stop_all([broker, worker])
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["tasks"]["completed"] == 6 and r["workers"]["total"] == 1


def test_insecure_flag_is_needed_and_loud_off_loopback(hosts, tmp_path):
    ns, ip = hosts["ns"], hosts["broker_ip"]
    ep = endpoints(ip)
    photo = make_photo(str(tmp_path / "a.jpg"))
    common = [photo, "-o", tmp_path / "out", "--log-dir", tmp_path / "logs", "--no-worker-timeout", 1, "--linger", 0]
    refused = broker_in(ns["broker"], ep, *common, stderr=subprocess.PIPE, text=True)
    _, err = refused.communicate(timeout=30)
    assert refused.returncode == 2 and "without CURVE keys" in err
    loud = broker_in(ns["broker"], ep, *common, "--insecure", stderr=subprocess.PIPE, text=True)
    _, err = loud.communicate(timeout=30)
    assert "INSECURE" in err and loud.returncode == 1   # no worker came: aborted, not refused
