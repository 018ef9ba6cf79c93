"""Turn what the user named into jobs: folders, files, or a batch file.

Folders are walked recursively (linked folders too, each real folder once);
a regular file becomes a job when its content is an image, or when its name
promises one (so a broken ``.jpg`` gets a clear per-file error rather than
silently disappearing). The output tree mirrors the input tree, each output
named with its real format's extension. An output folder inside an input
folder is left out of the walk.

Planning is two passes: every candidate job is collected first, then the
batch is checked as a whole, so that no output can land on another job's
input or on another job's output.
"""

from __future__ import annotations

import os
import random
import stat
from dataclasses import dataclass

from broker import wire
from broker.paths import TEMP_SUFFIX, FolderCache, PathError, check_output_path, is_within, printable
from broker.settings import Settings, SettingsError, output_format, with_real_extension
from broker.sniff import HEAD_BYTES, IMAGE_EXTENSIONS, image_format, pixel_count
from broker.wire import Job

MAX_PATH_BYTES = 4096
MAX_JOB_ID = 200
# A job message must stay far below what a receiving socket accepts.
MAX_JOB_MESSAGE = wire.MAX_MESSAGE_BYTES // 4


@dataclass(frozen=True)
class Rejected:
    """A job that fails before it is ever sent: the error says why."""

    job_id: str
    input: str
    output: str
    error: str


@dataclass
class Plan:
    jobs: list[Job]
    rejected: list[Rejected]
    skipped: list[Job]          # --skip-existing: output already there
    ignored_files: int = 0      # non-image files met while walking
    real_inputs: frozenset[str] = frozenset()  # every input named, links resolved


@dataclass(frozen=True)
class _Candidate:
    job_id: str
    input: str
    output: str
    settings: Settings
    derived: bool
    work: int  # see work_estimate
    origin: str = ""  # "batch file line N: " for a job a batch file named


class BatchFileError(ValueError):
    """The batch file itself cannot be read."""


class PlanningInterrupted(Exception):
    """A stop signal arrived while the batch was being planned."""


def path_problem(path: str) -> str | None:
    """Why ``path`` cannot travel in a job message, or None."""
    if "\0" in path:
        return "path contains a NUL byte"
    try:
        encoded = path.encode("utf-8")
    except UnicodeEncodeError:
        return "file name is not valid UTF-8 (rename it to process it)"
    if len(encoded) > MAX_PATH_BYTES:
        return f"path is longer than {MAX_PATH_BYTES} bytes"
    return None


