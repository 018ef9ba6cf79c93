"""The metrics maths: counted from completions, not from how jobs were dealt."""

import pytest

from broker.metrics import BatchMetrics, percentile


def test_percentile_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50
    assert percentile(values, 95) == 95
    assert percentile([3.0], 95) == 3.0
    assert percentile([], 50) == 0.0


def test_snapshot_counts_what_workers_reported():
    m = BatchMetrics("b", total=5)
    m.start(m.created)
    m.worker("w1"), m.worker("w2"), m.worker("w3")
    m.record_success("w1", 1.0, 1000, 400, "webp", False, {"decode": 0.5, "encode": 0.5})
    m.record_success("w1", 3.0, 3000, 3000, "jpeg", True, {"decode": 1.0})
    m.record_success("w2", 2.0, 2000, 1000, "webp", False, {})
    m.record_failure("j4", "/in/bad.jpg", "corrupt", "w2", 0.5)
    m.record_failure("j5", "/in/x.jpg", "refused")          # never reached a worker
    m.finish("done", m.started + 10)
    s = m.snapshot()
    assert s["duration_s"] == pytest.approx(10)
    assert s["tasks"] == {"total": 5, "completed": 3, "failed": 2, "skipped": 0, "queued": 0,
                          "in_flight": 0, "redelivered": 0, "duplicates_ignored": 0}
    per = {r["id"]: r for r in s["workers"]["per_worker"]}
    assert per["w1"]["tasks"] == 2 and per["w2"]["tasks"] == 2 and per["w3"]["tasks"] == 0
    assert per["w2"]["failures"] == 1
    assert per["w1"]["busy_s"] == pytest.approx(4.0)
    assert per["w1"]["utilisation_pct"] == pytest.approx(40.0)
    assert (s["workers"]["tasks_min"], s["workers"]["tasks_max"]) == (0, 2)
    assert s["workers"]["tasks_avg"] == pytest.approx(4 / 3)
    assert s["bytes"]["in"] == 6000 and s["bytes"]["out"] == 4400
    assert s["bytes"]["ratio"] == pytest.approx(4400 / 6000)
    assert s["bytes"]["avg_ratio"] == pytest.approx((0.4 + 1.0 + 0.5) / 3)
    assert s["bytes"]["kept_original"] == 1
    assert s["formats"]["webp"] == {"count": 2, "in": 3000, "out": 1400}
    assert s["time"]["images_per_s"] == pytest.approx(0.3)
    assert s["time"]["p50_s"] == 1.0 and s["time"]["p95_s"] == 3.0
    # The third image streamed without stage timings: the averages are over the two timed.
    assert s["time"]["stages_avg_s"]["decode"] == pytest.approx(0.75)
    assert s["time"]["stages_avg_s"]["encode"] == pytest.approx(0.25)
    assert s["time"]["stages_timed"] == 2
    assert [f["job_id"] for f in s["failures"]] == ["j4", "j5"]


def test_empty_batch_snapshot_has_no_division_errors():
    s = BatchMetrics("b", total=0).snapshot()
    assert s["workers"]["total"] == 0 and s["bytes"]["ratio"] == 0.0 and s["time"]["avg_s"] == 0.0
