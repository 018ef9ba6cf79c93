"""What every imgbus process shares: default endpoints, logging, stop flags.

Endpoints (the broker binds, sidecars and reporters connect):
  jobs     tcp://127.0.0.1:5557   ROUTER  ventilator hands out jobs on request
  results  tcp://127.0.0.1:5558   PULL    sink collects completions, heartbeats
  metrics  tcp://127.0.0.1:5559   PUB     sink publishes progress and snapshots
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback

from dataclasses import dataclass, field

from broker.settings import Settings

# zmq, loguru and the wire module are imported where used: the launcher reads
# this module before it starts any process, and every millisecond there is
# start-up time of the whole pipeline.

DEFAULT_HOST = "127.0.0.1"
# Results and metrics listen next to the jobs port (+1, +2) unless told otherwise.
JOBS_PORT = 5557
DEFAULT_JOBS = f"tcp://{DEFAULT_HOST}:{JOBS_PORT}"
DEFAULT_METRICS = f"tcp://{DEFAULT_HOST}:{JOBS_PORT + 2}"

# Linger: job and result sockets get a short grace to flush, PUB none.
LINGER_MS = 1000
RECONNECT_FIRST_MS, RECONNECT_MAX_MS = 10, 100


@dataclass(frozen=True)
class BrokerConfig:
    inputs: tuple[str, ...] = ()
    jobs_file: str | None = None
    output_dir: str = "out"
    output_dir_given: bool = False
    settings: Settings = field(default_factory=Settings)
    jobs_endpoint: str = "tcp://127.0.0.1:5557"
    results_endpoint: str = "tcp://127.0.0.1:5558"
    metrics_endpoint: str = "tcp://127.0.0.1:5559"
    report_json: str | None = None
    results_jsonl: str | None = None
    max_pixels: int = 268_402_689
    skip_existing: bool = False
    min_workers: int = 1
    ready_wait_s: float = 10.0
    max_attempts: int = 3
    heartbeat_timeout_s: float = 5.0
    job_timeout_s: float = 120.0
    no_worker_timeout_s: float = 60.0
    grace_s: float = 10.0
    linger_s: float = 3.0
    transport: str = "path"          # "bytes": images travel in the messages
    max_image_bytes: int = 100_000_000
    key_file: str | None = None      # CURVE: the broker's secret key...
    authorized_keys: str | None = None  # ...and the folder of client public keys
    insecure: bool = False


STDERR_FORMAT = (
    "<green>{time:HH:mm:ss.SSS}</green> <level>{level: <7}</level> "
    "<cyan>{extra[component]}</cyan> {message}"
)


def worker_id(pid: int | None = None) -> str:
    """Unique across hosts and restarts: host name and process id (this
    process's, or that of a worker started on this host)."""
    return f"{socket.gethostname()}-{os.getpid() if pid is None else pid}"


def setup_logging(component: str, log_dir: str | None, level: str = "INFO", **context) -> None:
    """Readable lines on stderr and one JSON-lines file per process for tailing."""
    from loguru import logger

    logger.remove()
    logger.configure(extra={"component": component, "worker_id": None, "job_id": None, **context})
    if sys.stderr is not None:  # started with stderr closed: the log file still gets everything
        logger.add(sys.stderr, level=level, format=STDERR_FORMAT, diagnose=False, backtrace=False)
    if log_dir:
        path = os.path.join(log_dir, f"{component}-{os.getpid()}.jsonl")
        try:
            os.makedirs(log_dir, exist_ok=True)
            sink = JsonLinesLog(path)
        except OSError as exc:
            # A log folder gone bad mid-batch must not stop a replacement worker.
            logger.warning("no log file: cannot write {}: {}", path, exc.strerror or exc)
        else:
            logger.add(sink.write, level="DEBUG", format="{message}", diagnose=False)


class JsonLinesLog:
    """A loguru sink: one flat JSON object per record, in one write.

    Each line reaches the file at once, so `tail -f` follows it whole. Workers
    log every image at DEBUG; loguru's own serialize=True costs about 6 % of a
    worker's time on small images, this a fraction of that.
    """

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        self.cut = False  # the last line was cut short (disk full): end it before the next
        # A process forked from this one (the launcher's components) keeps logs of its own.
        os.register_at_fork(after_in_child=self._close_in_child)

    def _close_in_child(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1  # a late record fails quietly, as on a full disk

    def write(self, message) -> None:
        from broker import wire

        record = message.record
        entry = {"time": record["time"].isoformat(timespec="milliseconds"), "level": record["level"].name}
        entry.update((key, value) for key, value in record["extra"].items() if value is not None)
        entry["message"] = record["message"]
        entry["where"] = f"{record['name']}:{record['function']}:{record['line']}"
        if record["exception"] is not None:
            kind, value, trace = record["exception"]
            entry["exception"] = "".join(traceback.format_exception(kind, value, trace))
        try:
            line = wire.dumps(entry)
        except TypeError:  # a value JSON cannot hold (an object, text that is not UTF-8): as text
            line = wire.dumps({key: _as_text(value) for key, value in entry.items()})
        self._write((b"\n" if self.cut else b"") + line + b"\n")

    def _write(self, data: bytes) -> None:
        try:
            while data:
                data = data[os.write(self.fd, data):]
            self.cut = False
        except OSError:
            # A full disk must not stop the batch (stderr still has the
            # warnings); a line cut short is ended before the next one.
            self.cut = True


def _as_text(value):
    if isinstance(value, (int, float, bool)) or value is None:
        return value
    from broker.paths import printable

    return printable(value if isinstance(value, str) else str(value))


def exit_now(code: int):
    """End the process with ``code``, skipping the interpreter's teardown.

    Call it once everything is closed: sockets, contexts, files. Tearing down
    the modules of libvips, libzmq and loguru costs 30-40 ms per process, and
    the end of every batch waits for it (the launcher waits for its children).
    """
    if "loguru" in sys.modules:
        from loguru import logger

        logger.remove()  # flushes and closes the log files
    flush_std_streams()
    os._exit(0 if code is None else code)


def flush_std_streams() -> None:
    """Write out what stdout and stderr hold, whatever became of them."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:  # None when the stream was closed at start
                stream.flush()
        except (OSError, ValueError):  # a reader gone, a stream closed
            pass


def usable_cpus() -> list[int]:
    """The CPUs this process may run on (taskset, cgroup cpusets), sorted."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return list(range(os.cpu_count() or 1))


def plan_cpu_sets(workers: int, threads: int, cpus: list[int]) -> list[list[int]] | None:
    """CPUs of its own for each worker, when every worker's threads fit; else None.

    libvips hands each image from the worker's main thread to its own threads
    and back; kept on one CPU, those hand-offs need no wake-up of another CPU
    (measured on a 2-core VM: 10 % less time per small image).
    """
    if workers < 1 or threads < 1 or workers * threads > len(cpus):
        return None
    return [cpus[i * threads:(i + 1) * threads] for i in range(workers)]


MAX_CPU = 4095  # the kernel's default limit is lower still


def parse_cpus(text: str) -> list[int]:
    """``0,2-3`` -> [0, 2, 3]; ValueError when malformed or out of range."""
    cpus: set[int] = set()
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        low, high = int(first), int(last) if dash else int(first)
        if not 0 <= low <= high <= MAX_CPU:
            raise ValueError(f"bad CPU range {part!r} (CPUs are numbered 0 to {MAX_CPU})")
        cpus.update(range(low, high + 1))
    return sorted(cpus)


def format_cpus(cpus: list[int]) -> str:
    return ",".join(str(cpu) for cpu in cpus)


LOG_LEVELS = ("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL")


def log_level(text: str) -> str:
    """A command-line log level: one of loguru's names, in any case."""
    if text.upper() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(LOG_LEVELS)}")
    return text.upper()


def endpoint(text: str) -> str:
    """A command-line endpoint: tcp://HOST:PORT (port 1-65535) or ipc://PATH.

    Checked up front: libzmq takes tcp://host:99999 without complaint and
    then never connects.
    """
    if text.startswith("ipc://") and len(text) > len("ipc://"):
        return text
    if text.startswith("tcp://"):
        host, _, port = text[len("tcp://"):].rpartition(":")
        if host and port.isdigit() and 1 <= int(port) <= 65535:
            return text
        raise argparse.ArgumentTypeError(f"{text!r}: the port must be a number from 1 to 65535 (tcp://HOST:PORT)")
    raise argparse.ArgumentTypeError(f"{text!r}: expected tcp://HOST:PORT or ipc://PATH")


def derive_endpoint(endpoint: str, port_offset: int) -> str:
    """The endpoint next to ``endpoint``: tcp port + offset, or a sibling ipc path."""
    if endpoint.startswith("tcp://"):
        host, _, port = endpoint[len("tcp://"):].rpartition(":")
        if int(port) + port_offset > 65535:
            raise ValueError(f"no port {int(port) + port_offset} next to {endpoint}")
        return f"tcp://{host}:{int(port) + port_offset}"
    if endpoint.startswith("ipc://"):
        return f"{endpoint}.{port_offset}"
    raise ValueError(f"cannot derive an endpoint from {endpoint!r}")


def make_socket(ctx, kind: int, *, linger: int = LINGER_MS, receives: bool = True,
                max_bytes: int | None = None):
    """A socket with an explicit linger and, if it receives, a size limit."""
    import zmq

    from broker import wire

    max_bytes = max_bytes or wire.MAX_MESSAGE_BYTES
    sock = ctx.socket(kind)
    sock.linger = linger
    # A peer that starts before its broker has bound retries soon, not after
    # libzmq's default 100 ms; the wait doubles up to that default after.
    sock.reconnect_ivl = RECONNECT_FIRST_MS
    sock.reconnect_ivl_max = RECONNECT_MAX_MS
    if receives:
        sock.setsockopt(zmq.MAXMSGSIZE, max_bytes)
    return sock


# libzmq's ZMQ_DONTWAIT and ZMQ_SNDMORE, as plain ints (see send_frames).
DONTWAIT, SNDMORE = 1, 2


def send_frames(sock, frames: list, *, nowait: bool = False, copy: bool = True) -> None:
    """send_multipart for the per-job hot paths, with plain int flags.

    pyzmq's send_multipart combines its flags as enum.Flag values, which
    costs about 3 us per message in Python: a tenth of the bus's budget.
    Raises zmq.Again (nowait) as send_multipart does.
    """
    last = DONTWAIT if nowait else 0
    more = SNDMORE | last
    for frame in frames[:-1]:
        sock.send(frame, more, copy=copy)
    sock.send(frames[-1], last, copy=copy)


def recv_frames(sock, *, nowait: bool = False) -> list[bytes]:
    """recv_multipart for the hot paths: every frame of one message, as bytes.

    recv_multipart asks the socket whether more frames follow, and pyzmq
    turns that option number into an enum each time; the frame itself knows.
    Raises zmq.Again (nowait) as recv_multipart does.
    """
    flags = DONTWAIT if nowait else 0
    frame = sock.recv(flags, copy=False)
    frames = [frame.bytes]
    while frame.more:
        frame = sock.recv(flags, copy=False)
        frames.append(frame.bytes)
    return frames


def image_message_limit(max_image_bytes: int) -> int:
    """Largest message a socket that may carry an image accepts."""
    from broker import wire

    return max_image_bytes + wire.MAX_MESSAGE_BYTES


class ConnectionWatch:
    """What a connecting socket's monitor says about its link to the broker.

    Used as a context manager: the monitor socket closes with it.
    """

    def __init__(self, sock, peer: str):
        import zmq
        from zmq.utils.monitor import recv_monitor_message

        self._recv, self._again, self._handshake = recv_monitor_message, zmq.Again, zmq.EVENT_HANDSHAKE_SUCCEEDED
        self._nowait = zmq.NOBLOCK
        self.peer = peer  # what the endpoint should be, for the message
        self.monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self.monitor.linger = 0
        self.connected = False  # the current connection finished its handshake (as of the last dropped())
        self.told = False       # of a failed handshake, since the last good one

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.monitor.close()

    def dropped(self) -> bool:
        """Has a connection that finished its handshake been lost since the last call?"""
        lost = False
        while True:
            try:
                event = self._recv(self.monitor, self._nowait)
            except self._again:
                return lost
            if event["event"] == self._handshake:
                self.connected, self.told = True, False
                continue
            if not self.connected and not self.told:
                # libzmq fails such a peer without a word (and, for a wrong
                # socket type, never tries again): a person must hear why
                # nothing happens.
                from loguru import logger

                endpoint = event["endpoint"].decode("ascii", "replace")
                logger.error("{} closed the connection before the ZeroMQ handshake ended: it is not {}, its "
                             "CURVE keys do not match ours, or it did not answer for 30 s", endpoint, self.peer)
                self.told = True
            lost = lost or self.connected
            self.connected = False


class StopFlag:
    """Set by SIGINT/SIGTERM; loops poll with a timeout and check it.

    ``count`` tells a second signal from the first: the first asks for a
    graceful stop, a later one cuts the remaining wait short. It is counted
    from the wakeup fd, one byte per signal delivered: Python runs its handler
    only once for two signals that land during one long C call (a libvips
    encode), and the second must not be lost.
    """

    STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})

    def __init__(self, parent_pid: int | None = None):
        self._event = threading.Event()
        self.signal_name: str | None = None
        self._count = 0
        self._counting = threading.Lock()  # a sidecar's heartbeat thread counts too
        self.parent_pid = parent_pid
        # Readable as soon as a signal arrives: poll loops include it so a
        # stop request wakes them at once instead of at their next timeout.
        self.wakeup_fd: int | None = None

    def set(self, name: str = "stop") -> None:
        """A stop that is not a signal (or a signal without install())."""
        self.signal_name = self.signal_name or name
        self._count += 1
        self._event.set()

    @property
    def count(self) -> int:
        self.drain()
        return self._count

    def __bool__(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float) -> bool:
        return self._event.wait(timeout)

    def wait_for_more(self, seen: int, timeout: float) -> None:
        """Sleep up to ``timeout`` unless a signal beyond the ``seen``-th arrives."""
        deadline = time.monotonic() + timeout
        while self.count == seen and (left := deadline - time.monotonic()) > 0:
            if self.wakeup_fd is None:
                time.sleep(min(left, 0.05))
            elif select.select([self.wakeup_fd], [], [], left)[0]:
                self.drain()

    def poller(self, *sockets):
        """A zmq.Poller for ``sockets`` (POLLIN) that a stop signal also wakes."""
        import zmq

        poller = zmq.Poller()
        for sock in sockets:
            poller.register(sock, zmq.POLLIN)
        if self.wakeup_fd is not None:
            poller.register(self.wakeup_fd, zmq.POLLIN)
        return poller

    def drain(self) -> None:
        with self._counting:
            try:
                while data := os.read(self.wakeup_fd, 512):
                    self._count += sum(1 for signum in data if signum in self.STOP_SIGNALS)
            except (BlockingIOError, TypeError):
                pass

    def nap(self, timeout: float) -> None:
        """Sleep up to ``timeout``; any signal (a child's exit too, see install) ends it early."""
        if self.wakeup_fd is None:
            time.sleep(timeout)
        elif select.select([self.wakeup_fd], [], [], timeout)[0]:
            self.drain()

    def install(self, wake_on_child_exit: bool = False) -> StopFlag:
        """Catch SIGINT/SIGTERM; with ``wake_on_child_exit``, SIGCHLD wakes nap() too."""
        def handler(signum, _frame):
            # Counted from the wakeup fd (see count), not here.
            self.signal_name = self.signal_name or signal.Signals(signum).name
            self._event.set()

        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        self.wakeup_fd = read_fd

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)
        # A component forked by the launcher starts with them blocked; one
        # that came meanwhile is delivered now, to this handler.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self.STOP_SIGNALS)
        if wake_on_child_exit:
            # A handler of its own (not SIG_IGN, which would stop zombies being
            # kept for wait()): its only job is the byte on the wakeup fd.
            signal.signal(signal.SIGCHLD, lambda _signum, _frame: None)
        return self

    def settle(self) -> None:
        """The work is over: a late stop signal must not turn a clean exit into a
        death by signal (the interpreter puts default handlers back on its way out)."""
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def parent_gone(self) -> bool:
        """True once the launcher that started us has died (we were re-parented)."""
        return self.parent_pid is not None and os.getppid() != self.parent_pid
