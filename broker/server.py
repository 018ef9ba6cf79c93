"""The broker process: ventilator and sink around one poll loop.

Sockets (all bound here; sidecars and reporters connect):
  jobs     ROUTER  in: ready (a sidecar's credit)     out: job, jobs, recall
  results  PULL    in: done, refused, dropped, heartbeat, bye
  metrics  PUB     out: progress (a few per second), metrics (full snapshots)

Ventilator and sink share one process because dispatching depends on
completions: a completion frees a worker's credit and ends a lease, and the
manifest of every job sent is needed to tell a lost job from a duplicate.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
import uuid

import zmq
from loguru import logger

from broker import wire
from broker.config import (BrokerConfig, StopFlag, image_message_limit, make_socket, recv_frames,
                           send_frames)
from broker.dispatch import Dispatcher, Lost
from broker.inputs import Plan, PlanningInterrupted, Planner
from broker.metrics import BatchMetrics
from broker.paths import PathError, check_output_path, read_input, sweep_temp_files, write_atomically
from broker.security import SecurityError, check_exposure, secure_server, server_keys, start_authenticator

PROGRESS_EVERY_S = 0.25
METRICS_EVERY_S = 1.0
HOUSEKEEPING_EVERY_S = 0.5
PAUSE_S = 2.0
PUBLISHED_LIST_MAX = 100
PUBLISHED_TEXT_MAX = 400
FINAL_EVERY_S = 0.25
# After an interrupted batch: how long completions already on their way are
# still taken, before the jobs without one are recorded unfinished.
SETTLE_S = 0.2

EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130


def plan_batch(config: BrokerConfig, batch_id: str, stop: StopFlag | None = None) -> Plan:
    planner = Planner(batch_id, config.output_dir, config.settings, max_pixels=config.max_pixels,
                      max_bytes=config.max_image_bytes, skip_existing=config.skip_existing,
                      confine_outputs=config.output_dir_given, should_stop=lambda: bool(stop))
    if config.inputs:
        planner.add_inputs(list(config.inputs))
    if config.jobs_file:
        planner.add_batch_file(config.jobs_file)
    return planner.plan()


class Broker:
    """State and message handlers; ``run()`` drives it with real sockets."""

    def __init__(self, config: BrokerConfig, plan: Plan, batch_id: str):
        self.config = config
        self.batch_id = batch_id
        self.dispatcher = Dispatcher(plan.jobs, max_attempts=config.max_attempts)
        total = len(plan.jobs) + len(plan.rejected) + len(plan.skipped)
        self.metrics = BatchMetrics(batch_id, total)
        # Opened only once the sockets are bound: a broker that cannot start
        # (say, its ports are taken) must not truncate someone's results file.
        self.results = None  # the open file; False once a write failed and it was given up on
        self._pending_lines: list[bytes] = []
        # One of the broker's own files could not be written (a full disk): the
        # batch goes on, its exit status says something is missing.
        self.file_lost = False
        self.first_ready: float | None = None
        self.dispatching = False
        self.last_worker_seen = time.monotonic()
        self.stopping_since: float | None = None
        self.stuck_since: float | None = None  # since when only refused jobs are left
        # When the broker last looked at its sockets: a message read now was
        # sent after that at the earliest (much after, if we were paused).
        self.last_poll = time.monotonic()
        for rejected in plan.rejected:
            self.metrics.record_failure(rejected.job_id, rejected.input, rejected.error)
            self._result_line(rejected.job_id, rejected.input, rejected.output, ok=False,
                              error=rejected.error)
        for job in plan.skipped:
            self.metrics.skipped += 1
            self._result_line(job.job_id, job.input, job.output, ok=True, skipped=True,
                              out_bytes=_size(job.output))

    # -- messages ------------------------------------------------------
    def handle_ready(self, identity: bytes, msg: wire.Ready, now: float) -> None:
        if identity != msg.worker_id.encode():
            logger.warning("ready from {!r} claims worker id {}; dropped", identity[:64], msg.worker_id)
            return
        if msg.worker_id not in self.dispatcher.workers:
            logger.info("worker {} joined (pid {} on {}, credit {})", msg.worker_id, msg.pid, msg.host, msg.credit)
        self.dispatcher.register(msg.worker_id, msg.credit, now, msg.max_bytes)
        if msg.idle_s > 0:
            logger.debug("worker {} idle for {:.1f} s", msg.worker_id, msg.idle_s)
            # Counted back from when it may have been sent, not from now: after
            # a pause of ours, "idle for 2 s" may be many seconds old.
            lost = self.dispatcher.reclaim(msg.worker_id, min(now, self.last_poll) - msg.idle_s,
                                           f"lost between the broker and worker {msg.worker_id} "
                                           "(its connection dropped?)")
            if lost is not None:
                self._record_lost(lost, "is idle, but job(s) sent to it never came back")
        stats = self.metrics.worker(msg.worker_id, now)
        stats.state = "live"
        self.first_ready = self.first_ready or now
        self.last_worker_seen = now
        self.open_gate(now)

    def handle_heartbeat(self, msg: wire.Heartbeat, now: float) -> None:
        if self.dispatcher.seen(msg.worker_id, now, msg.busy_job, msg.busy_s):
            self.last_worker_seen = now
            stats = self.metrics.worker(msg.worker_id, now)
            stats.rss_mb, stats.peak_rss_mb = msg.rss_mb, max(stats.peak_rss_mb, msg.peak_rss_mb)

    def handle_bye(self, msg: wire.Bye, now: float) -> None:
        logger.info("worker {} left: {}", msg.worker_id, msg.reason)
        # A worker that says "stopping" left cleanly; any other bye (its
        # watchdog giving up on a job) is a death like a crash.
        self._lose(msg.worker_id, msg.reason, culprit=msg.job_id, dead=msg.reason != wire.BYE_STOPPING)

    def handle_dropped(self, msg: wire.Dropped) -> None:
        if msg.batch_id != self.batch_id:
            return
        returned = sum(self.dispatcher.give_back(msg.worker_id, job_id) for job_id in msg.job_ids)
        logger.info("worker {} gave back {} job(s) it had not started", msg.worker_id, returned)

    def handle_refused(self, msg: wire.Refused, now: float) -> None:
        if msg.batch_id != self.batch_id or not self.dispatcher.refuse(msg.worker_id, msg.job_id, msg.reason):
            return  # not its job (any more)
        self.dispatcher.seen(msg.worker_id, now)
        stats = self.metrics.worker(msg.worker_id, now)
        stats.refused += 1
        if stats.refused == 1:
            logger.warning("worker {} refuses jobs, which go to other workers: {}", msg.worker_id, msg.reason)

    def handle_done(self, msg: wire.Done, now: float, payload: bytes | None = None) -> None:
        if msg.batch_id != self.batch_id:
            logger.warning("completion for another batch ({}) from {}; dropped", msg.batch_id, msg.worker_id)
            return
        outcome = self.dispatcher.complete(msg.job_id, msg.worker_id, msg.ok)
        if outcome == "unknown":
            logger.warning("completion for unknown job {} from {}; dropped", msg.job_id, msg.worker_id)
            return
        if outcome == "unsent":
            logger.warning("completion of {} from {}, which was never sent it; dropped", msg.job_id, msg.worker_id)
            return
        self.dispatcher.seen(msg.worker_id, now)
        if msg.peak_rss_mb:
            stats = self.metrics.worker(msg.worker_id, now)
            stats.peak_rss_mb = max(stats.peak_rss_mb, msg.peak_rss_mb)
        if outcome == "duplicate":
            self.metrics.duplicates += 1
            logger.info("duplicate completion of {} from {} ignored", msg.job_id, msg.worker_id)
            return
        job = self.dispatcher.jobs[msg.job_id].job
        if msg.ok and self.config.transport == "bytes":
            msg = self._write_output(job, msg, payload)
        if msg.ok:
            self.metrics.record_success(msg.worker_id, msg.elapsed_s, msg.in_bytes, msg.out_bytes,
                                        msg.format or "?", msg.kept_original, msg.timings)
        else:
            error = msg.error or "failed without an error message"
            logger.bind(job_id=msg.job_id, worker_id=msg.worker_id).warning(
                "{} failed on {}: {}", job.input, msg.worker_id, error)
            self.metrics.record_failure(msg.job_id, job.input, error, msg.worker_id, msg.elapsed_s)
        if self.config.results_jsonl:  # checked here too: building the line's fields costs 1 us a job
            self._result_line(msg.job_id, job.input, job.output, ok=msg.ok, error=msg.error,
                              worker_id=msg.worker_id, attempt=job.attempt, in_bytes=msg.in_bytes,
                              out_bytes=msg.out_bytes, width=msg.width, height=msg.height,
                              format=msg.format, kept_original=msg.kept_original,
                              elapsed_s=msg.elapsed_s, timings=msg.timings)

    def _write_output(self, job: wire.Job, msg: wire.Done, payload: bytes | None) -> wire.Done:
        """Bytes transport: the broker writes what the worker sent back."""
        try:
            if payload is None:
                raise PathError("the worker sent no image back")
            check_output_path(job.input, job.output)
            write_atomically(job.output, payload, f"broker-{job.job_id}")
        except (PathError, OSError) as exc:
            error = str(exc) if isinstance(exc, PathError) else f"cannot write output: {exc.strerror or exc}"
            return dataclasses.replace(msg, ok=False, error=error)
        return msg

    def read_payload(self, job: wire.Job, worker_id: str) -> bytes | None:
        """Bytes transport: the input to send, or None after failing the job."""
        try:
            payload = read_input(job.input, self.config.max_image_bytes)
        except PathError as exc:
            return self._fail_unsent(job, str(exc))
        limit = self.dispatcher.workers[worker_id].max_bytes
        if limit and len(payload) > limit:
            # The limit is per frame. Sent anyway, libzmq would drop it and
            # cut the worker off for good.
            return self._fail_unsent(job, f"image of {len(payload) / 1e6:.1f} MB is larger than worker "
                                          f"{worker_id} accepts (its --max-image-mb)")
        return payload

    def _fail_unsent(self, job: wire.Job, error: str) -> None:
        self.dispatcher.fail(job.job_id)
        self.metrics.record_failure(job.job_id, job.input, error, None)
        self._result_line(job.job_id, job.input, job.output, ok=False, error=error)
        return None

    # -- time-driven ---------------------------------------------------
    def housekeeping(self, now: float) -> None:
        cfg = self.config
        for worker_id in self.dispatcher.silent_workers(now, cfg.heartbeat_timeout_s):
            self._lose(worker_id, f"worker {worker_id} stopped responding (no heartbeat for "
                                  f"{cfg.heartbeat_timeout_s:g} s)")
        for worker_id in self.dispatcher.overdue_workers(cfg.job_timeout_s + cfg.heartbeat_timeout_s):
            self._lose(worker_id, f"job ran past --job-timeout {cfg.job_timeout_s:g} s on {worker_id}")
        if self.dispatcher.workers:
            self.last_worker_seen = now
        if self.stopping_since is None:
            self._fail_unreachable(now)
        self.open_gate(now)

    def _fail_unreachable(self, now: float) -> None:
        """Jobs every live worker has refused wait, as for a pool with no
        worker, up to --no-worker-timeout for one that can reach them."""
        unreachable = self.dispatcher.unreachable()
        if unreachable is None:
            self.stuck_since = None
            return
        timeout = self.config.no_worker_timeout_s
        if self.stuck_since is None:
            self.stuck_since = now
            logger.warning("every live worker has refused the {} job(s) left; waiting up to {:g} s "
                           "(--no-worker-timeout) for a worker that can reach them", len(unreachable), timeout)
        elif now - self.stuck_since >= timeout:
            for job_id in unreachable:
                state = self.dispatcher.jobs[job_id]
                error = f"no worker could reach it within {timeout:g} s (--no-worker-timeout): {state.refusal}"
                logger.bind(job_id=job_id).warning("{} failed: {}", state.job.input, error)
                self._fail_unsent(state.job, error)

    def open_gate(self, now: float) -> None:
        """Start dispatching once the expected pool is here (or waited for long enough)."""
        cfg = self.config
        if not self.dispatching and self.first_ready is not None and (
            len(self.dispatcher.workers) >= cfg.min_workers or now - self.first_ready >= cfg.ready_wait_s
        ):
            self.dispatching = True
            self.metrics.start(now)
            logger.info("dispatching {} jobs to {} workers", self.dispatcher.remaining,
                        len(self.dispatcher.workers))

    def no_workers_for(self, now: float) -> float:
        return 0.0 if self.dispatcher.workers else now - self.last_worker_seen

    def _lose(self, worker_id: str, reason: str, culprit: str | None = None, dead: bool = True) -> Lost | None:
        lost = self.dispatcher.lose(worker_id, reason, culprit, died=dead)
        if lost is None:
            return None
        stats = self.metrics.worker(worker_id)
        stats.state = "dead" if dead else "gone"
        self._record_lost(lost, f"lost ({reason})")
        return lost

    def _record_lost(self, lost: Lost, what: str) -> None:
        if lost.requeued and self.stopping_since is not None:
            # Stopping: nothing is sent again, so these stay unfinished.
            logger.info("worker {} {}; its {} unstarted job(s) stay unfinished", lost.worker_id, what,
                        len(lost.requeued))
        elif lost.requeued:
            self.metrics.redelivered += len(lost.requeued)
            logger.warning("worker {} {}; redelivering {} job(s)", lost.worker_id, what, len(lost.requeued))
        for job_id, error in lost.failed:
            job = self.dispatcher.jobs[job_id].job
            logger.error("{} failed: {}", job.input, error)
            self.metrics.record_failure(job_id, job.input, error, None)
            self._result_line(job_id, job.input, job.output, ok=False, error=error, attempt=job.attempt)

    def note_unfinished(self) -> None:
        """Interrupted: every job not done gets a results line saying so."""
        for job_id, state in self.dispatcher.jobs.items():
            if state.status in ("queued", "leased"):
                self._result_line(job_id, state.job.input, state.job.output, ok=False, unfinished=True,
                                  error="not finished: the batch was interrupted")

    def fail_remaining(self, error: str) -> None:
        for job_id, state in self.dispatcher.jobs.items():
            if state.status in ("queued", "leased"):
                self.dispatcher.fail(job_id)
                self.metrics.record_failure(job_id, state.job.input, error, None)
                self._result_line(job_id, state.job.input, state.job.output, ok=False, error=error)

    # -- output --------------------------------------------------------
    def snapshot(self, now: float) -> dict:
        snap = self.metrics.snapshot(now, queued=self.dispatcher.queued, in_flight=self.dispatcher.leased,
                                     live_workers=self.dispatcher.held_by())
        if self.metrics.state != "running" and self.dispatcher.remaining:
            snap["unfinished"] = [
                {"job_id": job_id, "input": s.job.input, "state": s.status, "worker_id": s.worker}
                for job_id, s in self.dispatcher.jobs.items() if s.status in ("queued", "leased")
            ]
        return snap

    def progress(self, now: float) -> wire.Progress:
        m = self.metrics
        return wire.Progress(self.batch_id, m.total, m.finished, m.failed, self.dispatcher.leased,
                             len(self.dispatcher.workers), now - m.started, m.skipped)

    def open_results(self) -> None:
        if self.config.results_jsonl:
            self.results = open(self.config.results_jsonl, "wb", buffering=0)
            self._write_results(b"".join(self._pending_lines))
            self._pending_lines.clear()

    def _result_line(self, job_id: str, input_path: str, output: str, **fields) -> None:
        if not self.config.results_jsonl or self.results is False:
            return
        line = wire.dumps({"job_id": job_id, "input": input_path, "output": output, **fields}) + b"\n"
        if self.results is None:
            self._pending_lines.append(line)
        else:
            self._write_results(line)

    def _write_results(self, data: bytes) -> None:
        try:
            self.results.write(data)
        except OSError as exc:
            self.file_lost = True
            logger.error("cannot write {}: {}; the results lines from here on are lost (the batch goes on)",
                         self.config.results_jsonl, exc.strerror or exc)
            self.results.close()
            self.results = False  # given up on

    def close(self) -> None:
        if self.results:
            self.results.close()


class CannotListen(Exception):
    """An endpoint could not be bound (taken, or not an address of this host)."""


def run(config: BrokerConfig, stop: StopFlag) -> int:
    """Run one batch to the end; return the process exit code."""
    batch_id = uuid.uuid4().hex[:12]
    try:
        plan = plan_batch(config, batch_id, stop)
    except PlanningInterrupted:
        logger.warning("{} while planning the batch; nothing was sent", stop.signal_name)
        return EXIT_INTERRUPTED
    check_own_files(config, plan)
    logger.info("batch {}: {} jobs, {} rejected, {} skipped, {} non-image files ignored", batch_id,
                len(plan.jobs), len(plan.rejected), len(plan.skipped), plan.ignored_files)
    broker = Broker(config, plan, batch_id)
    try:
        with zmq.Context() as ctx:
            return _serve(ctx, broker, stop)
    finally:
        broker.close()


def _serve(ctx: zmq.Context, broker: Broker, stop: StopFlag) -> int:
    cfg = broker.config
    keys = server_keys(cfg.key_file, cfg.authorized_keys)
    exposed = check_exposure([cfg.jobs_endpoint, cfg.results_endpoint, cfg.metrics_endpoint], keys, cfg.insecure)
    if exposed and keys is None:
        logger.warning("INSECURE: {} open to the network without authentication or encryption; anyone who "
                       "can reach it can submit or read jobs", ", ".join(exposed))
    auth = start_authenticator(ctx, keys) if keys else None
    router = make_socket(ctx, zmq.ROUTER)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)   # a send to a vanished worker raises
    router.setsockopt(zmq.ROUTER_HANDOVER, 1)    # a reconnecting worker takes its id back
    pull = make_socket(ctx, zmq.PULL, max_bytes=image_message_limit(cfg.max_image_bytes))
    pub = make_socket(ctx, zmq.PUB, linger=0, receives=False)
    for sock in (router, pull, pub):
        secure_server(sock, keys)
    try:
        return _serve_batch(broker, router, pull, pub, stop)
    finally:
        if auth is not None:
            auth.stop()


def _serve_batch(broker: Broker, router, pull, pub, stop: StopFlag) -> int:
    cfg = broker.config
    with router, pull, pub:
        for sock, endpoint in ((router, cfg.jobs_endpoint), (pull, cfg.results_endpoint),
                               (pub, cfg.metrics_endpoint)):
            try:
                sock.bind(endpoint)
            except zmq.ZMQError as exc:
                raise CannotListen(f"cannot listen on {endpoint}: {zmq.strerror(exc.errno)} "
                                   "(another broker there? choose other endpoints)") from None
        broker.open_results()
        logger.info("listening: jobs {} results {} metrics {}", cfg.jobs_endpoint,
                    cfg.results_endpoint, cfg.metrics_endpoint)
        state, code = _loop(broker, router, pull, pub, stop)
        # However the batch ended, no image of it may be written from now on:
        # a worker written off (one only paused, say) still holds some, for
        # jobs now recorded failed, unfinished or done by another worker.
        _recall(broker, router, in_hand=True)
        if state == "interrupted":
            _settle(broker, pull)
            broker.note_unfinished()
        now = time.monotonic()
        broker.metrics.finish(state, now)
        snapshot = broker.snapshot(now)
        m = broker.metrics
        logger.info("batch {} {}: {} succeeded, {} failed, {} skipped of {} in {:.2f} s", broker.batch_id,
                    state, m.completed, m.failed, m.skipped, m.total, snapshot["duration_s"])
        try:
            _write_report(cfg.report_json, snapshot)
        except OSError as exc:
            broker.file_lost = True
            logger.error("cannot write the report {}: {}", cfg.report_json, exc.strerror or exc)
        if broker.file_lost and code == EXIT_OK:
            code = EXIT_FAILED
        swept = sweep_temp_files(s.job.output for s in broker.dispatcher.jobs.values())
        if swept:
            logger.info("removed {} temporary file(s) left by lost workers", swept)
        _linger(pub, broker, snapshot, stop)
        return code


def _loop(broker: Broker, router, pull, pub, stop: StopFlag) -> tuple[str, int]:
    cfg = broker.config
    poller = stop.poller(router, pull)
    last_progress = last_metrics = last_house = 0.0
    signals_seen = False
    last_tick = time.monotonic()
    while True:
        events = dict(poller.poll(100))
        now = time.monotonic()
        if now - last_tick > PAUSE_S:
            # We were not running (stopped, suspended, starved): the workers'
            # silence is ours, so their clocks restart now.
            broker.dispatcher.forgive(now)
        broker.last_poll, last_tick = last_tick, now
        if stop.wakeup_fd in events:
            stop.drain()
        # Completions first: a worker's "I am idle" may have been sent after
        # completions that are waiting here too.
        if pull in events:
            _drain(pull, broker, now, from_router=False)
        if router in events:
            _drain(router, broker, now, from_router=True)
        if now - last_house >= HOUSEKEEPING_EVERY_S:
            broker.housekeeping(now)
            last_house = now
            if stop.parent_gone() and not stop:
                stop.set("launcher exited")
        if stop and not signals_seen:
            signals_seen = True
            broker.stopping_since = now
            logger.warning("{}: no new jobs; waiting up to {:g} s for the {} in flight",
                           stop.signal_name, cfg.grace_s, broker.dispatcher.leased)
            _recall(broker, router)
        if broker.dispatching and not signals_seen:
            _dispatch(broker, router)
        if now - last_progress >= PROGRESS_EVERY_S:
            pub.send_multipart(wire.encode(broker.progress(now)))
            last_progress = now
        if now - last_metrics >= METRICS_EVERY_S:
            pub.send_multipart(wire.encode(wire.Metrics(broker.batch_id, False, for_publishing(broker.snapshot(now)))))
            last_metrics = now
        if broker.dispatcher.remaining == 0:
            return "done", EXIT_OK if broker.metrics.failed == 0 else EXIT_FAILED
        if signals_seen and (broker.dispatcher.leased == 0 or now - broker.stopping_since >= cfg.grace_s
                             or stop.count > 1):
            return "interrupted", EXIT_INTERRUPTED
        if broker.no_workers_for(now) >= cfg.no_worker_timeout_s:
            if broker.first_ready is None:
                error = f"no worker joined within {cfg.no_worker_timeout_s:g} s; batch aborted"
            else:
                error = f"no live worker for {cfg.no_worker_timeout_s:g} s; batch aborted"
            logger.error(error)
            broker.fail_remaining(error)
            return "aborted", EXIT_FAILED


def _settle(broker: Broker, pull) -> None:
    """Take the completions sent just before the batch was cut short.

    A worker that wrote its image a moment before the stop reports it a
    moment after: counted, rather than its output left on disk unrecorded.
    """
    deadline = time.monotonic() + SETTLE_S
    while broker.dispatcher.leased and (left := deadline - time.monotonic()) > 0:
        if pull.poll(left * 1000):
            _drain(pull, broker, time.monotonic(), from_router=False)


def _drain(sock, broker: Broker, now: float, from_router: bool) -> None:
    """Handle every message waiting on ``sock``; bad ones are logged and dropped."""
    for _ in range(10_000):
        try:
            frames = recv_frames(sock, nowait=True)
        except zmq.Again:
            return
        identity = frames.pop(0) if from_router else None
        try:
            expect = (wire.Ready,) if from_router else (wire.Done, wire.Heartbeat, wire.Bye, wire.Dropped,
                                                        wire.Refused)
            msg, payload = wire.decode_with_payload(frames, expect)
        except wire.WireError as exc:
            logger.warning("dropped a malformed message: {}", exc)
            continue
        if isinstance(msg, wire.Ready):
            broker.handle_ready(identity, msg, now)
        elif isinstance(msg, wire.Done):
            broker.handle_done(msg, now, payload)
        elif isinstance(msg, wire.Heartbeat):
            broker.handle_heartbeat(msg, now)
        elif isinstance(msg, wire.Dropped):
            broker.handle_dropped(msg)
        elif isinstance(msg, wire.Refused):
            broker.handle_refused(msg, now)
        else:
            broker.handle_bye(msg, now)


def _dispatch(broker: Broker, router) -> None:
    """Send every job the workers have credit for.

    Path transport: the jobs for one worker go in one message. Bytes
    transport: one job a message, its image in a frame of its own.
    """
    now = time.monotonic()
    if broker.config.transport == "bytes":
        while (assignment := broker.dispatcher.next_assignment(now)) is not None:
            worker_id, job = assignment
            payload = broker.read_payload(job, worker_id)
            # (A payload of None: unreadable, and already failed with a clear error.)
            if payload is not None and not _send_jobs(broker, router, worker_id, [job], payload):
                return
        return
    batches: dict[str, list[wire.Job]] = {}
    while (assignment := broker.dispatcher.next_assignment(now)) is not None:
        batches.setdefault(assignment[0], []).append(assignment[1])
    for worker_id, jobs in batches.items():
        _send_jobs(broker, router, worker_id, jobs)


def _send_jobs(broker: Broker, router, worker_id: str, jobs: list[wire.Job], payload: bytes | None = None) -> bool:
    """Send ``jobs`` to one worker; if that fails, they go back in the queue (and False)."""
    msg = jobs[0] if len(jobs) == 1 else wire.Jobs(jobs)
    try:
        send_frames(router, [worker_id.encode(), *wire.encode(msg, payload)], nowait=True,
                    copy=payload is None)
        return True
    except zmq.Again:
        reason = None  # its queue is full: the jobs wait for the next round
    except zmq.ZMQError as exc:
        if exc.errno != zmq.EHOSTUNREACH:
            raise
        reason = f"worker {worker_id} disconnected"
    for job in reversed(jobs):  # back at the front of the queue, in their order
        broker.dispatcher.unsend(worker_id, job.job_id)
    if reason:
        broker._lose(worker_id, reason)
    return False


def _recall(broker: Broker, router, in_hand: bool = False) -> None:
    """Ask every worker to drop the jobs it has not started.

    A standalone sidecar would otherwise work through them after we have
    recorded them unfinished, writing outputs no report counts. A worker
    written off (one only paused, say) is also told to drop its image in
    hand, whose job we took back; ``in_hand`` tells every worker, once we
    stop waiting.
    """
    live = broker.dispatcher.workers
    # Every worker the batch has known, written-off ones too: a worker that
    # was only paused still holds its queue and would work through it.
    for worker_id in sorted(broker.metrics.workers):
        recall = wire.Recall(broker.batch_id, in_hand=in_hand or worker_id not in live)
        try:
            send_frames(router, [worker_id.encode(), *wire.encode(recall)], nowait=True)
        except zmq.ZMQError as exc:  # full, or gone (EHOSTUNREACH) with its queue
            if exc.errno != zmq.EHOSTUNREACH:
                logger.warning("could not ask worker {} to drop its queued jobs", worker_id)


def _linger(pub, broker: Broker, snapshot: dict, stop: StopFlag) -> None:
    """Keep publishing the final snapshot so late or slow reporters still get it."""
    final = wire.encode(wire.Metrics(broker.batch_id, True, for_publishing(snapshot)))
    signals_at_end = stop.count
    deadline = time.monotonic() + broker.config.linger_s
    while time.monotonic() < deadline and stop.count == signals_at_end and not stop.parent_gone():
        pub.send_multipart(final)
        stop.wait_for_more(signals_at_end, FINAL_EVERY_S)


def for_publishing(snapshot: dict) -> dict:
    """The snapshot with its lists cut to what a console shows.

    Every snapshot must fit in one message (receivers refuse larger ones):
    100 000 failures with long paths would not. The full lists go to
    --report-json and --results-jsonl.
    """
    short = dict(snapshot)
    for key in ("failures", "unfinished"):
        items = snapshot.get(key) or []
        short[key] = [{k: _clip(v) for k, v in item.items()} for item in items[:PUBLISHED_LIST_MAX]]
    return short


def _clip(value):
    return value[:PUBLISHED_TEXT_MAX] + "…" if isinstance(value, str) and len(value) > PUBLISHED_TEXT_MAX else value


def check_own_files(config: BrokerConfig, plan: Plan) -> None:
    """The broker's own files (report, results) must never replace an input."""
    for flag, path in (("--report-json", config.report_json), ("--results-jsonl", config.results_jsonl)):
        if path and os.path.realpath(path) in plan.real_inputs:
            raise SecurityError(f"refusing to write {flag} over an input image: {path}")


def _write_report(path: str | None, snapshot: dict) -> None:
    if not path:
        return
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(wire.dumps_pretty(snapshot))
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0
