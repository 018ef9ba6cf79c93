"""The reporter process: a live progress line, then the console benchmark.

Sockets:
  metrics  SUB (connects to the broker's PUB)   in: progress, metrics

The broker publishes whole snapshots, never deltas, so a reporter started
late (even after the batch ended, while the broker still lingers) prints
the same complete report as one that watched from the start.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import zmq
from loguru import logger

from broker import wire
from broker.config import ConnectionWatch, StopFlag, make_socket
from broker.security import ClientKeys, secure_client
from reporter.render import progress_line, report

NON_TTY_PROGRESS_EVERY_S = 5.0
# A reporter started on its own says so when no broker has spoken for this long.
WAIT_NOTE_S = 5.0


@dataclass(frozen=True)
class ReporterConfig:
    endpoint: str
    report_json: str | None = None
    quiet: bool = False
    keys: ClientKeys | None = None


class ProgressPrinter:
    """Overwrites one line on a terminal; prints a line now and then otherwise."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr  # None when stderr was closed: no progress then
        self.tty = self.stream is not None and self.stream.isatty()
        self.last = 0.0
        self.shown = False

    def show(self, text: str) -> None:
        if self.stream is None:
            return
        now = time.monotonic()
        if self.tty:
            self._write("\r\033[K" + text)
            self.shown = True
        elif now - self.last >= NON_TTY_PROGRESS_EVERY_S:
            self._write(text + "\n")
            self.last = now

    def finish(self, text: str) -> None:
        """The last word: always shown, on a terminal or not."""
        self.last = 0.0
        self.show(text)
        self.end()

    def end(self) -> None:
        if self.shown:
            self._write("\n")
            self.shown = False

    def _write(self, text: str) -> None:
        if self.stream is None:
            return
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            # Nobody reads it any more (`2>&1 | head`): the batch goes on without progress lines.
            self.stream = None


def run(config: ReporterConfig, stop: StopFlag) -> int:
    printer = ProgressPrinter()
    latest: dict | None = None
    with zmq.Context() as ctx, make_socket(ctx, zmq.SUB, linger=0) as sub, \
            ConnectionWatch(sub, "a broker's metrics port") as connection:
        secure_client(sub, config.keys)
        sub.subscribe(wire.Progress.KIND)
        sub.subscribe(wire.Metrics.KIND)
        sub.connect(config.endpoint)
        logger.info("subscribed to {}", config.endpoint)
        poller = stop.poller(sub)
        heard_from_broker = False
        started = time.monotonic()
        while not stop and not stop.parent_gone():
            if sub not in dict(poller.poll(200)):
                stop.drain()
                connection.dropped()  # logs a failed handshake
                if not heard_from_broker and stop.parent_pid is None and time.monotonic() - started > WAIT_NOTE_S:
                    # On its own, a reporter pointed at the wrong place would say nothing at all.
                    logger.warning("nothing from a broker at {} yet; still waiting", config.endpoint)
                    heard_from_broker = True  # said once is enough
                continue
            heard_from_broker = True
            try:
                msg = wire.decode(sub.recv_multipart(), (wire.Progress, wire.Metrics))
            except wire.WireError as exc:
                logger.warning("dropped a malformed message: {}", exc)
                continue
            if isinstance(msg, wire.Progress):
                if not config.quiet:
                    printer.show(progress_line(msg))
                continue
            latest = msg.snapshot
            if msg.final:
                if not config.quiet:
                    printer.finish(_final_progress(msg))
                _print_report(latest, config)
                return 0
    printer.end()
    if latest is not None:
        latest = {**latest, "state": f"{latest['state']}, partial: reporter stopped"}
        _print_report(latest, config)
    return 130


def _final_progress(msg: wire.Metrics) -> str:
    s = msg.snapshot
    t = s["tasks"]
    done = t["completed"] + t["failed"] + t["skipped"]
    return progress_line(wire.Progress(msg.batch_id, t["total"], done, t["failed"], t["in_flight"],
                                       s["workers"]["live"], s["duration_s"], t["skipped"]))


def _print_report(snapshot: dict, config: ReporterConfig) -> None:
    try:
        sys.stdout.write(report(snapshot) + "\n")
        sys.stdout.flush()
    except (OSError, ValueError, AttributeError):
        pass  # nobody reads it (`| head`, or stdout closed): not a failure of ours
    if config.report_json:
        with open(config.report_json, "wb") as f:
            f.write(wire.dumps_pretty(snapshot))
