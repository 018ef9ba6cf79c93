"""Each component started on its own over TCP loopback, in awkward orders."""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import time

import pytest
import pyvips
import zmq

from conftest import free_port, logs_of, make_photo, start, stop, tcp_endpoints, wait_for_results


def folder_of_photos(root, n, size=(400, 300)):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        make_photo(str(root / f"p{i:02d}.jpg"), *size)
    return root


def broker_cmd(ep, src, out, tmp_path, *extra):
    return ["broker", src, "-o", out, "--jobs-endpoint", ep["jobs"], "--results-endpoint", ep["results"],
            "--metrics-endpoint", ep["metrics"], "--report-json", tmp_path / "r.json",
            "--results-jsonl", tmp_path / "res.jsonl", "--log-dir", tmp_path / "logs", "--linger", 3, *extra]


def sidecar(ep, tmp_path, *extra):
    return start("sidecar", "--connect", ep["jobs"], "--results", ep["results"], "--log-dir", tmp_path / "logs",
                 "--input-root", tmp_path / "in", "--output-root", tmp_path / "out", *extra)


def test_workers_first_reporter_late(tmp_path):
    ep = tcp_endpoints()
    src = folder_of_photos(tmp_path / "in", 12)
    procs = [sidecar(ep, tmp_path) for _ in range(2)]
    try:
        time.sleep(1.0)  # workers wait for a broker that is not there yet
        broker = start(*broker_cmd(ep, src, tmp_path / "out", tmp_path, "--min-workers", 2, "--linger", 10))
        procs.append(broker)
        deadline = time.monotonic() + 60
        while not (tmp_path / "r.json").exists():  # the batch is over...
            assert time.monotonic() < deadline and broker.poll() is None
            time.sleep(0.05)
        # ...but the broker lingers with its final snapshot: a reporter
        # started only now still prints the complete report.
        reporter = start("reporter", "--connect", ep["metrics"], "--log-dir", tmp_path / "logs",
                         stdout=-1, stderr=-1, text=True)
        procs.append(reporter)
        out, _ = reporter.communicate(timeout=30)
        assert reporter.returncode == 0
        assert "Finished/total:        12/12" in out
        r = json.loads((tmp_path / "r.json").read_text())
        assert r["workers"]["total"] == 2 and sum(w["tasks"] for w in r["workers"]["per_worker"]) == 12
        assert len(os.listdir(tmp_path / "out")) == 12
        assert broker.wait(15) == 0
    finally:
        stop(*procs)


def test_workers_started_half_a_second_apart_all_get_a_share(tmp_path):
    """40 small images finish in about a second: the broker waits for the pool it was told about."""
    ep = tcp_endpoints()
    src = folder_of_photos(tmp_path / "in", 40, (640, 480))
    broker = start(*broker_cmd(ep, src, tmp_path / "out", tmp_path, "--resize", "longest:320",
                               "--format", "webp", "--min-workers", 4))
    workers = []
    try:
        for _ in range(4):
            workers.append(sidecar(ep, tmp_path))
            time.sleep(0.5)
        assert broker.wait(120) == 0
        per = json.loads((tmp_path / "r.json").read_text())["workers"]["per_worker"]
        tasks = [w["tasks"] for w in per]
        assert len(tasks) == 4 and sum(tasks) == 40
        assert min(tasks) > 0 and max(tasks) <= 20, tasks
    finally:
        stop(broker, *workers)


def test_worker_joining_mid_batch_is_served_at_once(tmp_path):
    ep = tcp_endpoints()
    src = folder_of_photos(tmp_path / "in", 16, (2400, 1800))
    broker = start(*broker_cmd(ep, src, tmp_path / "out", tmp_path, "--format", "png", "--quality", 100))
    workers = [sidecar(ep, tmp_path, "--credit", 1)]
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "res.jsonl").exists() or not (tmp_path / "res.jsonl").read_text():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        workers.append(sidecar(ep, tmp_path, "--credit", 1))   # the batch is already running
        assert broker.wait(120) == 0
        lines = [json.loads(l) for l in open(tmp_path / "res.jsonl")]
        late = workers[1].pid
        late_jobs = [l for l in lines if l["worker_id"].endswith(f"-{late}")]
        assert len(late_jobs) >= 3, [l["worker_id"] for l in lines]
    finally:
        stop(broker, *workers)


