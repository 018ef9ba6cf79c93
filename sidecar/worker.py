"""The sidecar process: takes jobs, optimizes images, reports completions.

Sockets (all connect to the broker):
  jobs     DEALER  out: ready (our credit; again whenever idle)   in: job, jobs, recall
  results  PUSH    out: done (one per job, with our worker id), bye
  results  PUSH    out: heartbeat, from the heartbeat thread's own socket

The main thread does the image work; pyvips releases the GIL, so the
heartbeat thread keeps beating while an image decodes. It is also the
watchdog: a job that runs past --job-timeout cannot be interrupted inside
libvips, so the process says bye and exits, the broker redelivers (or,
after repeated strikes, fails) the job, and the launcher starts a new worker.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import math
import os
import resource
import select
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass

import zmq
from loguru import logger

from broker import wire
from broker.config import (
    LINGER_MS, ConnectionWatch, StopFlag, format_cpus, image_message_limit, make_socket, recv_frames, send_frames,
    usable_cpus,
)
from broker.paths import OutsideFolders
from broker.security import ClientKeys, secure_client
from broker.settings import Settings, SettingsError
from sidecar.optimize import Abandoned, ImageError, configure_vips, optimize, optimize_bytes, warm_up

EXIT_JOB_TIMEOUT = 75
POLL_MS = 200
SEND_TIMEOUT_MS = 10_000
BYE_LINGER_MS = 50
SIGNAL_HANDOVER_S = 0.05
# Freed image memory goes back to the system only after a big job that left
# the worker this large, and when it is idle. Trimming after every big job
# cost 5-8% on the wallpapers: each next image faulted its memory back in.
TRIM_AFTER_BYTES = 1_000_000
TRIM_ABOVE_MB = 200


@dataclass(frozen=True)
class WorkerConfig:
    worker_id: str
    jobs_endpoint: str
    results_endpoint: str
    credit: int = 2
    job_timeout_s: float = 120.0
    heartbeat_s: float = 1.0
    idle_ready_s: float = 2.0
    noop: bool = False  # benchmark mode: acknowledge jobs without image work
    # Path transport: the only folders this worker reads from / writes to.
    input_roots: tuple[str, ...] | None = None
    output_roots: tuple[str, ...] | None = None
    keys: ClientKeys | None = None
    max_image_bytes: int = 100_000_000
    # Under the launcher the broker's report of each failure shares our
    # console: ours goes to the log file only (INFO, below its console level).
    failure_level: str = "WARNING"


class Credit:
    """How many jobs to ask for: enough queued work to cover a round trip.

    Large images take a second or more, so the configured credit (2: one
    running, one waiting) keeps the pipe full without hoarding. Short jobs
    (thumbnails, a no-op benchmark) need a deeper queue: when every core is
    busy the broker may wait a scheduler slice (several ms) before it can
    refill, and the worker must not run dry meanwhile. The credit covers
    about QUEUED_WORK_S of work, up to MAX.
    """

    MAX = 64
    QUEUED_WORK_S = 0.02

    def __init__(self, base: int):
        self.base = self.value = base
        self.avg_s: float | None = None

    def update(self, elapsed_s: float) -> bool:
        """Fold in one job's time; True when the credit should be re-announced.

        The configured credit is the floor: it grows only when more than one
        job fits in QUEUED_WORK_S (so --credit 1 stays 1 for real images).
        """
        self.avg_s = elapsed_s if self.avg_s is None else 0.9 * self.avg_s + 0.1 * elapsed_s
        queued = math.ceil(self.QUEUED_WORK_S / max(self.avg_s, 1e-6))
        wanted = min(self.MAX, max(self.base, 1 + queued)) if queued > 1 else self.base
        if wanted >= 2 * self.value or wanted <= self.value // 2:
            self.value = wanted
            return True
        return False


class Busy:
    """What the main thread is working on; read by the heartbeat thread."""

    def __init__(self):
        self.job: tuple[str, float] | None = None  # (job id, start), replaced atomically
        # Held by the main thread while it writes an output; taken for good by
        # the watchdog when it gives up on the job (see give_up).
        self.writing = threading.Lock()

    def seconds(self) -> tuple[str | None, float]:
        current = self.job
        if current is None:
            return None, 0.0
        return current[0], time.monotonic() - current[1]

    def give_up(self, job_id: str) -> bool:
        """For the watchdog: True if ``job_id`` is still running and its output
        can no longer be written; False if it is being written right now (or
        is over). A job the broker may call failed must leave no output."""
        if not self.writing.acquire(blocking=False):
            return False
        current = self.job
        if current is None or current[0] != job_id:
            self.writing.release()
            return False
        return True  # the lock stays taken: the process is about to exit


def process(job: wire.Job, config: WorkerConfig, payload: bytes | None = None, abandon=lambda: False,
            staged: bool = True, writing=contextlib.nullcontext()):
    """Do one job: ``(completion, output bytes or None)``.

    With a payload (bytes transport) the image comes in the message and goes
    back in the completion: no file is touched. Without one, the job's paths
    are used, confined to this worker's folders; a job whose paths lie
    outside them is refused (a wire.Refused instead of a completion). Every
    failure becomes a failed completion, never an exception. An image
    abandoned on a stop signal has no completion (None): the job is
    unfinished, not failed.
    """
    start = time.perf_counter()
    worker_id = config.worker_id
    with logger.contextualize(job_id=job.job_id):
        try:
            settings = Settings.from_dict(job.settings)
            if payload is not None:
                encoded, outcome = optimize_bytes(payload, settings, max_pixels=job.max_pixels, staged=staged)
                if job.max_bytes and len(encoded) > image_message_limit(job.max_bytes):
                    # Sent anyway, the broker's socket would drop it unseen (and cut us off).
                    raise ImageError(f"output of {len(encoded) / 1e6:.1f} MB is larger than the broker accepts "
                                     f"(its --max-image-mb is {job.max_bytes / 1e6:g})")
            else:
                encoded = None
                outcome = optimize(job.input, job.output, settings, max_pixels=job.max_pixels,
                                   max_bytes=job.max_bytes, tag=f"{worker_id}-{job.attempt}",
                                   input_roots=config.input_roots,
                                   output_roots=config.output_roots, abandon=abandon, writing=writing,
                                   staged=staged)
        except Abandoned as exc:
            logger.info("{} abandoned: {}", job.input, exc)
            return None, None
        except OutsideFolders as exc:
            return wire.Refused(worker_id, job.batch_id, job.job_id, str(exc)), None
        except (ImageError, SettingsError) as exc:
            error = str(exc) if isinstance(exc, ImageError) else f"invalid setting: {exc}"
            logger.log(config.failure_level, "{} failed: {}", job.input, error)
            return wire.Done(job.job_id, job.batch_id, worker_id, False, error,
                             elapsed_s=time.perf_counter() - start), None
        except Exception as exc:  # a bug or an exotic libvips failure: the worker lives on
            logger.exception("{} failed unexpectedly", job.input)
            return wire.Done(job.job_id, job.batch_id, worker_id, False,
                             f"internal error: {type(exc).__name__}: {exc}",
                             elapsed_s=time.perf_counter() - start), None
        elapsed = time.perf_counter() - start
        logger.debug("{} -> {} {}x{} {} -> {} bytes in {:.3f} s", job.input, job.output,
                     outcome.width, outcome.height, outcome.in_bytes, outcome.out_bytes, elapsed)
        done = wire.Done(job.job_id, job.batch_id, worker_id, True, None, outcome.in_bytes,
                         outcome.out_bytes, outcome.width, outcome.height, outcome.format,
                         outcome.kept_original, elapsed, outcome.timings)
        return done, encoded


def heartbeat_loop(ctx: zmq.Context, config: WorkerConfig, busy: Busy, done_fd: int, stop: StopFlag) -> None:
    """Beats every heartbeat_s until ``done_fd`` is readable.

    It also watches for stop signals: the main thread hears of one only when
    libvips returns (seconds, on a large image), so this thread says at once
    what the signal will do.
    """
    watched = [done_fd] if stop.wakeup_fd is None else [done_fd, stop.wakeup_fd]
    signals_told = 0
    with make_socket(ctx, zmq.PUSH, linger=0, receives=False) as push:
        push.sndhwm = 10
        secure_client(push, config.keys)
        push.connect(config.results_endpoint)
        while True:
            readable = select.select(watched, [], [], config.heartbeat_s)[0]
            if done_fd in readable:
                return
            if readable and busy.job is None:
                # The main thread is idle, polling the same signal fd: the
                # signal is its to take (taken here, its poll would sleep on).
                if select.select([done_fd], [], [], SIGNAL_HANDOVER_S)[0]:
                    return
            elif readable:
                signals_told = _tell_stop(stop, busy, signals_told)
            job_id, busy_s = busy.seconds()
            if job_id is not None and busy_s > config.job_timeout_s and busy.give_up(job_id):
                logger.error("job {} ran past --job-timeout {:g} s; exiting so it can be retried",
                             job_id, config.job_timeout_s)
                reason = f"job ran past --job-timeout {config.job_timeout_s:g} s"
                _send(push, wire.Bye(config.worker_id, reason, job_id))
                time.sleep(0.5)  # let the bye leave before the process does
                os._exit(EXIT_JOB_TIMEOUT)
            _send(push, wire.Heartbeat(config.worker_id, job_id, busy_s, *memory_mb()))


def _tell_stop(stop: StopFlag, busy: Busy, told: int) -> int:
    """Log what the stop signals so far mean for the image in hand; the count told."""
    count = stop.count
    job_id, busy_s = busy.seconds()
    if job_id is None or count <= told:
        return max(count, told)
    if told == 0:
        logger.warning("stop signal: finishing job {} (running {:.1f} s) first; a second signal drops it",
                       job_id, busy_s)
    if count >= 2 and told < 2:  # once: the launcher may send more
        logger.warning("second stop signal: dropping job {} unwritten", job_id)
    return count


def _libc_trim():
    """glibc's malloc_trim, or a no-op where there is none.

    Looked up among the symbols already loaded: ctypes.util.find_library
    would run ldconfig in a subprocess, which costs every worker's start-up.
    """
    try:
        libc = ctypes.CDLL(None)
        return lambda: libc.malloc_trim(0)
    except (OSError, AttributeError):
        return lambda: None


# Gives freed image buffers back to the system: otherwise a worker that met
# one huge image would keep its memory for the rest of the batch.
release_memory = _libc_trim()


def peak_mb() -> float:
    """Peak resident memory of this process so far, in MB (one system call)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 * 1.024, 1)  # KiB on Linux


