"""python launch.py [INPUT ...] [options]: optimize images across a worker pool.

Starts the broker, N sidecars and the reporter as separate processes (each
runs the same main() and flags as its ``python -m ...`` command), connected
over ipc:// sockets in a private folder, waits for the batch and stops them all.

Exit status: 0 every image succeeded, 1 some failed (or the batch could not
finish), 2 bad usage, 130 interrupted (the partial report is printed).
"""

from __future__ import annotations

import importlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
SAMPLES = os.path.join(HERE, "samples")
sys.path.insert(0, HERE)

from broker import config as common  # noqa: E402
from broker.cli import (  # noqa: E402
    OneLineParser, UsageError, add_batch_arguments, batch_argv, batch_config_from_args, input_argv,
    parse_inputs_anywhere,
)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
# Crashes worth a fresh worker; SIGKILL/SIGTERM mean someone stopped it on purpose.
CRASH_SIGNALS = {-signal.SIGSEGV, -signal.SIGABRT, -signal.SIGBUS, -signal.SIGFPE, -signal.SIGILL}
STOP_WAIT_S = 5.0
# After Ctrl-C and the grace: how long a worker may take to notice it is over.
INTERRUPTED_STOP_S = 1.0
# Children's exits and stop signals wake the supervisor at once; this is only
# how often it looks at the clock meanwhile.
SUPERVISE_EVERY_S = 0.1
# Two signals this far apart count as two, not one.
SIGNAL_GAP_S = 0.02
# After Ctrl-C, workers drop their images this long before the broker's grace
# ends: an image finished in time reaches the broker in time; any other is
# dropped before it is written, never left on disk while reported unfinished.
ABANDON_BEFORE_S = 0.5
# How often a wait for a child looks whether it has exited.
CHILD_POLL_S = 0.002


def build_parser():
    p = OneLineParser(prog="launch.py", description=__doc__.split("\n\n")[0])
    add_batch_arguments(p)
    cores = len(common.usable_cpus())
    p.add_argument("--workers", type=int, default=cores, help="sidecar processes (default: CPU count)")
    p.add_argument("--vips-threads", type=int,
                   help="libvips threads per worker (default: CPU count / workers, at least 1)")
    p.add_argument("--pin-workers", choices=("auto", "off"), default="auto",
                   help="auto: when workers x threads fit the CPUs, give each worker CPUs of its own")
    p.add_argument("--credit", type=int, default=2, help="jobs a worker may hold at once (default: 2)")
    p.add_argument("--no-worker-timeout", type=float, default=15.0, metavar="S",
                   help="give up when no worker has been alive this long (default: %(default)s)")
    p.add_argument("--grace", type=float, default=10.0, metavar="S",
                   help="on Ctrl-C, wait this long for images in flight (default: %(default)s)")
    p.add_argument("--noop", action="store_true",
                   help="benchmark mode: workers acknowledge jobs without image work")
    p.set_defaults(log_level="WARNING")
    return p