def test_garbage_on_every_broker_socket_changes_no_count(tmp_path):
    ep = tcp_endpoints()
    src = folder_of_photos(tmp_path / "in", 6)
    broker = start(*broker_cmd(ep, src, tmp_path / "out", tmp_path))
    worker = None
    try:
        with zmq.Context() as ctx:
            socks = []
            for name, kind in (("jobs", zmq.DEALER), ("results", zmq.PUSH), ("metrics", zmq.SUB)):
                s = ctx.socket(kind)
                s.linger = 0
                s.connect(ep[name])
                socks.append(s)
            dealer, push, _ = socks
            garbage = [[b"x"], [b"job", b"{"], [b"ready", b"[]"], [b"done", b'{"v":1}'],
                       [b"done", b'{"v":1,"job_id":"j000001","batch_id":"nope","worker_id":"w","ok":true}'],
                       [b"bye", b'{"v":1,"worker_id":5,"reason":"x"}'], [os.urandom(64)], [b"\0" * 10, b"z", b"z"]]
            for frames in garbage:
                dealer.send_multipart(frames)
                push.send_multipart(frames)
            # A forged ready under someone else's id is refused too.
            dealer.send_multipart([b"ready", b'{"v":1,"worker_id":"evil","host":"h","pid":1,"credit":9}'])
            # Oversized message: refused by the socket's size limit.
            push.send_multipart([b"done", b"x" * (5 * 1024 * 1024)])
            time.sleep(0.5)
            for s in socks:
                s.close()
        worker = sidecar(ep, tmp_path)
        assert broker.wait(60) == 0
        r = json.loads((tmp_path / "r.json").read_text())
        assert (r["tasks"]["total"], r["tasks"]["completed"], r["tasks"]["failed"]) == (6, 6, 0)
        assert r["workers"]["total"] == 1
        log = "".join(open(tmp_path / "logs" / n).read() for n in os.listdir(tmp_path / "logs") if n.startswith("broker"))
        assert "dropped a malformed message" in log
    finally:
        stop(broker, *(p for p in [worker] if p))


def test_broker_aborts_when_every_worker_is_gone(tmp_path):
    ep = tcp_endpoints()
    src = folder_of_photos(tmp_path / "in", 30, (2000, 1500))
    broker = start(*broker_cmd(ep, src, tmp_path / "out", tmp_path, "--no-worker-timeout", 3,
                               "--heartbeat-timeout", 2, "--format", "png", "--quality", 100))
    worker = sidecar(ep, tmp_path)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(tmp_path / "res.jsonl") or os.path.getsize(tmp_path / "res.jsonl") == 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        worker.kill()
        worker.wait()
        t0 = time.monotonic()
        code = broker.wait(30)
        assert code == 1
        assert time.monotonic() - t0 < 15
        r = json.loads((tmp_path / "r.json").read_text())
        assert r["state"] == "aborted"
        assert r["tasks"]["completed"] + r["tasks"]["failed"] == 30
        assert any("no live worker" in f["error"] for f in r["failures"])
        assert r["workers"]["dead"] == [r["workers"]["per_worker"][0]["id"]]
    finally:
        stop(broker, worker)