def memory_mb() -> tuple[float, float]:
    """(resident now, peak resident) of this process, in MB."""
    try:
        with open("/proc/self/statm") as f:
            now = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
    except OSError:
        now = 0.0
    return now, peak_mb()


def _send(sock, msg) -> bool:
    try:
        sock.send_multipart(wire.encode(msg), zmq.NOBLOCK)
        return True
    except zmq.Again:
        return False  # the broker is away; heartbeats are not worth queueing


def run(config: WorkerConfig, stop: StopFlag) -> int:
    configure_vips()
    if not config.noop:
        warm_up()  # before the first "ready": a ready worker is a fast worker
    busy = Busy()
    done_r, done_w = os.pipe()  # written once the work is over: ends the heartbeat thread
    with zmq.Context() as ctx:
        dealer = make_socket(ctx, zmq.DEALER, linger=0, max_bytes=image_message_limit(config.max_image_bytes))
        dealer.routing_id = config.worker_id.encode()
        dealer.rcvhwm = max(2, config.credit * 2)
        push = make_socket(ctx, zmq.PUSH, linger=LINGER_MS, receives=False)
        push.sndtimeo = SEND_TIMEOUT_MS
        for sock in (dealer, push):
            secure_client(sock, config.keys)
        heart = threading.Thread(target=heartbeat_loop, args=(ctx, config, busy, done_r, stop),
                                 name="heartbeat", daemon=True)
        connection = ConnectionWatch(dealer, "a broker's jobs port")
        results = ConnectionWatch(push, "a broker's results port")
        with dealer, push, connection, results:
            dealer.connect(config.jobs_endpoint)
            push.connect(config.results_endpoint)
            heart.start()
            logger.info("worker {} connecting to {} (CPUs {})", config.worker_id, config.jobs_endpoint,
                        format_cpus(usable_cpus()))
            try:
                _serve(dealer, push, config, busy, stop, connection, results)
            finally:
                # A short linger for the bye: the broker may already be gone.
                push.linger = BYE_LINGER_MS
                _send(push, wire.Bye(config.worker_id, wire.BYE_STOPPING))
                os.write(done_w, b"x")
                heart.join(2)
                os.close(done_w)
                os.close(done_r)
    return 0