class Launcher:
    def __init__(self, args, run_dir: str, stop: common.StopFlag):
        self.args = args
        self.stop = stop
        self.endpoints = {k: f"ipc://{os.path.join(run_dir, k)}" for k in ("jobs", "results", "metrics")}
        self.broker = self.reporter = None
        self.workers: list[Child] = []
        self.respawns_left = 3 * args.workers
        self.reporter_restarts = 3
        cpus = common.usable_cpus()
        self.vips_threads = args.vips_threads or max(1, len(cpus) // max(1, args.workers))
        self.cpu_sets = (common.plan_cpu_sets(args.workers, self.vips_threads, cpus)
                         if args.pin_workers == "auto" else None)
        self.slots: dict[Child, int] = {}  # worker -> its place in cpu_sets

    def _start(self, module: str, *argv: str) -> Child:
        return start_component(module, ["--parent-pid", str(os.getpid()), *argv], self.stop)

    def start_broker(self) -> None:
        a = self.args
        self.broker = self._start(
            "broker", *batch_argv(a),
            "--jobs-endpoint", self.endpoints["jobs"],
            "--results-endpoint", self.endpoints["results"],
            "--metrics-endpoint", self.endpoints["metrics"],
            "--min-workers", str(a.workers), "--no-worker-timeout", str(a.no_worker_timeout),
            "--grace", str(a.grace), "--linger", "30", *input_argv(a),
        )

    def start_reporter(self) -> None:
        a = self.args
        self.reporter = self._start("reporter", "--connect", self.endpoints["metrics"],
                                    "--log-dir", a.log_dir, "--log-level", a.log_level)

    def confinement(self) -> list[str]:
        """The folders the workers may touch.

        Inputs: whatever the broker planned from the user's own arguments,
        links to folders elsewhere included (its jobs reach the workers only
        through the launcher's private ipc folder, mode 0700). Outputs: the
        output folder, unless a batch file names its outputs itself.
        """
        a = self.args
        return ["--input-root", "/", "--output-root", "/" if a.jobs else os.path.abspath(a.output or "out")]

    def start_worker(self, slot: int) -> Child:
        a = self.args
        cpus = ["--cpus", common.format_cpus(self.cpu_sets[slot])] if self.cpu_sets else []
        worker = self._start("sidecar", "--connect", self.endpoints["jobs"], *self.confinement(), *cpus,
                             "--results", self.endpoints["results"], "--credit", str(a.credit),
                             "--job-timeout", str(a.job_timeout), "--vips-threads", str(self.vips_threads),
                             "--max-image-mb", str(a.max_image_mb),
                             "--log-dir", a.log_dir, "--log-level", a.log_level,
                             *(["--noop"] if a.noop else []))
        self.workers.append(worker)
        self.slots[worker] = slot
        return worker

    def supervise(self, stop: common.StopFlag) -> int:
        """Wait for the batch; return the exit status."""
        forwarded = 0
        released = False
        abandon_at = None  # when the workers get their second signal, after a Ctrl-C
        while True:
            if stop.count > forwarded:
                # First Ctrl-C: the broker stops dispatching and waits for the
                # images in flight; each worker finishes the image it is on and
                # leaves, the jobs queued at it unstarted (the broker counts
                # them unfinished; left to run, they would write outputs the
                # report calls unfinished). Second: both cut the wait short.
                forwarded += 1
                # The same signal, so that the logs name what the user did.
                sig = signal.Signals[stop.signal_name] if stop.signal_name else signal.SIGTERM
                for proc in [self.broker, *self.workers]:
                    _signal(proc, sig)
                if abandon_at is None:
                    abandon_at = time.monotonic() + max(0.0, self.args.grace - ABANDON_BEFORE_S)
            if forwarded == 1 and time.monotonic() >= abandon_at:
                abandon_at = float("inf")  # once (a second Ctrl-C tells them itself)
                for proc in self.workers:
                    _signal(proc, signal.SIGTERM)
            self._replace_crashed_workers(asked_to_stop=released or forwarded > 0)
            if not released and self.reporter.poll() is not None:
                if self.reporter.returncode != 0 and self.broker.poll() is None and self.reporter_restarts:
                    # The reporter died (it did not print the report): another
                    # one gets the same full snapshots; the batch goes on.
                    self.reporter_restarts -= 1
                    self.start_reporter()
                    continue
                # Report printed: end the broker's linger, and let the workers go.
                # Once only: a second signal could land after the interpreter has
                # put back the default handlers on its way out.
                released = True
                _signal(self.broker, signal.SIGTERM)
                if stop.count:
                    # Interrupted: a job still running was reported unfinished.
                    self.drop_images_in_hand()
                else:
                    for proc in self.workers:
                        _signal(proc, signal.SIGTERM)
            if self.broker.poll() is not None:
                break
            stop.nap(SUPERVISE_EVERY_S)
        if not released:
            # The broker is gone before the end: nothing the workers still do
            # would be recorded.
            self.drop_images_in_hand()
        if self.reporter.poll() is None:
            # The broker ended without the reporter seeing a final report.
            _wait_or_stop(self.reporter, 2.0)
        code = self.broker.returncode
        if code not in (0, 1, 2, 130):
            from loguru import logger

            logger.error("the broker died ({}) before the batch was over; see its log in {}", how_it_ended(code),
                         self.args.log_dir)
        if stop.count:
            return EXIT_INTERRUPTED
        return {0: EXIT_OK, 1: EXIT_FAILED, 2: EXIT_USAGE, 130: EXIT_INTERRUPTED}.get(code, EXIT_FAILED)

    def drop_images_in_hand(self) -> None:
        """Two stop signals: each worker drops its image unwritten and leaves."""
        for proc in self.workers:
            _signal(proc, signal.SIGTERM)
        time.sleep(SIGNAL_GAP_S)
        for proc in self.workers:
            _signal(proc, signal.SIGTERM)

    def _replace_crashed_workers(self, asked_to_stop: bool) -> None:
        for worker in list(self.workers):
            code = worker.poll()
            if code is None:
                continue
            self.workers.remove(worker)
            slot = self.slots.pop(worker)
            crashed = code > 0 or code in CRASH_SIGNALS
            from loguru import logger

            if code != 0 and self.broker.poll() is None:
                # Also while stopping: the broker waits for the images in flight.
                self.tell_broker_worker_gone(worker.pid, code)
            if crashed and not asked_to_stop and self.respawns_left > 0 and self.broker.poll() is None:
                self.respawns_left -= 1
                logger.warning("worker pid {} exited with {}; starting a new one", worker.pid, code)
                self.start_worker(slot)  # on the CPUs its predecessor had
            elif code == 0 and asked_to_stop:
                logger.info("worker pid {} stopped", worker.pid)  # we asked it to
            else:
                logger.warning("worker pid {} exited with {}", worker.pid, code)

    def tell_broker_worker_gone(self, pid: int, code: int) -> None:
        """Say goodbye in a dead worker's name: the broker would otherwise see
        it gone only when its heartbeats stop (5 s), its jobs waiting till then."""
        import zmq

        from broker import wire

        with zmq.Context() as ctx, common.make_socket(ctx, zmq.PUSH, linger=500, receives=False) as push:
            push.sndtimeo = 500
            push.connect(self.endpoints["results"])
            bye = wire.Bye(common.worker_id(pid), f"its process {how_it_ended(code)}")
            try:
                common.send_frames(push, wire.encode(bye))
            except zmq.Again:
                pass  # the heartbeat timeout will tell the broker instead

    def stop_all(self, interrupted: bool = False) -> None:
        """Stop every child. After an interrupted batch, the grace is over: a
        worker still inside one long libvips call (its image abandoned) cannot
        act on a signal until that call returns, so it is killed soon."""
        procs = [p for p in [*self.workers, self.reporter, self.broker] if p is not None]
        for proc in procs:
            _signal(proc, signal.SIGTERM)
        deadline = time.monotonic() + (INTERRUPTED_STOP_S if interrupted else STOP_WAIT_S)
        for proc in procs:
            _wait_or_stop(proc, max(0.0, deadline - time.monotonic()), patient=not interrupted)


# -- starting the components ---------------------------------------------------
# Each component is forked from the launcher once it has imported what they all
# use, then runs its own main() with the flags a person would give it. Five
# interpreters each importing zmq, orjson and loguru afresh cost half a second
# of CPU: a quarter of a second of every batch on two cores. The launcher forks
# only while it holds no zmq context and no thread (the children create their
# own), and never imports pyvips (libvips starts in the sidecar, after the fork).
COMPONENT_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGCHLD}