def test_worker_refuses_jobs_outside_its_folders(tmp_path):
    """Even a job the broker accepts cannot make a worker read or write elsewhere."""
    ep = tcp_endpoints()
    src = folder_of_photos(tmp_path / "in", 2)
    secret = tmp_path / "secret.jpg"
    make_photo(str(secret))
    link = src / "link-to-secret.jpg"
    link.symlink_to(secret)
    (tmp_path / "elsewhere-dir" / "deeper").mkdir(parents=True)
    make_photo(str(tmp_path / "elsewhere-dir" / "p00.jpg"))
    (src / "up").symlink_to(tmp_path / "elsewhere-dir" / "deeper")
    dotdot = f"{src}/up/../p00.jpg"   # lexically in/p00.jpg; really elsewhere-dir/p00.jpg
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join(json.dumps(j) for j in [
        {"job": "ok", "input": str(src / "p00.jpg"), "output": str(tmp_path / "out" / "ok.jpg")},
        {"job": "passwd", "input": "/etc/passwd", "output": str(tmp_path / "out" / "passwd.jpg")},
        {"job": "secret", "input": str(secret), "output": str(tmp_path / "out" / "secret.jpg")},
        {"job": "via-link", "input": str(link), "output": str(tmp_path / "out" / "link.jpg")},
        {"job": "dotdot", "input": dotdot, "output": str(tmp_path / "out" / "dotdot.jpg")},
        {"job": "escape", "input": str(src / "p01.jpg"), "output": str(tmp_path / "elsewhere" / "x.jpg")},
    ]) + "\n")
    broker = start("broker", "--jobs", jobs, "--jobs-endpoint", ep["jobs"], "--results-endpoint", ep["results"],
                   "--metrics-endpoint", ep["metrics"], "--results-jsonl", tmp_path / "res.jsonl",
                   "--log-dir", tmp_path / "logs", "--linger", 0, "--no-worker-timeout", 1)
    worker = sidecar(ep, tmp_path)
    try:
        assert broker.wait(60) == 1
        lines = {l["job_id"]: l for l in map(json.loads, open(tmp_path / "res.jsonl"))}
        assert lines["ok"]["ok"]
        for job in ("passwd", "secret", "via-link", "dotdot"):
            assert "outside this worker's input folders" in lines[job]["error"]
        assert "outside this worker's output folders" in lines["escape"]["error"]
        assert os.listdir(tmp_path / "out") == ["ok.jpg"] and not (tmp_path / "elsewhere").exists()
    finally:
        stop(broker, worker)


@pytest.mark.parametrize("good_one", ["with it", "3 s later"])
def test_a_sidecar_started_in_the_wrong_folder_leaves_the_batch_to_the_others(tmp_path, good_one):
    """It refuses every job in a millisecond; none may fail for that while a
    good worker can do it, even one that joins after it has refused them all."""
    ep = tcp_endpoints()
    src = folder_of_photos(tmp_path / "in", 16, (1600, 1200))
    (tmp_path / "elsewhere").mkdir()
    broker = start(*broker_cmd(ep, src, tmp_path / "out", tmp_path, "--linger", 0,
                               "--min-workers", 2 if good_one == "with it" else 1))
    wrong = start("sidecar", "--connect", ep["jobs"], "--results", ep["results"], "--log-dir", tmp_path / "logs",
                  cwd=tmp_path / "elsewhere")
    procs = [broker, wrong]
    try:
        if good_one != "with it":
            time.sleep(3)
            assert broker.poll() is None
        procs.append(sidecar(ep, tmp_path))
        assert broker.wait(120) == 0
        lines = [json.loads(line) for line in open(tmp_path / "res.jsonl")]
        assert len(lines) == 16 and all(line["ok"] for line in lines)
        assert sorted(os.listdir(tmp_path / "out")) == sorted(f"p{i:02d}.jpg" for i in range(16))
        per = {w["id"]: w for w in json.loads((tmp_path / "r.json").read_text())["workers"]["per_worker"]}
        assert len(per) == 2
        idle, busy = sorted(per.values(), key=lambda w: w["tasks"])
        assert (idle["tasks"], busy["tasks"]) == (0, 16)
        assert idle["refused"] >= (16 if good_one != "with it" else 1)
        assert busy["refused"] == 0 and idle["failures"] == 0
        # Its log says what to do about it.
        assert re.search(r"outside this worker's input folders \(.*elsewhere\); start the sidecar in that "
                         r"folder or give it --input-root", logs_of(tmp_path, "sidecar"))
    finally:
        stop(*procs)


