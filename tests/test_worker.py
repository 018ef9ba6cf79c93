"""The sidecar's heartbeat thread and stop signals, stepped in-process."""

import os
import signal
import threading
import time

import zmq
from loguru import logger

from broker.config import StopFlag
from sidecar.worker import Busy, WorkerConfig, heartbeat_loop


def run_heartbeat(busy: Busy):
    """A heartbeat thread watching a stand-in for the signal wakeup fd; (stop, its write end, finish)."""
    stop = StopFlag()
    stop.wakeup_fd, signal_w = os.pipe()
    os.set_blocking(stop.wakeup_fd, False)
    done_r, done_w = os.pipe()
    ctx = zmq.Context()
    config = WorkerConfig("w-1", "tcp://127.0.0.1:9", "tcp://127.0.0.1:9", heartbeat_s=5.0)
    thread = threading.Thread(target=heartbeat_loop, args=(ctx, config, busy, done_r, stop), daemon=True)
    thread.start()

    def finish():
        os.write(done_w, b"x")
        thread.join(5)
        assert not thread.is_alive()
        ctx.term()
        for fd in (stop.wakeup_fd, signal_w, done_r, done_w):
            os.close(fd)
    return stop, signal_w, finish


def test_an_idle_workers_heartbeat_leaves_the_stop_signal_to_the_main_thread():
    """The main thread, idle, polls the same fd: a signal taken by the heartbeat
    thread would leave it asleep until its poll timed out."""
    stop, signal_w, finish = run_heartbeat(Busy())
    try:
        os.write(signal_w, bytes([signal.SIGTERM]))
        time.sleep(0.3)
        assert os.read(stop.wakeup_fd, 16) == bytes([signal.SIGTERM])  # still there for the main thread
    finally:
        finish()


def test_a_busy_workers_heartbeat_counts_the_stop_signal_and_says_so():
    said = []
    sink = logger.add(said.append, format="{message}")
    busy = Busy()
    busy.job = ("j7", time.monotonic())  # the main thread is inside libvips
    stop, signal_w, finish = run_heartbeat(busy)
    try:
        os.write(signal_w, bytes([signal.SIGINT]))
        deadline = time.monotonic() + 3
        while not any("stop signal: finishing job j7" in line for line in said):
            assert time.monotonic() < deadline, "nothing said of the signal"
            time.sleep(0.01)
        assert stop.count == 1
    finally:
        finish()
        logger.remove(sink)


def test_each_meaning_of_the_stop_signals_is_said_once():
    said = []
    sink = logger.add(said.append, format="{message}")
    busy = Busy()
    busy.job = ("j8", time.monotonic())
    stop, signal_w, finish = run_heartbeat(busy)
    try:
        # The user's two, then the launcher's two when it drops the images in hand.
        for _ in range(4):
            os.write(signal_w, bytes([signal.SIGTERM]))
            time.sleep(0.15)
        deadline = time.monotonic() + 3
        while stop.count < 4:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.2)
        assert sum("finishing job j8" in line for line in said) == 1
        assert sum("dropping job j8 unwritten" in line for line in said) == 1
    finally:
        finish()
        logger.remove(sink)


class Monitor:
    """Stands in for the jobs socket's monitor: says when the connection dropped."""

    def __init__(self):
        self.lost = False

    def dropped(self) -> bool:
        lost, self.lost = self.lost, False
        return lost


def test_a_lost_connection_drops_the_old_brokers_jobs_and_keeps_the_new_ones():
    from broker import wire
    from sidecar.worker import Inbox

    def job(job_id, batch_id):
        return wire.Job(job_id, batch_id, f"/in/{job_id}.jpg", f"/out/{job_id}.jpg", {})

    with zmq.Context() as ctx, ctx.socket(zmq.ROUTER) as router, ctx.socket(zmq.DEALER) as dealer:
        router.bind("inproc://jobs")
        dealer.routing_id = b"w-1"
        dealer.connect("inproc://jobs")
        answers, monitor = [], Monitor()
        inbox = Inbox(dealer, "w-1", send_dropped=answers.append, connection=monitor)

        def send(*jobs):
            router.send_multipart([b"w-1", *wire.encode(wire.Jobs(list(jobs)))])
            time.sleep(0.05)

        send(job("o1", "old"), job("o2", "old"))
        inbox.take_in(time.monotonic())
        assert [j.job_id for j, _ in inbox.pending] == ["o1", "o2"]
        # The old broker is killed; a stale job was still on its way, and the
        # new broker's first jobs arrive before we look.
        send(job("o3", "old"))
        send(job("n1", "new"))
        monitor.lost = True
        inbox.take_in(time.monotonic(), always=True)
        assert [j.job_id for j, _ in inbox.pending] == ["n1"]
        assert answers == [wire.Dropped("w-1", "old", ["o1", "o2", "o3"])]


def test_a_job_the_watchdog_gave_up_on_is_never_written(tmp_path):
    from broker.settings import Settings
    from conftest import make_photo
    from sidecar.optimize import optimize

    # The broker may fail a job the watchdog gave up on: then no output may appear,
    # however close to the end the image was.
    make_photo(str(tmp_path / "in.jpg"), 800, 600)
    busy = Busy()
    busy.job = ("j1", time.monotonic())
    assert busy.give_up("j1")
    out = tmp_path / "out.jpg"
    late = threading.Thread(target=optimize, args=(str(tmp_path / "in.jpg"), str(out), Settings()),
                            kwargs={"writing": busy.writing}, daemon=True)  # left blocked, as the process exits
    late.start()
    late.join(3)
    assert late.is_alive() and not out.exists() and os.listdir(tmp_path) == ["in.jpg"]

    # It does not give up on a job whose output is being written, or that is over.
    busy = Busy()
    busy.job = ("j2", time.monotonic())
    with busy.writing:
        assert not busy.give_up("j2")
    busy.job = ("j3", time.monotonic())
    assert not busy.give_up("j2")
    busy.job = None
    assert not busy.give_up("j3")