def read_head(path: str) -> bytes | None:
    """The first bytes of a regular file; None for anything else (FIFO, device,
    folder, unreadable), without ever blocking on it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except (OSError, ValueError):
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.read(fd, HEAD_BYTES)
    except OSError:
        return None
    finally:
        os.close(fd)


def work_estimate(path: str, head: bytes | None) -> int:
    """How big a job is, in pixels: the header's size where it tells, else a
    guess from the file size (about 2 bits per pixel, as in a photo).

    Jobs go out biggest first, so that no big image starts last and keeps the
    batch open while the other workers idle (longest-processing-time-first).
    The file size alone misleads: a flat 4-megapixel PNG can be smaller than
    a 1-megapixel photo and take five times as long.
    """
    pixels = pixel_count(path, head) if head else None
    if pixels is not None:
        return pixels
    try:
        return os.stat(path).st_size * 4
    except (OSError, ValueError):
        return 0


# Timing each stage means holding the image in memory between stages (three
# libvips pipelines instead of one): a sample of the batch is timed, the rest
# streams. At least this many, or every job of a smaller batch...
TIMED_AT_LEAST = 8
# ...else about one job in this many.
TIMED_ONE_IN = 8


def choose_timed(jobs: list[Job], batch_id: str) -> None:
    """Mark a random sample of the jobs to be timed stage by stage.

    Drawn by the broker over the whole batch, so the sample stands for all of
    it; a worker timing its own first image would always time the largest
    (jobs go out biggest first). Seeded by the batch id: the same batch, the
    same sample.
    """
    count = min(len(jobs), max(TIMED_AT_LEAST, -(-len(jobs) // TIMED_ONE_IN)))
    for index in random.Random(batch_id).sample(range(len(jobs)), count):
        jobs[index].timed = True


class Planner:
    """Builds the job list for one batch, keeping job ids and outputs unique."""

    def __init__(self, batch_id: str, output_root: str, settings: Settings, *,
                 max_pixels: int, max_bytes: int = 0, skip_existing: bool = False,
                 confine_outputs: bool = True, should_stop=lambda: False):
        self.batch_id = batch_id
        self.output_root = os.path.abspath(output_root)
        self.settings = settings
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes
        self.skip_existing = skip_existing
        self.confine_outputs = confine_outputs
        self.should_stop = should_stop
        self.ignored_files = 0
        self._candidates: list[_Candidate] = []
        self._rejected: list[Rejected] = []
        self._ids: set[str] = set()
        self._reserved: set[str] = set()   # ids a batch file names explicitly
        self._derived_outputs: set[str] = set()
        self._resolve = FolderCache()

    # -- sources -------------------------------------------------------
    def add_inputs(self, inputs: list[str]) -> None:
        exclude = os.path.realpath(self.output_root)
        found: list[tuple[str, str, bytes | None]] = []  # (path, output relative to -o, head)
        for given in inputs:
            if os.path.isdir(given):
                base = os.path.basename(os.path.normpath(os.path.abspath(given)))
                prefix = base if len(inputs) > 1 else ""
                for path, head in self._walk(given, exclude):
                    found.append((path, os.path.join(prefix, os.path.relpath(path, given)), head))
            else:
                found.append((given, os.path.basename(given), read_head(given)))
        # Each file once, however often it was named (a folder twice, a file and its folder).
        seen: set[str] = set()
        unique = []
        for path, rel, head in found:
            real = self._resolve(path)
            if real not in seen:
                seen.add(real)
                unique.append((path, rel, head))
        # A file whose name already fits its output claims that name first:
        # a.webp stays a.webp and a.png becomes a-png.webp, whatever the walk's order.
        unique.sort(key=lambda item: self._natural_output(item[1], item[2], self.settings)
                    != os.path.join(self.output_root, item[1]))
        for path, rel, head in unique:
            self._add_derived(path, rel, head)

    def add_batch_file(self, path: str) -> None:
        try:
            with open(path, "rb") as f:
                lines = f.read().splitlines()
        except OSError as exc:
            raise BatchFileError(f"cannot read batch file {path}: {exc.strerror or exc}") from None
        entries = []
        for number, raw in enumerate(lines, 1):
            if raw.strip():
                try:
                    entries.append((number, wire.loads(raw), None))
                except wire.WireError as exc:
                    entries.append((number, None, f"not valid JSON ({exc})"))
        # Ids named in the file are the user's: generated ids never take them.
        self._reserved = {e.get("job") for _, e, _ in entries if isinstance(e, dict) and isinstance(e.get("job"), str)}
        for number, entry, error in entries:
            self._tick()
            self._add_line(number, entry, error)

    # -- the whole batch ------------------------------------------------
    def plan(self) -> Plan:
        """Check the batch as a whole and return it."""
        plan = Plan([], list(self._rejected), [], self.ignored_files)
        inputs = {}
        for c in self._candidates:
            inputs.setdefault(self._resolve(c.input), c.job_id)
        outputs: dict[str, str] = {}
        root = self.output_root
        work: dict[str, int] = {}
        for c in self._candidates:
            self._tick()
            try:
                check_output_path(c.input, c.output, root if (self.confine_outputs or c.derived) else None,
                                  self._resolve)
                real_out = self._resolve(c.output)
                if real_out in inputs:
                    raise PathError(f"output {c.output} would overwrite the input of job {inputs[real_out]}")
                if real_out in outputs:
                    raise PathError(f"output {c.output} is already the output of job {outputs[real_out]}")
            except (PathError, ValueError, OSError) as exc:
                plan.rejected.append(Rejected(c.job_id, c.input, c.output, f"{c.origin}{exc}"))
                continue
            outputs[real_out] = c.job_id
            job = Job(job_id=c.job_id, batch_id=self.batch_id, input=c.input, output=c.output,
                      settings=c.settings.to_dict(), max_pixels=self.max_pixels, max_bytes=self.max_bytes)
            if len(wire.encode(job)[1]) > MAX_JOB_MESSAGE:
                plan.rejected.append(Rejected(c.job_id, c.input, c.output, f"{c.origin}job is too large to send"))
            elif self.skip_existing and os.path.isfile(c.output):
                plan.skipped.append(job)
            else:
                plan.jobs.append(job)
                work[job.job_id] = c.work
        plan.jobs.sort(key=lambda job: work[job.job_id], reverse=True)
        choose_timed(plan.jobs, self.batch_id)
        plan.real_inputs = frozenset(inputs)
        return plan

    # -- one job -------------------------------------------------------
    def _add_line(self, number: int, entry, error: str | None) -> None:
        where = f"batch file line {number}"
        if error is None and (not isinstance(entry, dict) or not isinstance(entry.get("input"), str)
                              or not entry["input"]):
            error = 'needs an "input" path'
        if error is not None:
            return self._reject(self._unique(f"line-{number}"), "", "", f"{where}: {error}")
        job_id = entry.get("job")
        if job_id is not None and (not isinstance(job_id, str) or not job_id or len(job_id) > MAX_JOB_ID):
            return self._reject(self._unique(f"line-{number}"), entry["input"], "",
                                f'{where}: "job" must be a string of 1 to {MAX_JOB_ID} characters')
        if job_id in self._ids:
            return self._reject(self._unique(f"line-{number}"), entry["input"], "",
                                f"{where}: job id {job_id!r} is used twice")
        job_id = job_id or self._next_id()
        output = entry.get("output")
        if output is not None and not isinstance(output, str):
            return self._reject(job_id, entry["input"], "", f'{where}: "output" must be a string')
        if output is not None and os.path.basename(output) in ("", ".", ".."):
            # "" or "dir/" would otherwise become a hidden file named after the extension.
            return self._reject(job_id, entry["input"], output, f'{where}: "output" must name a file, not {output!r}')
        try:
            settings = self.settings.merged(entry.get("settings") or {})
        except SettingsError as exc:
            return self._reject(job_id, entry["input"], output or "", f"{where}: invalid setting: {exc}")
        if output is None:
            return self._add_derived(entry["input"], os.path.basename(entry["input"]),
                                     read_head(entry["input"]), settings, job_id, origin=f"{where}: ")
        if not os.path.isabs(output):
            output = os.path.join(self.output_root, output)
        self._add(job_id, entry["input"], output, settings, read_head(entry["input"]), derived=False,
                  origin=f"{where}: ")

    def _add_derived(self, input_path: str, rel: str, head: bytes | None, settings: Settings | None = None,
                     job_id: str | None = None, origin: str = "") -> None:
        self._tick()
        output = self._unique_output(rel, os.path.splitext(rel)[1], head, settings or self.settings)
        self._add(job_id or self._next_id(), input_path, output, settings or self.settings, head, derived=True,
                  origin=origin)

    def _add(self, job_id: str, input_path: str, output: str, settings: Settings, head: bytes | None,
             derived: bool, origin: str = "") -> None:
        problem = path_problem(input_path) or path_problem(output)
        if problem:
            return self._reject(job_id, printable(input_path), printable(output), f"{origin}{problem}")
        real = image_format(head) if head else None
        if real:
            output = with_real_extension(output, output_format(settings.format, real))
        if not os.path.isabs(input_path):
            # Jobs travel to workers started elsewhere: a path relative to the
            # broker's folder would mean nothing there. (Joined, not normalised:
            # "link/.." is not the folder that holds the link.)
            input_path = os.path.join(os.getcwd(), input_path)
        self._ids.add(job_id)
        self._candidates.append(_Candidate(job_id, input_path, output, settings, derived,
                                           work_estimate(input_path, head), origin))

    def _natural_output(self, rel: str, head: bytes | None, settings: Settings) -> str:
        """Where an input's output goes before any clash with another's."""
        output = os.path.join(self.output_root, rel)
        real = image_format(head) if head else None
        return with_real_extension(output, output_format(settings.format, real)) if real else output

    def _unique_output(self, rel: str, source_ext: str, head: bytes | None, settings: Settings) -> str:
        """Two inputs that would share an output (a.png, a.jpg -> a.webp) both keep theirs."""
        output = self._natural_output(rel, head, settings)
        candidate, n = output, 2
        stem, ext = os.path.splitext(output)
        while candidate in self._derived_outputs:
            suffix = source_ext.lstrip(".") + ("" if n == 2 else f"-{n}")
            candidate = f"{stem}-{suffix}{ext}"
            n += 1
        self._derived_outputs.add(candidate)
        return candidate

    def _reject(self, job_id: str, input_path: str, output: str, error: str) -> None:
        self._ids.add(job_id)
        self._rejected.append(Rejected(job_id, printable(input_path), printable(output), error))

    def _unique(self, wanted: str) -> str:
        candidate, n = wanted, 2
        while candidate in self._ids or candidate in self._reserved:
            candidate, n = f"{wanted}-{n}", n + 1
        return candidate

    def _next_id(self) -> str:
        return self._unique(f"j{len(self._ids) + 1:06d}")

    def _tick(self) -> None:
        if self.should_stop():
            raise PlanningInterrupted()

    # -- walking ---------------------------------------------------------
    def _walk(self, root: str, exclude: str | None):
        """(path, head) of candidate images under ``root``, sorted, following
        linked folders but visiting each real folder once."""
        seen: set[str] = set()

        def unreadable(exc: OSError) -> None:
            self._reject(self._unique("folder"), exc.filename or root, "",
                         f"cannot read folder: {exc.strerror or exc}")

        for folder, dirs, files in os.walk(root, followlinks=True, onerror=unreadable):
            real = os.path.realpath(folder)
            if real in seen:
                dirs[:] = []
                continue
            seen.add(real)
            dirs[:] = sorted(d for d in dirs
                             if not (exclude and is_within(os.path.realpath(os.path.join(folder, d)), exclude)))
            for name in sorted(files):
                self._tick()
                if name.endswith(TEMP_SUFFIX):
                    continue
                path = os.path.join(folder, name)
                head = read_head(path)
                ext = os.path.splitext(name)[1].lower()
                if (head is not None and image_format(head)) or ext in IMAGE_EXTENSIONS:
                    yield path, head
                else:
                    self.ignored_files += 1