def test_a_job_no_worker_may_reach_fails_alone(tmp_path):
    """Refused by every worker (outside all their folders), a batch-file job
    fails once no other worker has come for it; the rest is done."""
    ep = tcp_endpoints()
    src = folder_of_photos(tmp_path / "in", 6)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps({"job": f"p{i}", "input": str(src / f"p{i:02d}.jpg"),
                                        "output": str(tmp_path / "out" / f"p{i}.jpg")}) + "\n" for i in range(6))
                    + json.dumps({"job": "passwd", "input": "/etc/passwd", "output": str(tmp_path / "out" / "x.jpg")}))
    broker = start("broker", "--jobs", jobs, "--jobs-endpoint", ep["jobs"], "--results-endpoint", ep["results"],
                   "--metrics-endpoint", ep["metrics"], "--results-jsonl", tmp_path / "res.jsonl",
                   "--report-json", tmp_path / "r.json", "--min-workers", 2, "--no-worker-timeout", 2,
                   "--log-dir", tmp_path / "logs", "--linger", 0)
    workers = [sidecar(ep, tmp_path) for _ in range(2)]
    try:
        assert broker.wait(60) == 1
        lines = {line["job_id"]: line for line in map(json.loads, open(tmp_path / "res.jsonl"))}
        assert len(lines) == 7 and all(lines[f"p{i}"]["ok"] for i in range(6))
        assert lines["passwd"]["error"].startswith("no worker could reach it within 2 s (--no-worker-timeout): "
                                                   "input path /etc/passwd is outside this worker's input folders")
        report = json.loads((tmp_path / "r.json").read_text())
        assert report["state"] == "done"
        assert report["tasks"]["completed"] == 6 and report["tasks"]["failed"] == 1
        assert "every live worker has refused the 1 job(s) left" in logs_of(tmp_path, "broker")
    finally:
        stop(broker, *workers)


def test_ctrl_c_to_a_sidecar_busy_with_a_large_image_says_so_at_once(tmp_path):
    """The main thread hears of the signal only when libvips returns; the log must not wait for that."""
    ep = tcp_endpoints()
    (tmp_path / "in").mkdir()
    make_photo(str(tmp_path / "in" / "big.jpg"), 5000, 3750)
    broker = start(*broker_cmd(ep, tmp_path / "in", tmp_path / "out", tmp_path, "--format", "webp", "--linger", 0))
    worker = sidecar(ep, tmp_path)
    try:
        deadline = time.monotonic() + 30
        while "dispatching 1 jobs" not in logs_of(tmp_path, "broker"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.3)
        worker.send_signal(signal.SIGINT)
        signalled = time.monotonic()
        while "stop signal: finishing job" not in logs_of(tmp_path, "sidecar"):
            assert time.monotonic() - signalled < 2, "nothing logged on the stop signal"
            time.sleep(0.05)
        assert worker.poll() is None and not (tmp_path / "out" / "big.webp").exists(), "image done too soon to tell"
        # The image in hand is finished, reported and written; then the worker stops.
        assert worker.wait(60) == 0 and broker.wait(30) == 0
        assert (tmp_path / "out" / "big.webp").exists()
    finally:
        stop(broker, worker)


def test_a_sidecar_whose_broker_is_killed_drops_the_jobs_queued_at_it(tmp_path):
    """No broker is left to recall them or to count them: they must not be written."""
    ep = tcp_endpoints()
    src = folder_of_photos(tmp_path / "in", 40, (1600, 1200))
    broker = start(*broker_cmd(ep, src, tmp_path / "out", tmp_path, "--format", "webp"))
    worker = sidecar(ep, tmp_path, "--credit", 6)
    try:
        wait_for_results(broker, tmp_path / "res.jsonl", lines=1)
        recorded = len((tmp_path / "res.jsonl").read_text().splitlines())
        broker.kill()
        broker.wait()
        deadline = time.monotonic() + 30
        while not (found := re.search(r"lost the connection to the broker: dropped (\d+) queued",
                                      logs_of(tmp_path, "sidecar"))):
            assert time.monotonic() < deadline, "the sidecar did not notice"
            time.sleep(0.05)
        assert int(found.group(1)) >= 3
        time.sleep(2)  # what it still wrote, it has written by now
        written = len(os.listdir(tmp_path / "out"))
        # At most the image in hand, and one that finished as we killed.
        assert written <= recorded + 2, (written, recorded)
        assert worker.poll() is None  # it waits for the next broker
    finally:
        stop(broker, worker)


