"""Batch metrics, built only from the completions workers actually reported.

A pure accumulator: feed it outcomes, ask it for a snapshot (a plain dict,
the same one the reporter renders and ``--report-json`` writes). No sockets.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

STAGES = ("decode", "resize", "encode", "write")


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile of ``values`` (0 for an empty list)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class WorkerStats:
    id: str
    first_seen: float
    tasks: int = 0
    failures: int = 0
    refused: int = 0  # jobs outside its folders, left to other workers
    busy_s: float = 0.0
    state: str = "live"
    rss_mb: float = 0.0
    peak_rss_mb: float = 0.0


@dataclass
class FormatStats:
    count: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


@dataclass
class BatchMetrics:
    batch_id: str
    total: int
    created: float = field(default_factory=time.monotonic)
    started: float = field(default_factory=time.monotonic)
    started_wall: float = field(default_factory=time.time)
    startup_s: float = 0.0
    completed: int = 0
    failed: int = 0
    skipped: int = 0
    redelivered: int = 0
    duplicates: int = 0
    kept_original: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    ended: float | None = None
    state: str = "running"
    durations: list = field(default_factory=list)
    ratios: list = field(default_factory=list)
    stage_totals: dict = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    staged: int = 0  # completions that timed their stages (workers time a sample)
    workers: dict = field(default_factory=dict)
    formats: dict = field(default_factory=dict)
    failures: list = field(default_factory=list)

    def start(self, now: float) -> None:
        """The first job goes out: the clock starts; waiting for workers is start-up."""
        self.startup_s = now - self.created
        self.started, self.started_wall = now, time.time()

    def worker(self, worker_id: str, now: float | None = None) -> WorkerStats:
        stats = self.workers.get(worker_id)
        if stats is None:
            stats = self.workers[worker_id] = WorkerStats(worker_id, now or time.monotonic())
        return stats

    def record_success(self, worker_id: str, elapsed_s: float, in_bytes: int, out_bytes: int,
                       fmt: str, kept_original: bool, timings: dict) -> None:
        self.completed += 1
        stats = self.worker(worker_id)
        stats.tasks += 1
        stats.busy_s += elapsed_s
        self.durations.append(elapsed_s)
        self.bytes_in += in_bytes
        self.bytes_out += out_bytes
        if in_bytes:
            self.ratios.append(out_bytes / in_bytes)
        self.kept_original += kept_original
        per_format = self.formats.setdefault(fmt, FormatStats())
        per_format.count += 1
        per_format.bytes_in += in_bytes
        per_format.bytes_out += out_bytes
        if timings:
            self.staged += 1
            for stage in STAGES:
                self.stage_totals[stage] += float(timings.get(stage, 0.0))

    def record_failure(self, job_id: str, input_path: str, error: str,
                       worker_id: str | None = None, elapsed_s: float = 0.0) -> None:
        self.failed += 1
        if worker_id is not None:
            stats = self.worker(worker_id)
            stats.tasks += 1
            stats.failures += 1
            stats.busy_s += elapsed_s
            self.durations.append(elapsed_s)
        self.failures.append({"job_id": job_id, "input": input_path, "error": error,
                              "worker_id": worker_id})

    @property
    def finished(self) -> int:
        return self.completed + self.failed + self.skipped

    def finish(self, state: str, now: float | None = None) -> None:
        self.state = state
        self.ended = now or time.monotonic()

    def snapshot(self, now: float | None = None, *, queued: int = 0, in_flight: int = 0,
                 live_workers: dict | None = None) -> dict:
        """Everything the report shows; ``live_workers`` maps id -> jobs held now."""
        now = self.ended or now or time.monotonic()
        duration = max(now - self.started, 1e-9)
        live_workers = live_workers or {}
        return {
            "batch_id": self.batch_id,
            "state": self.state,
            "started_at": self.started_wall,
            "duration_s": round(duration, 6),
            "startup_s": round(self.startup_s, 6),
            "tasks": {
                "total": self.total,
                "completed": self.completed,
                "failed": self.failed,
                "skipped": self.skipped,
                "queued": queued,
                "in_flight": in_flight,
                "redelivered": self.redelivered,
                "duplicates_ignored": self.duplicates,
            },
            "time": self._time_section(duration),
            "workers": self._worker_section(now, duration, live_workers),
            "batches": {"count": 1, "sizes": [self.total]},
            "bytes": self._bytes_section(),
            "formats": {
                fmt: {"count": s.count, "in": s.bytes_in, "out": s.bytes_out}
                for fmt, s in sorted(self.formats.items())
            },
            "failures": list(self.failures),
        }

    def _time_section(self, duration: float) -> dict:
        n = len(self.durations)
        done = self.completed
        return {
            "avg_s": sum(self.durations) / n if n else 0.0,
            "p50_s": percentile(self.durations, 50),
            "p95_s": percentile(self.durations, 95),
            "images_per_s": done / duration,
            "input_mb_per_s": self.bytes_in / 1e6 / duration,
            "stages_avg_s": {s: (t / self.staged if self.staged else 0.0) for s, t in self.stage_totals.items()},
            "stages_timed": self.staged,
        }

    def _worker_section(self, now: float, duration: float, live_workers: dict) -> dict:
        rows = []
        for stats in self.workers.values():
            window = max(now - max(stats.first_seen, self.started), 1e-9)
            rows.append({
                "id": stats.id,
                "tasks": stats.tasks,
                "failures": stats.failures,
                "refused": stats.refused,
                "busy_s": round(stats.busy_s, 6),
                "utilisation_pct": round(min(100.0, 100 * stats.busy_s / window), 1),
                "state": stats.state,
                "holding": live_workers.get(stats.id, 0),
                "rss_mb": round(stats.rss_mb, 1),
                "peak_rss_mb": round(stats.peak_rss_mb, 1),
            })
        rows.sort(key=lambda r: r["id"])
        tasks = [r["tasks"] for r in rows]
        return {
            "total": len(rows),
            "live": sum(1 for r in rows if r["state"] == "live"),
            "active": sum(1 for r in rows if r["holding"] > 0),
            "tasks_min": min(tasks, default=0),
            "tasks_max": max(tasks, default=0),
            "tasks_avg": sum(tasks) / len(tasks) if tasks else 0.0,
            "dead": [r["id"] for r in rows if r["state"] == "dead"],
            "per_worker": rows,
        }

    def _bytes_section(self) -> dict:
        saved = self.bytes_in - self.bytes_out
        return {
            "in": self.bytes_in,
            "out": self.bytes_out,
            "saved": saved,
            "ratio": self.bytes_out / self.bytes_in if self.bytes_in else 0.0,
            "saved_pct": 100 * saved / self.bytes_in if self.bytes_in else 0.0,
            "avg_ratio": sum(self.ratios) / len(self.ratios) if self.ratios else 0.0,
            "kept_original": self.kept_original,
        }