class Inbox:
    """Jobs received and not yet started, in order, with their payloads.

    Everything waiting on the jobs socket is taken in before each job (at
    most every CHECK_EVERY_S for very short jobs), so a recall from a
    stopping broker drops the jobs queued behind the current image. So does
    losing the connection to the broker: one killed outright cannot recall
    anything, and its jobs are nobody's any more (a broker still there gets
    them back, unharmed, from our answer).
    """

    CHECK_EVERY_S = 0.005

    def __init__(self, dealer, worker_id: str, send_dropped, connection: ConnectionWatch | None = None):
        self.dealer, self.worker_id = dealer, worker_id
        self.send_dropped = send_dropped  # sends the wire.Dropped it is given
        self.connection = connection
        self.pending: deque[tuple[wire.Job, bytes | None]] = deque()
        self.checked = 0.0
        self.given_up: set[str] = set()  # batches whose image in hand is not to be written
        self.batches_seen: set[str] = set()  # of jobs received since the last connection was lost

    def take_in(self, now: float, always: bool = False) -> None:
        if self.pending and now - self.checked < self.CHECK_EVERY_S and not always:
            return
        self.checked = now
        disconnected = self.connection is not None and self.connection.dropped()
        stale, self.batches_seen = (self.batches_seen, set()) if disconnected else ((), self.batches_seen)
        self._receive()
        # What came before the connection dropped is read by now; a broker
        # started since may have sent jobs too, of a batch of its own.
        for batch_id in stale:
            self.drop(batch_id, "lost the connection to the broker")

    def _receive(self) -> None:
        while True:
            try:
                frames = recv_frames(self.dealer, nowait=True)
            except zmq.Again:
                return
            try:
                msg, payload = wire.decode_with_payload(frames, (wire.Job, wire.Jobs, wire.Recall))
            except wire.WireError as exc:
                logger.warning("dropped a malformed message: {}", exc)
                continue
            if type(msg) is wire.Jobs:
                self.pending.extend((job, None) for job in msg.jobs)
                self.batches_seen.add(msg.jobs[0].batch_id)
            elif type(msg) is wire.Job:
                self.pending.append((msg, payload))
                self.batches_seen.add(msg.batch_id)
            else:
                self.drop(msg.batch_id, f"broker stopping batch {msg.batch_id}")
                if msg.in_hand:
                    self.given_up.add(msg.batch_id)

    def gives_up(self, batch_id: str) -> bool:
        """Has the broker stopped waiting for this batch's image in hand?"""
        self.take_in(time.monotonic(), always=True)
        return batch_id in self.given_up

    def drop(self, batch_id: str, why: str) -> None:
        """Drop the batch's jobs not started, and say which."""
        dropped = [job.job_id for job, _ in self.pending if job.batch_id == batch_id]
        self.pending = deque(item for item in self.pending if item[0].batch_id != batch_id)
        logger.log("INFO" if dropped else "DEBUG", "{}: dropped {} queued job(s)", why, len(dropped))
        if dropped:
            self.send_dropped(wire.Dropped(self.worker_id, batch_id, dropped))