def test_a_sidecar_or_reporter_pointed_at_the_wrong_port_says_so(tmp_path):
    """libzmq fails the handshake without a word (and never retries): the log must say why nothing happens."""
    ep = tcp_endpoints()
    src = folder_of_photos(tmp_path / "in", 1)
    broker = start(*broker_cmd(ep, src, tmp_path / "out", tmp_path, "--no-worker-timeout", 30))
    worker = sidecar({**ep, "jobs": ep["metrics"]}, tmp_path)  # the metrics port: a PUB socket
    # Jobs right, results wrong: it must not take jobs it could never report.
    unheard = sidecar({**ep, "results": ep["metrics"]}, tmp_path)
    reporter = start("reporter", "--connect", ep["jobs"], "--log-dir", tmp_path / "logs")  # a ROUTER
    try:
        for component, port, peer in (("sidecar", "metrics", "jobs"), ("sidecar", "metrics", "results"),
                                      ("reporter", "jobs", "metrics")):
            said = f"{ep[port]} closed the connection before the ZeroMQ handshake ended: it is not a broker's {peer} port"
            deadline = time.monotonic() + 20
            while said not in logs_of(tmp_path, component):
                assert time.monotonic() < deadline, f"the {component} says nothing of the failing {peer} handshake"
                time.sleep(0.1)
        time.sleep(1)
        assert not (tmp_path / "out").exists() and "joined" not in logs_of(tmp_path, "broker")
    finally:
        stop(broker, worker, unheard, reporter)


def test_broker_gives_up_when_no_worker_ever_joins(tmp_path):
    ep = tcp_endpoints()
    src = folder_of_photos(tmp_path / "in", 3)
    t0 = time.monotonic()
    broker = start(*broker_cmd(ep, src, tmp_path / "out", tmp_path, "--no-worker-timeout", 2, "--linger", 0))
    try:
        assert broker.wait(30) == 1
        assert time.monotonic() - t0 < 15
        r = json.loads((tmp_path / "r.json").read_text())
        assert r["state"] == "aborted" and r["tasks"]["failed"] == 3
        assert all("no worker joined within 2 s" in f["error"] for f in r["failures"])
    finally:
        stop(broker)


def test_a_job_too_large_for_its_worker_fails_alone(tmp_path):
    """The broker sends images up to 30 MB, the sidecar takes 1 MB. Sent, the
    big job would be dropped by libzmq, which then cuts the worker off for
    good; the broker fails it instead, and the rest of the batch finishes."""
    ep = tcp_endpoints()
    src = tmp_path / "in"
    src.mkdir()
    noise = pyvips.Image.gaussnoise(2000, 1500, sigma=80)
    noise.bandjoin([noise, noise]).cast("uchar").pngsave(str(src / "big.png"), compression=1)
    # Over what the sidecar's socket accepts: 1 MB of image plus the 4 MB message allowance.
    assert os.path.getsize(src / "big.png") > 5_500_000
    make_photo(str(src / "small.jpg"), 200, 150)
    broker = start(*broker_cmd(ep, src, tmp_path / "out", tmp_path, "--transport", "bytes",
                               "--max-image-mb", 30, "--max-attempts", 2, "--linger", 0))
    procs = [broker, sidecar(ep, tmp_path, "--max-image-mb", 1)]
    try:
        assert broker.wait(60) == 1
        r = json.loads((tmp_path / "r.json").read_text())
        assert (r["tasks"]["completed"], r["tasks"]["failed"]) == (1, 1)
        failure, = r["failures"]
        assert failure["input"].endswith("big.png")
        assert "larger than worker" in failure["error"] and "--max-image-mb" in failure["error"]
        assert os.listdir(tmp_path / "out") == ["small.jpg"]
    finally:
        stop(*procs)


