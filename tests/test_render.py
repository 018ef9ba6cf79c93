"""Report rendering: the sections and the unit formats of the original product."""

from broker.metrics import BatchMetrics
from reporter.render import duration, report, size


def test_duration_units():
    assert duration(0.0421) == "42 ms"
    assert duration(3.14159) == "3.14 s"
    assert duration(125) == "2 m 5 s"


def test_size_units():
    assert size(512) == "512 B"
    assert size(2000) == "2.00 KB"
    assert size(5_250_000) == "5.25 MB"
    assert size(3 * 1000 ** 3) == "3.00 GB"


def test_report_has_every_section_and_the_failures():
    m = BatchMetrics("abc", total=2)
    m.record_success("host-1", 0.2, 2000, 1000, "webp", False, {"decode": 0.1})
    m.record_failure("j2", "/in/bad.jpg", "not an image: the file contains HTML", "host-2", 0.01)
    m.finish("done")
    text = report(m.snapshot())
    for heading in ("Time", "Worker pool", "Batch", "Optimization", "Failures (1)"):
        assert f"\n{heading}" in text
    assert "Total workers:         2" in text
    assert "/in/bad.jpg: not an image: the file contains HTML" in text
    assert "host-1" in text and "host-2" in text
    assert "webp:" in text


def test_an_all_skipped_batch_says_there_was_nothing_to_do():
    from broker import wire
    from reporter.render import progress_line

    m = BatchMetrics("abc", total=3)
    m.skipped = 3
    m.finish("done")
    assert "Nothing to do:         all 3 outputs already exist" in report(m.snapshot())
    # Skipped jobs count as finished but not in the rate: nothing was processed.
    line = progress_line(wire.Progress("abc", 10, 7, 0, 0, 2, 2.0, skipped=5))
    assert line.startswith("[7/10  70.0%]") and "1.0 img/s" in line
    # Nor failures, as in the report's images/s: 4 finished in 2 s, one failed, one skipped.
    assert "1.0 img/s" in progress_line(wire.Progress("abc", 10, 4, 1, 0, 2, 2.0, skipped=1))


def test_one_image_is_singular():
    m = BatchMetrics("abc", total=3)
    m.record_success("host-1", 0.2, 2000, 1000, "webp", False, {"decode": 0.1})
    m.record_success("host-1", 0.2, 2000, 1000, "png", False, None)
    m.record_success("host-1", 0.2, 2000, 1000, "png", False, None)
    m.finish("done")
    text = report(m.snapshot())
    assert "webp:                  1 image    2.00 KB -> 1.00 KB" in text
    assert "png:                   2 images   4.00 KB -> 2.00 KB" in text
    assert "(1 image timed)" in text


def test_a_worker_that_refused_jobs_says_so_in_the_pool_table():
    m = BatchMetrics("abc", total=1)
    m.record_success("right-1", 0.2, 2000, 1000, "jpeg", False, {})
    m.worker("wrong-2").refused = 5
    m.finish("done")
    rows = {line.split()[0]: line for line in report(m.snapshot()).splitlines() if line.strip().startswith(("right", "wrong"))}
    assert rows["wrong-2"].endswith("live, refused 5 (outside its folders)")
    assert "refused" not in rows["right-1"]


def test_progress_to_a_pipe_nobody_reads_any_more_stops_quietly():
    import os

    from reporter.subscriber import ProgressPrinter

    # `imgbus ... 2>&1 | head -1`: the reader is gone after the first line.
    read_end, write_end = os.pipe()
    os.close(read_end)
    stream = open(write_end, "w")
    printer = ProgressPrinter(stream)
    printer.show("[1/9] first")    # would raise BrokenPipeError and end the reporter
    printer.finish("[9/9] done")
    printer.end()
    assert printer.stream is None
    try:
        stream.close()
    except BrokenPipeError:
        pass  # its buffer still held the line it could not write
