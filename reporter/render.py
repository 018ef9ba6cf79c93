"""Snapshot dict -> console text. Pure: no sockets, no clock."""

from __future__ import annotations

RULE = "=" * 64
MAX_FAILURES_SHOWN = 50


def duration(seconds: float) -> str:
    """ms below a second, seconds with two decimals below a minute, then m and s."""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.2f} s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)} m {rest:.0f} s"


def count(n: int, noun: str) -> str:
    """``1 image``, ``2 images``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def size(n: float) -> str:
    """Decimal units (1 KB = 1000 B), like the MB/s figures."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def progress_line(p) -> str:
    """One live line from a wire.Progress."""
    pct = 100 * p.completed / p.total if p.total else 100.0
    # Images done per second, as in the report: skipped jobs took no time, failed ones made nothing.
    rate = (p.completed - p.skipped - p.failed) / p.elapsed_s if p.elapsed_s > 0 else 0.0
    return (f"[{p.completed}/{p.total} {pct:5.1f}%] {p.failed} failed, {p.in_flight} in flight, "
            f"{p.workers} workers, {rate:.1f} img/s, {duration(p.elapsed_s)}")


def report(s: dict) -> str:
    lines = [RULE, f"imgbus benchmark report   batch {s['batch_id']}   ({s['state']})", RULE]
    lines += _time(s) + _pool(s) + _batch(s) + _optimization(s) + _failures(s) + _unfinished(s)
    lines.append(RULE)
    return "\n".join(lines)


def _time(s: dict) -> list[str]:
    t, tasks = s["time"], s["tasks"]
    stages = "  ".join(f"{k} {duration(v)}" for k, v in t["stages_avg_s"].items())
    nothing_to_do = []
    if tasks["total"] and tasks["skipped"] == tasks["total"]:
        nothing_to_do = [f"  Nothing to do:         all {tasks['total']} outputs already exist (--skip-existing)"]
    return [
        "Time", *nothing_to_do,
        f"  Total duration:        {duration(s['duration_s'])}   "
        f"(plus {duration(s['startup_s'])} waiting for workers)",
        f"  Per image:             avg {duration(t['avg_s'])}   p50 {duration(t['p50_s'])}   "
        f"p95 {duration(t['p95_s'])}",
        f"  Stages (avg):          {stages}   ({count(t.get('stages_timed', 0), 'image')} timed)",
        f"  Throughput:            {t['images_per_s']:.2f} images/s   {t['input_mb_per_s']:.2f} MB/s in",
    ]


def _pool(s: dict) -> list[str]:
    w, tasks = s["workers"], s["tasks"]
    finished = tasks["completed"] + tasks["failed"] + tasks["skipped"]
    lines = [
        "Worker pool",
        f"  Total workers:         {w['total']}   (live {w['live']}, active {w['active']})",
        f"  Tasks per worker:      min {w['tasks_min']}   max {w['tasks_max']}   avg {w['tasks_avg']:.1f}",
        f"  Queue length:          {tasks['queued']}   in flight {tasks['in_flight']}",
        f"  Finished/total:        {finished}/{tasks['total']}   "
        f"(succeeded {tasks['completed']}, failed {tasks['failed']}, skipped {tasks['skipped']})",
        f"  Redelivered:           {tasks['redelivered']}   duplicates ignored {tasks['duplicates_ignored']}",
    ]
    if w["dead"]:
        lines.append(f"  Lost workers:          {', '.join(w['dead'])}")
    if w["per_worker"]:
        width = max(len("worker"), *(len(r["id"]) for r in w["per_worker"]))
        lines.append(f"  {'worker':<{width}}  {'tasks':>6} {'failed':>6} {'busy':>10} {'util':>6} "
                     f"{'peak RSS':>9}  state")
        for r in w["per_worker"]:
            peak = f"{r['peak_rss_mb']:.0f} MB" if r.get("peak_rss_mb") else "-"
            # A worker started in the wrong folder does nothing: say why.
            refused = f", refused {r['refused']} (outside its folders)" if r.get("refused") else ""
            lines.append(f"  {r['id']:<{width}}  {r['tasks']:>6} {r['failures']:>6} "
                         f"{duration(r['busy_s']):>10} {r['utilisation_pct']:>5.1f}% {peak:>9}  "
                         f"{r['state']}{refused}")
    return lines


def _batch(s: dict) -> list[str]:
    b = s["batches"]
    return ["Batch", f"  Batches:               {b['count']}   sizes {', '.join(map(str, b['sizes']))}"]


def _optimization(s: dict) -> list[str]:
    b = s["bytes"]
    lines = [
        "Optimization",
        f"  Size:                  {size(b['in'])} -> {size(b['out'])}   "
        f"(saved {size(b['saved'])}, {b['saved_pct']:.1f}%)",
        f"  Compression ratio:     total {b['ratio']:.3f}   average per image {b['avg_ratio']:.3f}",
        f"  Kept original:         {b['kept_original']} (re-encoding would not have been smaller)",
    ]
    for fmt, f in s["formats"].items():
        ratio = f["out"] / f["in"] if f["in"] else 0.0
        lines.append(f"  {fmt + ':':<22} {count(f['count'], 'image'):<10} {size(f['in'])} -> {size(f['out'])}"
                     f"   ratio {ratio:.3f}")
    return lines


def _failures(s: dict) -> list[str]:
    failures, total = s["failures"], s["tasks"]["failed"]
    if not total:
        return []
    lines = [f"Failures ({total})"]
    for f in failures[:MAX_FAILURES_SHOWN]:
        lines.append(f"  {f['input'] or f['job_id']}: {f['error']}")
    if total > min(len(failures), MAX_FAILURES_SHOWN):
        lines.append(f"  ... and {total - min(len(failures), MAX_FAILURES_SHOWN)} more (see --report-json)")
    return lines


def _unfinished(s: dict) -> list[str]:
    left = s.get("unfinished") or []
    if not left:
        return []
    lines = [f"Not finished ({len(left)})"]
    for u in left[:MAX_FAILURES_SHOWN]:
        holder = f" on {u['worker_id']}" if u.get("worker_id") else ""
        lines.append(f"  {u['input']}: {u['state']}{holder}")
    return lines