def _deliver(push, msg: wire.Done | wire.Refused, encoded: bytes | None = None) -> None:
    """Send what became of a job, waiting up to SEND_TIMEOUT_MS for the broker."""
    try:
        send_frames(push, wire.encode(msg, encoded), copy=encoded is None)
    except zmq.Again:
        logger.error("broker unreachable: the outcome of {} was not delivered", msg.job_id)


class Refusals:
    """Logs refused jobs: the first of each batch loudly (it says what to fix),
    the rest quietly (a worker in the wrong folder refuses every job)."""

    def __init__(self):
        self.batches: set[str] = set()

    def note(self, refused: wire.Refused) -> None:
        first = refused.batch_id not in self.batches
        self.batches.add(refused.batch_id)
        logger.log("WARNING" if first else "DEBUG", "job {} refused, left to other workers: {}",
                   refused.job_id, refused.reason)


def _serve(dealer, push, config: WorkerConfig, busy: Busy, stop: StopFlag, connection: ConnectionWatch,
           results: ConnectionWatch) -> None:
    credit = Credit(config.credit)

    def announce(idle_s: float = 0.0):
        _send(dealer, wire.Ready(config.worker_id, socket.gethostname(), os.getpid(), credit.value, idle_s,
                                 image_message_limit(config.max_image_bytes)))

    # No job is asked for before the results connection is up: a worker that
    # cannot report would write outputs for jobs the broker then fails.
    announced = False
    last_job = time.monotonic()
    handled = 0
    reported_peak = 0.0
    inbox = Inbox(dealer, config.worker_id, send_dropped=lambda dropped: _send(push, dropped),
                  connection=connection)
    refusals = Refusals()
    poller = stop.poller(dealer, results.monitor)
    while not stop and not stop.parent_gone():
        inbox.take_in(time.monotonic())
        if not inbox.pending:
            events = dict(poller.poll(POLL_MS))
            if results.monitor in events:
                results.dropped()  # brings results.connected up to date (and says if it cannot be)
            if not announced and results.connected:
                announce()
                announced, last_job = True, time.monotonic()
            if dealer not in events:
                stop.drain()
                if announced and results.connected and time.monotonic() - last_job >= config.idle_ready_s:
                    # Idle: remind the broker we are here (it may have written us
                    # off), and that nothing has reached us since (see reclaim).
                    announce(idle_s=time.monotonic() - last_job)
                    release_memory()
                    last_job = time.monotonic()
            continue
        # On a stop signal the jobs still pending go back to the broker's
        # queue when it hears our bye.
        job, payload = inbox.pending.popleft()
        started = time.monotonic()
        busy.job = (job.job_id, started)
        if config.noop:
            done, encoded = wire.Done(job.job_id, job.batch_id, config.worker_id, True, format="none"), None
        else:
            done, encoded = process(job, config, payload, staged=job.timed, writing=busy.writing,
                                    abandon=lambda: stop.count > 1 or inbox.gives_up(job.batch_id))
        with busy.writing:  # never returns once the watchdog has given up on the job: no completion
            busy.job = None
        if done is None:
            continue  # abandoned: the broker records it unfinished
        if type(done) is wire.Refused:
            # Not a job done: it neither counts nor teaches the credit anything.
            refusals.note(done)
            _deliver(push, done)
            continue
        peak = peak_mb()
        if peak > reported_peak:
            # Heartbeats carry memory too, but a batch may end before the first.
            done, reported_peak = dataclasses.replace(done, peak_rss_mb=peak), peak
        _deliver(push, done, encoded)
        if done.in_bytes >= TRIM_AFTER_BYTES and memory_mb()[0] > TRIM_ABOVE_MB:
            release_memory()
        handled += 1
        last_job = time.monotonic()
        if credit.update(last_job - started):
            announce()
    logger.info("worker {} stopping after {} jobs ({})", config.worker_id, handled,
                stop.signal_name or "launcher exited")
