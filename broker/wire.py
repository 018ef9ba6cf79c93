"""The imgbus wire protocol: every message any component sends or receives.

A message is two ZeroMQ frames: ``[kind, body]``. ``kind`` is a short ASCII
word (it doubles as the PUB/SUB topic); ``body`` is one orjson-encoded object
carrying ``v`` (the protocol version) and the fields of that kind. In the
bytes transport, ``job`` and ``done`` carry the image as a third frame, raw
(no base64, no copy into the JSON).

    kind        direction                           socket pair
    ---------   ---------------------------------   ----------------------
    ready       sidecar   -> ventilator             DEALER -> ROUTER
    job         ventilator -> sidecar               ROUTER -> DEALER
    jobs        ventilator -> sidecar (several)     ROUTER -> DEALER
    recall      ventilator -> sidecar (stopping)    ROUTER -> DEALER
    dropped     sidecar   -> sink (recall answered) PUSH   -> PULL
    refused     sidecar   -> sink (not its folders) PUSH   -> PULL
    done        sidecar   -> sink   (completion)    PUSH   -> PULL
    heartbeat   sidecar   -> sink                   PUSH   -> PULL
    bye         sidecar   -> sink                   PUSH   -> PULL
    progress    sink      -> reporters              PUB    -> SUB
    metrics     sink      -> reporters (snapshot)   PUB    -> SUB

``decode()`` checks the arity, the kind, the version, every required field
and every type; anything wrong raises ``WireError`` and the caller logs and
drops the message. This is the only module that imports orjson.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field

import orjson

VERSION = 1
# Receiving sockets refuse larger messages outright (ZMQ_MAXMSGSIZE).
MAX_MESSAGE_BYTES = 4 * 1024 * 1024


class WireError(ValueError):
    """A message that cannot be decoded or does not match the protocol."""


@dataclass(slots=True)
class Ready:
    """A sidecar announces itself and how many jobs it may hold at once."""

    KIND: typing.ClassVar[bytes] = b"ready"
    worker_id: str
    host: str
    pid: int
    credit: int
    idle_s: float = 0.0  # on an idle reminder: nothing has arrived for this long
    max_bytes: int = 0   # the largest message it accepts (0: not said)


@dataclass(slots=True)
class Job:
    """One image to optimize. ``settings`` is a ``Settings.to_dict()``."""

    KIND: typing.ClassVar[bytes] = b"job"
    job_id: str
    batch_id: str
    input: str
    output: str
    settings: dict
    attempt: int = 1
    max_pixels: int = 0
    max_bytes: int = 0
    timed: bool = False  # time each stage of this one (see broker.inputs.choose_timed)


@dataclass(slots=True)
class Jobs:
    """Several jobs for one worker in one message (path transport only).

    Short jobs finish faster than one message per job can carry them: each
    message costs both ends system calls and a wake-up of libzmq's I/O
    thread, a job in a list only its own fields. Each job is still leased,
    and completed, on its own.
    """

    KIND: typing.ClassVar[bytes] = b"jobs"
    jobs: list[Job]


@dataclass(slots=True)
class Recall:
    """The broker is stopping: drop this batch's jobs not yet started.

    Sent on the jobs socket, so it arrives after every job it recalls. The
    image a worker is on is finished and reported (the broker waits for it),
    unless ``in_hand``: the broker no longer waits, so it must not be written.
    """

    KIND: typing.ClassVar[bytes] = b"recall"
    batch_id: str
    in_hand: bool = False


@dataclass(slots=True)
class Dropped:
    """A sidecar's answer to a recall: the jobs it dropped without starting."""

    KIND: typing.ClassVar[bytes] = b"dropped"
    worker_id: str
    batch_id: str
    job_ids: list[str]


@dataclass(slots=True)
class Refused:
    """A sidecar will not do this job: its paths lie outside the folders the
    worker was given. That says something about the worker, not the image,
    so the job goes to another worker (and fails only if none that can reach
    it turns up in time)."""

    KIND: typing.ClassVar[bytes] = b"refused"
    worker_id: str
    batch_id: str
    job_id: str
    reason: str


@dataclass(slots=True)
class Done:
    """A completion: the outcome of one job, reported by the worker that did it."""

    KIND: typing.ClassVar[bytes] = b"done"
    job_id: str
    batch_id: str
    worker_id: str
    ok: bool
    error: str | None = None
    in_bytes: int = 0
    out_bytes: int = 0
    width: int = 0
    height: int = 0
    format: str | None = None
    kept_original: bool = False
    elapsed_s: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    peak_rss_mb: float = 0.0  # the worker's peak resident memory, when it has grown