def test_a_reporter_with_no_broker_says_it_is_waiting(tmp_path):
    import subprocess

    ep = tcp_endpoints()
    reporter = start("reporter", "--connect", ep["metrics"], "--log-dir", tmp_path / "logs",
                     stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(6.5)
    finally:
        stop(reporter)
    assert f"nothing from a broker at {ep['metrics']} yet" in reporter.stderr.read()


def test_a_standalone_sidecar_started_elsewhere_finds_relative_inputs(tmp_path):
    """The broker sends inputs as absolute paths: a relative one meant its own folder."""
    ep = tcp_endpoints()
    folder_of_photos(tmp_path / "in" / "photos", 2)
    broker = start(*broker_cmd(ep, "photos", tmp_path / "out", tmp_path, "--linger", 0), cwd=tmp_path / "in")
    worker = start("sidecar", "--connect", ep["jobs"], "--results", ep["results"], "--log-dir", tmp_path / "logs",
                   cwd=tmp_path)   # not the broker's folder; its root (the folder it starts in) holds both
    try:
        assert broker.wait(60) == 0
        assert json.loads((tmp_path / "r.json").read_text())["tasks"]["completed"] == 2
    finally:
        stop(broker, worker)


def test_jobs_for_one_worker_travel_together_and_complete_one_by_one(tmp_path):
    """A worker with credit 4 gets its 4 jobs in one message; each completion counts once."""
    from broker import wire

    ep = tcp_endpoints()
    src = folder_of_photos(tmp_path / "in", 40, (64, 48))
    broker = start(*broker_cmd(ep, src, tmp_path / "out", tmp_path))
    worker = None
    try:
        with zmq.Context() as ctx:
            dealer, push = ctx.socket(zmq.DEALER), ctx.socket(zmq.PUSH)
            dealer.linger = push.linger = 1000
            dealer.routing_id = b"raw-1"
            dealer.connect(ep["jobs"])
            push.connect(ep["results"])
            dealer.send_multipart(wire.encode(wire.Ready("raw-1", "raw", 1, 4)))
            assert dealer.poll(30_000)
            batch = wire.decode(dealer.recv_multipart(), (wire.Jobs,))  # all 4 credits free at once
            assert len({j.job_id for j in batch.jobs}) == 4
            completed, duplicates = [], 0
            while len(completed) < 8:
                for job in batch.jobs + batch.jobs[:1]:  # the first one twice
                    push.send_multipart(wire.encode(wire.Done(job.job_id, job.batch_id, "raw-1", True, None,
                                                              100, 50, 64, 48, "jpeg")))
                completed += batch.jobs
                duplicates += 1
                # The freed credit comes back as jobs in one message or several.
                assert dealer.poll(30_000)
                batch = wire.decode(dealer.recv_multipart(), (wire.Job, wire.Jobs))
                batch = batch if isinstance(batch, wire.Jobs) else wire.Jobs([batch])
            push.send_multipart(wire.encode(wire.Bye("raw-1", wire.BYE_STOPPING)))  # its last jobs go back
            dealer.close()
            push.close()
        worker = sidecar(ep, tmp_path)  # does the rest
        assert broker.wait(60) == 0
        r = json.loads((tmp_path / "r.json").read_text())
        assert (r["tasks"]["total"], r["tasks"]["completed"]) == (40, 40)
        assert r["tasks"]["duplicates_ignored"] == duplicates
        per = {w["id"]: w["tasks"] for w in r["workers"]["per_worker"]}
        assert per["raw-1"] == len(completed) and sum(per.values()) == 40
        assert len(os.listdir(tmp_path / "out")) == 40 - len(completed)  # the raw worker wrote nothing
    finally:
        stop(broker, *(p for p in [worker] if p))


def test_a_second_broker_on_taken_ports_says_so_in_one_line(tmp_path):
    ep = tcp_endpoints()
    src = folder_of_photos(tmp_path / "in", 2)
    with zmq.Context() as ctx, ctx.socket(zmq.PULL) as taken:
        taken.linger = 0
        taken.bind(ep["results"])  # someone else is listening there
        second = start(*broker_cmd(ep, src, tmp_path / "out", tmp_path, "--log-level", "ERROR"),
                       stderr=subprocess.PIPE, text=True)
        try:
            _, stderr = second.communicate(timeout=60)
        finally:
            stop(second)
    assert second.returncode == 2
    assert f"cannot listen on {ep['results']}: Address already in use" in stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "res.jsonl").exists()


