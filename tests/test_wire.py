"""The protocol module: round trips and every way a message can be wrong."""

import orjson
import pytest

from broker import wire


def test_every_kind_round_trips():
    messages = [
        wire.Ready("h-1", "h", 1, 2),
        wire.Job("j1", "b1", "/in/a.jpg", "/out/a.webp", {"format": "webp"}, attempt=2, max_pixels=10),
        wire.Jobs([wire.Job("j1", "b1", "/in/a.jpg", "/out/a.jpg", {}), wire.Job("j2", "b1", "/b", "/c", {})]),
        wire.Recall("b1"),
        wire.Dropped("h-1", "b1", ["j2", "j3"]),
        wire.Refused("h-1", "b1", "j4", "input path /x is outside this worker's input folders (/in)"),
        wire.Done("j1", "b1", "h-1", True, None, 10, 5, 4, 3, "webp", False, 0.5, {"decode": 0.1}),
        wire.Heartbeat("h-1", "j1", 1.5),
        wire.Bye("h-1", "stopping"),
        wire.Progress("b1", 10, 3, 1, 2, 2, 1.0),
        wire.Metrics("b1", True, {"tasks": {"total": 1}}),
    ]
    for msg in messages:
        frames = wire.encode(msg)
        assert frames[0] == msg.KIND
        assert orjson.loads(frames[1])["v"] == wire.VERSION
        assert wire.decode(frames) == msg


def test_fields_at_their_default_stay_off_the_wire():
    assert orjson.loads(wire.encode(wire.Heartbeat("w"))[1]) == {"v": 1, "worker_id": "w"}
    done = wire.Done("j", "b", "w", True, out_bytes=0, elapsed_s=0.25, timings={"decode": 0.1})
    assert orjson.loads(wire.encode(done)[1]) == {"v": 1, "job_id": "j", "batch_id": "b", "worker_id": "w",
                                                   "ok": True, "elapsed_s": 0.25, "timings": {"decode": 0.1}}
    # A value equal to the default but of another type still travels as given.
    assert orjson.loads(wire.encode(wire.Heartbeat("w", busy_s=0))[1])["busy_s"] == 0


def test_several_jobs_travel_in_one_message_each_checked_as_a_job():
    jobs = [wire.Job(f"j{i}", "b1", f"/in/{i}.jpg", f"/out/{i}.jpg", {"format": "webp"}, timed=i == 1)
            for i in range(3)]
    frames = wire.encode(wire.Jobs(jobs))
    body = orjson.loads(frames[1])
    assert frames[0] == b"jobs" and body["v"] == wire.VERSION
    assert [j["job_id"] for j in body["jobs"]] == ["j0", "j1", "j2"]
    assert "attempt" not in body["jobs"][0] and "v" not in body["jobs"][0]
    assert body["jobs"][1]["timed"] is True and "timed" not in body["jobs"][0]
    assert wire.decode(frames, (wire.Job, wire.Jobs)).jobs == jobs
    with pytest.raises(wire.WireError, match="cannot carry a payload"):
        wire.encode(wire.Jobs(jobs), b"image")


GOOD_JOB = {"job_id": "j", "batch_id": "b", "input": "/in/a.jpg", "output": "/out/a.jpg", "settings": {}}


@pytest.mark.parametrize("jobs, fragment", [
    ([], r"^jobs: jobs is empty$"),
    ("j1", r"^jobs: field 'jobs' has type str$"),
    ([GOOD_JOB, 5], r"^jobs: jobs\[1\] is not an object$"),
    ([GOOD_JOB, {k: v for k, v in GOOD_JOB.items() if k != "input"}], r"^jobs: jobs\[1\]: missing field 'input'$"),
    ([{**GOOD_JOB, "attempt": -1}], r"^jobs: jobs\[0\]: field 'attempt' is negative$"),
    ([{**GOOD_JOB, "settings": []}], r"^jobs: jobs\[0\]: field 'settings' has type list$"),
    ([{**GOOD_JOB, "timed": 1}], r"^jobs: jobs\[0\]: field 'timed' has type int$"),
])
def test_a_bad_job_in_a_list_refuses_the_whole_message(jobs, fragment):
    with pytest.raises(wire.WireError, match=fragment):
        wire.decode([b"jobs", orjson.dumps({"v": 1, "jobs": jobs})])


