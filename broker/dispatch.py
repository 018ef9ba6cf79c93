"""Who gets which job: credits, leases, redelivery. Pure state; no sockets.

Each sidecar announces a credit (how many jobs it may hold). A job goes only
to a live worker with free credit, the one with the most free credit first,
so no worker hoards queued jobs while another idles, and a worker that joins
mid-batch is served at once. The last jobs of a batch go only to workers
holding nothing. Every job handed out is a lease held by that worker until
its completion arrives. When a worker is lost (it said bye, its heartbeats
stopped, or its address vanished), its leases go back to the front of the
queue; the job it was busy with gets a strike, and a job with
``max_attempts`` strikes fails instead of killing more workers. A job a
worker refuses (its files are outside that worker's folders) waits for a
worker that has not refused it; ``unreachable`` tells when no live worker
can take any job left.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace

from broker.wire import Job

QUEUED, LEASED, DONE, FAILED = "queued", "leased", "done", "failed"
TERMINAL = frozenset({DONE, FAILED})


@dataclass
class JobState:
    job: Job
    status: str = QUEUED
    worker: str | None = None
    strikes: int = 0
    leased_at: float = 0.0
    sent_to: tuple[str, ...] = ()  # every worker this job was ever sent to
    refused_by: frozenset = frozenset()  # workers that cannot reach its files
    refusal: str = ""  # why the last of them could not


@dataclass
class WorkerState:
    id: str
    credit: int
    last_seen: float
    held: set = field(default_factory=set)
    busy_job: str | None = None
    busy_s: float = 0.0
    max_bytes: int = 0  # the largest job message it accepts; 0: not said

    @property
    def free(self) -> int:
        return self.credit - len(self.held)


@dataclass(frozen=True)
class Lost:
    """What losing a worker did: leases put back, and jobs failed for good."""

    worker_id: str
    requeued: tuple[str, ...]
    failed: tuple[tuple[str, str], ...]  # (job_id, error)


class Dispatcher:
    def __init__(self, jobs: list[Job], *, max_attempts: int = 3):
        self.jobs: dict[str, JobState] = {job.job_id: JobState(job) for job in jobs}
        self.queue: deque[str] = deque(self.jobs)
        # Jobs some worker refused, served before the queue but never to a
        # worker that refused them: grouped by who refused them (a handful of
        # groups), so that a worker finds one it may take without looking at
        # every refused job.
        self.refused: dict[frozenset, deque[str]] = {}
        self.workers: dict[str, WorkerState] = {}
        self.max_attempts = max_attempts
        self.leased = 0
        self.finished = 0

    # -- workers -------------------------------------------------------
    def register(self, worker_id: str, credit: int, now: float, max_bytes: int = 0) -> None:
        """A worker announced itself, or reminded us it is idle and alive.

        A reminder can cross a job on the wire, so it keeps the worker's leases.
        """
        worker = self.workers.get(worker_id)
        if worker is None:
            self.workers[worker_id] = WorkerState(worker_id, max(1, credit), now, max_bytes=max_bytes)
        else:
            worker.credit, worker.last_seen, worker.max_bytes = max(1, credit), now, max_bytes

    def seen(self, worker_id: str, now: float, busy_job: str | None = None,
             busy_s: float = 0.0) -> bool:
        worker = self.workers.get(worker_id)
        if worker is None:
            return False
        worker.last_seen = now
        worker.busy_job, worker.busy_s = busy_job, busy_s
        return True

    def forgive(self, now: float) -> None:
        """Restart every worker's silence clock (after the broker itself was paused)."""
        for worker in self.workers.values():
            worker.last_seen = now

    def silent_workers(self, now: float, timeout: float) -> list[str]:
        return [w.id for w in self.workers.values() if now - w.last_seen > timeout]

    def overdue_workers(self, limit_s: float) -> list[str]:
        """Workers stuck on one job for longer than ``limit_s``."""
        return [w.id for w in self.workers.values() if w.busy_job and w.busy_s > limit_s]

    def lose(self, worker_id: str, reason: str, culprit: str | None = None, died: bool = True) -> Lost | None:
        """Forget a worker; its leases go back to the queue (front first).

        A worker that ``died`` gives the job it was busy with (or ``culprit``)
        a strike; one that stopped on request blames no image.
        """
        worker = self.workers.pop(worker_id, None)
        if worker is None:
            return None
        culprit = (culprit or worker.busy_job) if died else None
        return self._take_back(worker, list(worker.held), lambda job_id: job_id == culprit, reason)

    def reclaim(self, worker_id: str, sent_before: float, reason: str) -> Lost | None:
        """The worker says nothing has reached it since ``sent_before``: jobs
        leased to it earlier were lost on the way (a dropped connection loses
        what was in it). They go back to the queue, each with a strike, so one
        that can never arrive fails instead of circling for ever."""
        worker = self.workers.get(worker_id)
        if worker is None:
            return None
        lost = [job_id for job_id in worker.held if self.jobs[job_id].leased_at < sent_before]
        return self._take_back(worker, lost, lambda _job_id: True, reason) if lost else None

    def _take_back(self, worker: WorkerState, job_ids: list[str], strike, reason: str) -> Lost:
        requeued, failed = [], []
        for job_id in sorted(job_ids, reverse=True):
            worker.held.discard(job_id)
            state = self.jobs[job_id]
            if state.status != LEASED or state.worker != worker.id:
                continue
            self.leased -= 1
            state.worker = None
            if strike(job_id):
                state.strikes += 1
                if state.strikes >= self.max_attempts:
                    state.status = FAILED
                    self.finished += 1
                    failed.append((job_id, f"gave up after {state.strikes} attempts: {reason}"))
                    continue
            state.status = QUEUED
            state.job = replace(state.job, attempt=state.job.attempt + 1)
            self.queue.appendleft(job_id)
            requeued.append(job_id)
        return Lost(worker.id, tuple(requeued), tuple(failed))

    # -- jobs ----------------------------------------------------------
    def next_assignment(self, now: float = 0.0) -> tuple[str, Job] | None:
        """The next (worker id, job) to send at time ``now``, or None when nobody can take one."""
        passed_over: tuple[str, ...] = ()
        while self.queue or self.refused:
            worker = self._taker(passed_over)
            if worker is None:
                return None
            state = self._job_for(worker)
            if state is None:
                passed_over += (worker.id,)  # it refused what is left: another worker may not
                continue
            state.status, state.worker, state.leased_at = LEASED, worker.id, now
            state.sent_to += (worker.id,)
            worker.held.add(state.job.job_id)
            self.leased += 1
            return worker.id, state.job
        return None

    def _job_for(self, worker: WorkerState) -> JobState | None:
        """The first job waiting that ``worker`` has not refused, if any."""
        for refused_by, waiting in list(self.refused.items()):
            if worker.id in refused_by:
                continue
            while waiting:
                state = self.jobs[waiting.popleft()]
                if state.status == QUEUED:  # else finished meanwhile
                    if not waiting:
                        del self.refused[refused_by]
                    return state
            del self.refused[refused_by]
        while self.queue:
            state = self.jobs[self.queue.popleft()]
            if state.status == QUEUED:  # else finished meanwhile by a late completion
                return state
        return None

    def refuse(self, worker_id: str, job_id: str, reason: str) -> bool:
        """The worker cannot reach this job's files: it waits for another
        worker. False if the worker did not hold it."""
        state = self._release(worker_id, job_id)
        if state is None:
            return False
        state.refusal = reason
        state.refused_by |= {worker_id}
        state.status = QUEUED
        self.refused.setdefault(state.refused_by, deque()).append(job_id)
        return True

    def unreachable(self) -> list[str] | None:
        """The jobs left, when every one has been refused by every live worker
        (so none can be sent); None while any worker can still do something.

        Not a reason to fail them yet: the pool is whoever is connected now,
        and a worker that can reach them may be about to join.
        """
        if not self.workers or self.leased:
            return None
        for refused_by in list(self.refused):  # first forget jobs finished meanwhile
            waiting = deque(job_id for job_id in self.refused[refused_by] if self.jobs[job_id].status == QUEUED)
            if waiting:
                self.refused[refused_by] = waiting
            else:
                del self.refused[refused_by]
        if any(w not in refused_by for refused_by in self.refused for w in self.workers):
            return None  # some worker may take some of them
        waiting = [job_id for group in self.refused.values() for job_id in group]
        if not waiting or len(waiting) != self.queued:
            return None  # none left, or some in the main queue, not refused yet
        return waiting

    def _taker(self, passed_over: tuple[str, ...] = ()) -> WorkerState | None:
        """The worker with the most free credit, if any has some.

        The last few jobs (no more than there are workers) go only to workers
        holding nothing: queued behind another job, a last job would wait
        while some other worker sits idle and the batch could be over.
        """
        last_jobs = self.queued <= len(self.workers)
        # A worker's credit grows for short jobs (to hide the refill delay); in
        # a small batch that would let the first fast worker hoard what the
        # others are about to ask for, so no worker holds more than a quarter
        # of its share of what is still queued (and never less than 2).
        cap = max(2, -(-self.queued // (4 * len(self.workers)))) if self.workers else 0
        best, best_free = None, 0
        for worker in self.workers.values():
            free = min(worker.credit, cap) - len(worker.held)
            if free > best_free and not (last_jobs and worker.held) and worker.id not in passed_over:
                best, best_free = worker, free
        return best

    def unsend(self, worker_id: str, job_id: str) -> None:
        """The send failed: the job never left, put it back first in line."""
        if self.give_back(worker_id, job_id):
            state = self.jobs[job_id]
            state.sent_to = state.sent_to[:-1]

    def give_back(self, worker_id: str, job_id: str) -> bool:
        """The worker will not do this job (it never started it): first in line
        again, no strike. False if the worker did not hold it."""
        state = self._release(worker_id, job_id)
        if state is None:
            return False
        state.status = QUEUED
        self.queue.appendleft(job_id)
        return True

    def _release(self, worker_id: str, job_id: str) -> JobState | None:
        """End the worker's lease on a job it will not do; the job's state, or
        None if it held no lease on it (the caller says what becomes of it)."""
        state = self.jobs.get(job_id)
        worker = self.workers.get(worker_id)
        if worker is not None:
            worker.held.discard(job_id)
        if state is None or state.status != LEASED or state.worker != worker_id:
            return None
        state.worker = None
        self.leased -= 1
        return state

    def complete(self, job_id: str, worker_id: str, ok: bool) -> str:
        """Record a completion: 'new', 'duplicate', 'unknown' or 'unsent'.

        Only a worker the job was sent to can complete it ('unsent' otherwise);
        a late completion from a worker written off still counts: it did the work.
        """
        state = self.jobs.get(job_id)
        if state is None:
            return "unknown"
        if worker_id not in state.sent_to:
            return "unsent"
        worker = self.workers.get(worker_id)
        if worker is not None:
            worker.held.discard(job_id)
            if worker.busy_job == job_id:
                worker.busy_job = None
        if state.status in TERMINAL:
            return "duplicate"
        if state.status == LEASED:
            # If another worker holds a redelivered copy, it keeps that lease
            # until its own (duplicate) completion frees the credit.
            self.leased -= 1
        state.status = DONE if ok else FAILED
        state.worker = worker_id
        self.finished += 1
        return "new"

    def fail(self, job_id: str) -> None:
        """Fail a job that never reached a worker (or whose worker is gone)."""
        state = self.jobs[job_id]
        if state.status in TERMINAL:
            return
        if state.status == LEASED:
            self.leased -= 1
            worker = self.workers.get(state.worker)
            if worker is not None:
                worker.held.discard(job_id)  # its credit is free again
        state.status = FAILED
        self.finished += 1

    @property
    def remaining(self) -> int:
        return len(self.jobs) - self.finished

    @property
    def queued(self) -> int:
        """Jobs waiting to be sent (the deque may still hold some finished meanwhile)."""
        return len(self.jobs) - self.finished - self.leased

    def held_by(self) -> dict[str, int]:
        return {w.id: len(w.held) for w in self.workers.values()}