@pytest.mark.parametrize("grace", [1.5, 0])
def test_ctrl_c_to_a_standalone_broker_recalls_the_jobs_queued_at_its_workers(tmp_path, grace):
    """The sidecar drops the jobs queued behind its image, and the image
    itself if the grace ends first.

    With a grace shorter than the queue, a sidecar that worked through its
    queue would write outputs the broker had already recorded unfinished.
    """
    ep = tcp_endpoints()
    src = folder_of_photos(tmp_path / "in", 20, (2400, 1800))
    broker = start(*broker_cmd(ep, src, tmp_path / "out", tmp_path, "--format", "webp", "--grace", grace))
    worker = sidecar(ep, tmp_path, "--credit", 4)
    try:
        wait_for_results(broker, tmp_path / "res.jsonl")
        broker.send_signal(signal.SIGINT)
        assert broker.wait(30) == 130
        time.sleep(2.0)  # what the sidecar would still write, it writes now
        assert worker.poll() is None  # and it stays, for the next batch
        lines = [json.loads(line) for line in (tmp_path / "res.jsonl").read_text().splitlines()]
        done = sorted(os.path.basename(r["output"]) for r in lines if r["ok"])
        unfinished = [r for r in lines if r.get("unfinished")]
        assert len(lines) == 20 and len(done) + len(unfinished) == 20
        assert sorted(os.listdir(tmp_path / "out")) == done  # every output recorded
        assert re.search(r"dropped [1-9][0-9]* queued job", logs_of(tmp_path, "sidecar"))
    finally:
        stop(broker, worker)


def three_free_ports_in_a_row() -> int:
    for _ in range(100):
        first = free_port()
        if first > 65533:
            continue
        with contextlib.ExitStack() as held:
            try:
                for port in (first, first + 1, first + 2):
                    held.enter_context(socket.create_server(("127.0.0.1", port)))
            except OSError:
                continue
        return first
    raise RuntimeError("no three free ports in a row")


def test_given_only_a_jobs_port_every_component_finds_the_others_next_to_it(tmp_path):
    """Results on the jobs port + 1 (where sidecars look), metrics on + 2."""
    port = three_free_ports_in_a_row()
    src = folder_of_photos(tmp_path / "in", 6)
    broker = start("broker", src, "-o", tmp_path / "out", "--jobs-endpoint", f"tcp://127.0.0.1:{port}",
                   "--log-dir", tmp_path / "logs", "--linger", 5)
    worker = start("sidecar", "--connect", f"tcp://127.0.0.1:{port}", "--log-dir", tmp_path / "logs",
                   "--input-root", tmp_path / "in", "--output-root", tmp_path / "out")
    reporter = start("reporter", "--connect", f"tcp://127.0.0.1:{port + 2}", "--log-dir", tmp_path / "logs",
                     stdout=subprocess.PIPE, text=True)
    try:
        assert broker.wait(60) == 0
        out, _ = reporter.communicate(timeout=30)
        assert "Finished/total:        6/6" in out
        assert len(os.listdir(tmp_path / "out")) == 6
    finally:
        stop(broker, worker, reporter)