def preload() -> None:
    """Import, once for every component, the modules they all use."""
    import zmq  # noqa: F401
    from loguru import logger  # noqa: F401

    from broker import security, wire  # noqa: F401


def start_component(module: str, argv: list[str], stop: common.StopFlag) -> Child:
    """Fork a process running ``module``'s main(argv), as ``python -m module`` would."""
    common.flush_std_streams()  # else the child would write the launcher's buffered text again
    # No signal between the fork and the child's own handlers: the launcher's
    # would count it as the user's.
    signal.pthread_sigmask(signal.SIG_BLOCK, COMPONENT_SIGNALS)
    pid = os.fork()
    if pid:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, COMPONENT_SIGNALS)
        return Child(pid)
    code = 1
    try:
        # A session of its own: Ctrl-C reaches only the launcher, which then
        # stops the pieces in order (broker first, so the report is complete).
        os.setsid()
        _forget_launcher(stop)
        _name_process(f"imgbus-{module}")
        code = importlib.import_module(f"{module}.cli").main(argv)
    except SystemExit as exc:  # usage errors (argparse's 2), or sys.exit() as python would take it
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        common.exit_now(code)  # never back into the launcher's code


def _forget_launcher(stop: common.StopFlag) -> None:
    """Drop the launcher's signal handlers and wakeup pipe. A stop signal stays
    blocked until the component's own StopFlag.install() takes it: one the
    launcher forwards right after the fork is then a stop, not a crash."""
    os.close(signal.set_wakeup_fd(-1))
    os.close(stop.wakeup_fd)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, COMPONENT_SIGNALS - common.StopFlag.STOP_SIGNALS)