def test_optional_fields_take_defaults():
    frames = [b"done", orjson.dumps({"v": 1, "job_id": "j", "batch_id": "b", "worker_id": "w", "ok": False})]
    msg = wire.decode(frames)
    assert msg.error is None and msg.timings == {} and msg.out_bytes == 0


@pytest.mark.parametrize("frames, fragment", [
    ([b"done"], "expected 2 frames"),
    ([b"done", b"{}", b"x"], "expected 2 frames"),
    ([b"nope", b"{}"], "unexpected message kind"),
    ([b"ready", b"not json"], "not JSON"),
    ([b"ready", b"[1, 2]"], "not an object"),
    ([b"ready", orjson.dumps({"v": 2, "worker_id": "w", "host": "h", "pid": 1, "credit": 1})], "version"),
    ([b"ready", orjson.dumps({"v": True, "worker_id": "w", "host": "h", "pid": 1, "credit": 1})], "version"),
    ([b"ready", orjson.dumps({"v": 1.0, "worker_id": "w", "host": "h", "pid": 1, "credit": 1})], "version"),
    ([b"ready", orjson.dumps({"v": 1, "worker_id": "w", "host": "h", "pid": 1})], "missing field 'credit'"),
    ([b"ready", orjson.dumps({"v": 1, "worker_id": 5, "host": "h", "pid": 1, "credit": 1})], "'worker_id'"),
    ([b"ready", orjson.dumps({"v": 1, "worker_id": "w", "host": "h", "pid": 1, "credit": True})], "'credit'"),
    ([b"done", orjson.dumps({"v": 1, "job_id": "j", "batch_id": "b", "worker_id": "w", "ok": 1})], "'ok'"),
])
def test_malformed_messages_raise_wire_error(frames, fragment):
    with pytest.raises(wire.WireError, match=fragment):
        wire.decode(frames)


def test_receiver_limits_accepted_kinds():
    frames = wire.encode(wire.Heartbeat("w"))
    with pytest.raises(wire.WireError, match="unexpected message kind"):
        wire.decode(frames, (wire.Job,))


def test_float_fields_accept_integers():
    body = {"v": 1, "worker_id": "w", "busy_job": None, "busy_s": 3}
    assert wire.decode([b"heartbeat", orjson.dumps(body)]).busy_s == 3


def test_payload_travels_as_a_raw_third_frame():
    job = wire.Job("j1", "b1", "/in/a.jpg", "/out/a.jpg", {})
    frames = wire.encode(job, b"\xff\xd8\xffimage bytes")
    assert len(frames) == 3 and frames[2] == b"\xff\xd8\xffimage bytes"
    msg, payload = wire.decode_with_payload(frames)
    assert msg == job and payload == b"\xff\xd8\xffimage bytes"
    assert wire.decode_with_payload(wire.encode(job)) == (job, None)
    with pytest.raises(wire.WireError, match="cannot carry a payload"):
        wire.encode(wire.Heartbeat("w"), b"x")
    with pytest.raises(wire.WireError, match="expected 2 frames"):
        wire.decode_with_payload([b"heartbeat", frames[1], b"x"])


@pytest.mark.parametrize("job_ids, fragment", [
    ([], r"^dropped: job_ids is empty$"),
    ("j1", r"^dropped: field 'job_ids' has type str$"),
    (["j1", 2], r"^dropped: field 'job_ids' must be a list of strings$"),
    (["j1", None], r"^dropped: field 'job_ids' must be a list of strings$"),
])
def test_a_dropped_list_holds_job_ids_only(job_ids, fragment):
    body = {"v": 1, "worker_id": "w", "batch_id": "b", "job_ids": job_ids}
    with pytest.raises(wire.WireError, match=fragment):
        wire.decode([b"dropped", orjson.dumps(body)])


@pytest.mark.parametrize("body, fragment", [
    ({"timings": {"decode": "slow"}}, "timings"),
    ({"timings": {"decode": True}}, "timings"),
    ({"out_bytes": -5}, "negative"),
    ({"elapsed_s": -0.1}, "negative"),
    ({"out_bytes": 2 ** 64 - 1}, "out of range"),   # would overflow the report's sums
    ({"elapsed_s": 1e308}, "out of range"),         # would sum to inf, written as null
    ({"timings": {"decode": 1e300}}, "timings"),
])
def test_well_formed_but_wrong_values_are_refused(body, fragment):
    base = {"v": 1, "job_id": "j", "batch_id": "b", "worker_id": "w", "ok": True}
    with pytest.raises(wire.WireError, match=fragment):
        wire.decode([b"done", orjson.dumps({**base, **body})])