@dataclass(slots=True)
class Heartbeat:
    """Sent every second by a live sidecar, busy or not."""

    KIND: typing.ClassVar[bytes] = b"heartbeat"
    worker_id: str
    busy_job: str | None = None
    busy_s: float = 0.0
    rss_mb: float = 0.0       # resident memory now
    peak_rss_mb: float = 0.0  # and at its highest so far


BYE_STOPPING = "stopping"  # the reason a worker gives when it leaves cleanly


@dataclass(slots=True)
class Bye:
    """A sidecar leaves; ``job_id`` names the job it gave up on, if any."""

    KIND: typing.ClassVar[bytes] = b"bye"
    worker_id: str
    reason: str
    job_id: str | None = None


@dataclass(slots=True)
class Progress:
    """A small, frequent summary for live progress lines."""

    KIND: typing.ClassVar[bytes] = b"progress"
    batch_id: str
    total: int
    completed: int
    failed: int
    in_flight: int
    workers: int
    elapsed_s: float
    skipped: int = 0  # of ``completed``: outputs that already existed (--skip-existing)


@dataclass(slots=True)
class Metrics:
    """A full snapshot of the batch metrics (see broker.metrics)."""

    KIND: typing.ClassVar[bytes] = b"metrics"
    batch_id: str
    final: bool
    snapshot: dict


MESSAGE_TYPES = (Ready, Job, Jobs, Recall, Dropped, Refused, Done, Heartbeat, Bye, Progress, Metrics)
BY_KIND = {cls.KIND: cls for cls in MESSAGE_TYPES}
Message = Ready | Job | Jobs | Recall | Dropped | Refused | Done | Heartbeat | Bye | Progress | Metrics


def _accepted_types(hint) -> frozenset[type]:
    """Python types a JSON value may have for a field annotated ``hint``.

    Checked by exact type, so ``true``/``false`` (bool, an int subclass) never
    pass for a number.
    """
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return frozenset(t for arg in typing.get_args(hint) for t in _accepted_types(arg))
    if hint is type(None):
        return frozenset({type(None)})
    if hint is float:
        return frozenset({float, int})
    if typing.get_origin(hint) in (dict, list):
        return frozenset({typing.get_origin(hint)})
    return frozenset({hint})


# What a type check alone cannot say about a value.
NON_NEGATIVE = "a number, never negative"
NON_NEGATIVE_NUMBERS = "a dict of non-negative numbers"
STRINGS = "a list of strings"
# No count, size or duration in the protocol comes near this (a terabyte, or
# 35 000 years in seconds), and sums of millions of them still fit the 64-bit
# integers JSON writers take. It also rules out inf and nan.
MAX_NUMBER = 2 ** 40


def _value_check(hint) -> str | type | None:
    if typing.get_origin(hint) is dict:
        return NON_NEGATIVE_NUMBERS
    if typing.get_origin(hint) is list:
        item = typing.get_args(hint)[0]
        # Job ids, or messages (each checked as one).
        return STRINGS if item is str else item
    accepted = _accepted_types(hint)
    return NON_NEGATIVE if int in accepted or float in accepted else None


def _check_numbers(kind: str, name: str, value: dict) -> None:
    for key, item in value.items():
        if type(item) not in (int, float) or not 0 <= item <= MAX_NUMBER:
            raise WireError(f"{kind}: {name}[{key[:32]!r}] must be a number from 0 to {MAX_NUMBER}")


_REQUIRED = object()  # the "default" of a field every message must carry


@dataclass(frozen=True)
class _Schema:
    kind: str
    required: frozenset[str]
    defaults: tuple[tuple[str, object], ...]            # (name, default or _REQUIRED), in order
    checks: dict[str, tuple[frozenset[type], str | type | None]]  # name -> (accepted types, value check)


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return _REQUIRED


def _schema(cls) -> _Schema:
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    return _Schema(
        cls.KIND.decode(),
        frozenset(f.name for f in fields if _default(f) is _REQUIRED),
        tuple((f.name, _default(f)) for f in fields),
        {f.name: (_accepted_types(hints[f.name]), _value_check(hints[f.name])) for f in fields},
    )


_SCHEMAS = {cls.KIND: _schema(cls) for cls in MESSAGE_TYPES}
# Kinds that may carry the image itself as a third frame.
WITH_PAYLOAD = frozenset({Job.KIND, Done.KIND})