def _name_process(name: str) -> None:
    """What ps, top and pgrep show for it (the command line stays the launcher's)."""
    try:
        with open("/proc/self/comm", "w") as f:
            f.write(name[:15])
    except OSError:
        pass  # not Linux: the pids are in the launcher's log


class Child:
    """A forked component: the part of subprocess.Popen the launcher uses."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)
            time.sleep(CHILD_POLL_S)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # not yet reaped: the pid is still ours
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def how_it_ended(code: int) -> str:
    if code >= 0:
        return f"exited with status {code}"
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"killed by signal {-code}"


def _signal(proc, sig) -> None:
    if proc is not None and proc.poll() is None:
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass


def _wait_or_stop(proc: Child, timeout: float, patient: bool = True) -> None:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        _signal(proc, signal.SIGTERM)
        try:
            proc.wait(STOP_WAIT_S if patient else 0)
        except subprocess.TimeoutExpired:
            from loguru import logger

            if patient:
                logger.error("pid {} did not stop; killing it", proc.pid)
            else:
                logger.warning("pid {} still busy after the interruption; killing it", proc.pid)
            proc.kill()
            proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_inputs_anywhere(parser, argv)
    if not args.inputs and not args.jobs:
        args.inputs = [SAMPLES]
    try:
        batch_config_from_args(args)
        if args.workers < 1 or args.credit < 1 or (args.vips_threads is not None and args.vips_threads < 1):
            raise UsageError("--workers, --credit and --vips-threads must be at least 1")
        if args.grace < 0 or args.no_worker_timeout <= 0:
            raise UsageError("--grace cannot be negative, and --no-worker-timeout must be positive")
    except UsageError as exc:
        parser.error(str(exc))
    stop = common.StopFlag().install(wake_on_child_exit=True)
    run_dir = tempfile.mkdtemp(prefix="imgbus-")
    launcher = Launcher(args, run_dir, stop)
    try:
        # Start everything first; the launcher's own logging can wait.
        preload()
        launcher.start_broker()
        for slot in range(args.workers):
            launcher.start_worker(slot)
        launcher.start_reporter()
        common.setup_logging("launch", args.log_dir, args.log_level)
        from loguru import logger

        logger.info("started broker pid {}, reporter pid {}, workers {}", launcher.broker.pid,
                    launcher.reporter.pid, [w.pid for w in launcher.workers])
        code = launcher.supervise(stop)
        logger.info("batch over: exit status {}", code)
        return code
    finally:
        launcher.stop_all(interrupted=stop.count > 0)
        shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    common.exit_now(main())