def test_a_jobs_port_with_no_room_after_it_is_a_usage_error():
    broker = start("broker", "samples", "-o", "/nonexistent", "--jobs-endpoint", "tcp://127.0.0.1:65535",
                   stderr=subprocess.PIPE, text=True)
    _, err = broker.communicate(timeout=30)
    assert broker.returncode == 2 and "no port 65536 next to tcp://127.0.0.1:65535" in err


def test_a_worker_written_off_while_paused_gets_the_recall_too(tmp_path):
    """Paused past the heartbeat timeout, a worker is written off with its queue;
    resumed after a Ctrl-C to the broker, it must not work through that queue."""
    ep = tcp_endpoints()
    src = folder_of_photos(tmp_path / "in", 20, (2400, 1800))
    broker = start(*broker_cmd(ep, src, tmp_path / "out", tmp_path, "--format", "webp",
                               "--heartbeat-timeout", 1, "--min-workers", 2))
    paused = sidecar(ep, tmp_path, "--credit", 4)
    other = sidecar(ep, tmp_path)
    try:
        wait_for_results(broker, tmp_path / "res.jsonl")
        paused.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + 30
        while "stopped responding" not in logs_of(tmp_path, "broker"):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        broker.send_signal(signal.SIGINT)
        assert broker.wait(30) == 130
        paused.send_signal(signal.SIGCONT)
        time.sleep(3.0)  # what the resumed worker would still write, it writes now
        lines = [json.loads(line) for line in (tmp_path / "res.jsonl").read_text().splitlines()]
        done = sorted(os.path.basename(r["output"]) for r in lines if r["ok"])
        assert len(lines) == 20 and sorted(os.listdir(tmp_path / "out")) == done
    finally:
        paused.send_signal(signal.SIGCONT)
        stop(broker, paused, other)


@pytest.mark.parametrize("ending", ["aborted", "ctrl-c during the grace", "only a refusing worker left"])
def test_a_worker_paused_past_the_end_of_the_batch_writes_nothing_more(tmp_path, ending):
    """Written off while paused, a worker still holds images of the batch; the
    batch then ends without it. Resumed, it must not write them: their jobs are
    recorded failed or unfinished."""
    ep = tcp_endpoints()
    src = folder_of_photos(tmp_path / "in", 20, (2400, 1800))
    (tmp_path / "elsewhere").mkdir()
    broker = start(*broker_cmd(ep, src, tmp_path / "out", tmp_path, "--format", "webp", "--grace", 8,
                               "--heartbeat-timeout", 1, "--no-worker-timeout", 1))
    paused = sidecar(ep, tmp_path, "--credit", 4)
    procs = [broker, paused]
    if ending == "only a refusing worker left":
        procs.append(start("sidecar", "--connect", ep["jobs"], "--results", ep["results"],
                           "--log-dir", tmp_path / "logs", cwd=tmp_path / "elsewhere"))
    try:
        wait_for_results(broker, tmp_path / "res.jsonl")
        paused.send_signal(signal.SIGSTOP)
        if ending == "ctrl-c during the grace":
            broker.send_signal(signal.SIGINT)  # while the worker still counts: no word to drop its image
        assert broker.wait(60) == (130 if ending.startswith("ctrl-c") else 1)
        paused.send_signal(signal.SIGCONT)
        time.sleep(3.0)  # what the resumed worker would still write, it writes now
        lines = [json.loads(line) for line in (tmp_path / "res.jsonl").read_text().splitlines()]
        done = sorted(os.path.basename(r["output"]) for r in lines if r["ok"])
        assert len(lines) == 20 and sorted(os.listdir(tmp_path / "out")) == done
        if ending == "only a refusing worker left":
            # The jobs left waited for a worker that could reach them, then failed saying why.
            assert any("no worker could reach it within 1 s (--no-worker-timeout): input path" in r["error"]
                       for r in lines if not r["ok"])
    finally:
        paused.send_signal(signal.SIGCONT)
        stop(*procs)