def test_send_frames_delivers_multipart_and_raises_like_send_multipart():
    import zmq

    from broker.config import recv_frames, send_frames

    with zmq.Context() as ctx:
        router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        router.linger = dealer.linger = 0
        port = router.bind_to_random_port("tcp://127.0.0.1")
        dealer.routing_id = b"w1"
        dealer.connect(f"tcp://127.0.0.1:{port}")
        dealer.send(b"hello")
        assert router.recv_multipart() == [b"w1", b"hello"]
        frames = wire.encode(wire.Job("j1", "b1", "/in/a.jpg", "/out/a.jpg", {}), b"\x00payload")
        send_frames(router, [b"w1", *frames], nowait=True, copy=False)
        assert wire.decode_with_payload(recv_frames(dealer))[1] == b"\x00payload"
        dealer.send(b"one frame")
        assert recv_frames(router) == [b"w1", b"one frame"]
        with pytest.raises(zmq.Again):
            recv_frames(router, nowait=True)
        with pytest.raises(zmq.ZMQError) as unknown:  # no such worker: the broker writes it off
            send_frames(router, [b"nobody", *frames], nowait=True)
        assert unknown.value.errno == zmq.EHOSTUNREACH
        lonely = ctx.socket(zmq.PUSH)
        lonely.linger = 0
        with pytest.raises(zmq.Again):  # no peer: the caller puts the job back
            send_frames(lonely, frames, nowait=True)
        lonely.close()
        router.close()
        dealer.close()


def test_log_file_lines_are_flat_json_with_context_and_tracebacks(tmp_path):
    from pathlib import Path

    from loguru import logger

    from broker.config import setup_logging

    setup_logging("tester", str(tmp_path), worker_id="w1")
    try:
        logger.bind(job_id="j7").debug("did {}", "it")
        try:
            1 / 0
        except ZeroDivisionError:
            logger.bind(job_id=Path("/odd/value")).exception("it broke")
    finally:
        logger.remove()
    (name,) = [p.name for p in tmp_path.iterdir()]
    first, second = [orjson.loads(line) for line in (tmp_path / name).read_bytes().splitlines()]
    assert first["component"] == "tester" and first["worker_id"] == "w1" and first["job_id"] == "j7"
    assert first["level"] == "DEBUG" and first["message"] == "did it" and first["time"]
    assert second["job_id"] == "/odd/value" and "ZeroDivisionError" in second["exception"]


def test_log_file_survives_a_full_disk_odd_text_and_a_bad_folder(tmp_path, monkeypatch, capfd):
    from loguru import logger

    from broker import config
    from broker.config import setup_logging

    setup_logging("tester", str(tmp_path))
    real_write, calls = config.os.write, []

    def disk_full_once(fd, data):  # the first write gets half its bytes on disk, then ENOSPC
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, data[: len(data) // 2])
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    try:
        monkeypatch.setattr(config.os, "write", disk_full_once)
        logger.info("cut short {}", "x" * 200)
        logger.info("name {}", "/in/bad\udcff.jpg")   # a file name that is not UTF-8
        logger.info("lone {}", "\ud800")
    finally:
        monkeypatch.undo()
        logger.remove()
    (name,) = [p.name for p in tmp_path.iterdir()]
    lines = (tmp_path / name).read_bytes().split(b"\n")
    assert lines[-1] == b"" and lines[0].startswith(b'{"time"') and not lines[0].endswith(b"}")
    assert [orjson.loads(line)["message"] for line in lines[1:-1]] == ["name /in/bad\\xff.jpg", "lone \\ud800"]
    # A log folder that cannot be made: a warning on stderr, and the process goes on.
    (tmp_path / "file").write_text("x")
    setup_logging("tester", str(tmp_path / "file" / "logs"))
    try:
        logger.info("still here")
    finally:
        logger.remove()
    err = capfd.readouterr().err
    assert "no log file" in err and "still here" in err