def encode(msg: Message, payload=None) -> list:
    """The frames for ``msg``: ``[kind, body]``, plus ``payload`` if given.

    Fields still at their default are left out: the receiver puts them back.
    """
    if type(msg) is Jobs:
        body = {"v": VERSION, "jobs": [_fields({}, job) for job in msg.jobs]}
    else:
        body = _fields({"v": VERSION}, msg)
    frames = [msg.KIND, orjson.dumps(body)]
    if payload is not None:
        if msg.KIND not in WITH_PAYLOAD:
            raise WireError(f"{msg.KIND.decode()} cannot carry a payload")
        frames.append(payload)
    return frames


def _fields(body: dict, msg) -> dict:
    """``body`` with every field of ``msg`` that is not at its default."""
    for name, default in _SCHEMAS[msg.KIND].defaults:
        value = getattr(msg, name)
        if value != default or type(value) is not type(default):
            body[name] = value
    return body


def decode_with_payload(frames: list, expect: tuple[type, ...] | None = None):
    """``(message, payload or None)`` from ``[kind, body]`` or ``[kind, body, payload]``."""
    if len(frames) == 3 and bytes(frames[0]) in WITH_PAYLOAD:
        return decode(frames[:2], expect), frames[2]
    return decode(frames, expect), None


def decode(frames: list, expect: tuple[type, ...] | None = None) -> Message:
    """Parse and validate ``[kind, body]``; raise WireError on anything amiss.

    ``expect`` limits which kinds this receiver accepts. Unknown fields are
    ignored (a newer peer may add some); missing optional ones take their default.
    """
    if len(frames) != 2:
        raise WireError(f"expected 2 frames, got {len(frames)}")
    kind, raw = frames
    if type(kind) is not bytes:
        kind = bytes(kind)
    cls = BY_KIND.get(kind)
    if cls is None or (expect is not None and cls not in expect):
        raise WireError(f"unexpected message kind {kind[:32]!r}")
    schema = _SCHEMAS[kind]
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise WireError(f"{schema.kind}: body is not JSON ({exc})") from None
    if type(body) is not dict:
        raise WireError(f"{schema.kind}: body is not an object")
    version = body.pop("v", None)
    if type(version) is not int or version != VERSION:
        raise WireError(f"{schema.kind}: protocol version {version!r}, expected {VERSION}")
    return _build(cls, schema, body, schema.kind)


def _build(cls, schema: _Schema, body: dict, where: str):
    """``cls`` from a decoded body, every field checked; ``where`` names it in errors."""
    if not schema.required <= body.keys():
        missing = sorted(schema.required - body.keys())
        raise WireError(f"{where}: missing field {missing[0]!r}")
    values = {}
    checks = schema.checks
    # The hot path of the whole bus (the broker decodes every completion):
    # one dict lookup and one exact type test per field present.
    for name, value in body.items():
        spec = checks.get(name)
        if spec is None:
            continue
        accepted, check = spec
        if type(value) not in accepted:
            raise WireError(f"{where}: field {name!r} has type {type(value).__name__}")
        if check is not None and value is not None:
            if check is NON_NEGATIVE:
                if not 0 <= value <= MAX_NUMBER:  # also false for nan
                    raise WireError(f"{where}: field {name!r} is "
                                    f"{'negative' if value < 0 else 'out of range'}")
            elif check is NON_NEGATIVE_NUMBERS:
                _check_numbers(where, name, value)
            elif check is STRINGS:
                if not value:
                    raise WireError(f"{where}: {name} is empty")
                if any(type(item) is not str for item in value):
                    raise WireError(f"{where}: field {name!r} must be a list of strings")
            else:
                value = _build_list(check, value, f"{where}: {name}")
        values[name] = value
    return cls(**values)


def _build_list(cls, items: list, where: str) -> list:
    if not items:
        raise WireError(f"{where} is empty")
    schema = _SCHEMAS[cls.KIND]
    built = []
    for i, item in enumerate(items):
        if type(item) is not dict:
            raise WireError(f"{where}[{i}] is not an object")
        built.append(_build(cls, schema, item, f"{where}[{i}]"))
    return built


def dumps(obj) -> bytes:
    """Plain JSON for files the broker writes (results lines, report)."""
    return orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS)


def dumps_pretty(obj) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS)


def loads(raw: bytes | str):
    """Parse one JSON document (a batch file line); raises WireError."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise WireError(str(exc)) from None
