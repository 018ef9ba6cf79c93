"""Turn what the user named into jobs: folders, files, or a batch file.

Folders are walked recursively; a file becomes a job when its content is an
image, or when its name promises one (so a broken ``.jpg`` gets a clear
per-file error rather than silently disappearing). The output tree mirrors
the input tree, each output named with its real format's extension. An
output folder inside an input folder is left out of the walk.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from broker import wire
from broker.paths import TEMP_SUFFIX, FolderCache, PathError, check_output_path, is_within
from broker.settings import Settings, SettingsError, output_format, with_real_extension
from broker.sniff import HEAD_BYTES, IMAGE_EXTENSIONS, image_format
from broker.wire import Job


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


class BatchFileError(ValueError):
    """The batch file itself cannot be read."""


def _read_head(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(HEAD_BYTES)
    except OSError:
        return b""


def walk_images(root: str, exclude: str | None) -> tuple[list[tuple[str, bytes]], int]:
    """(path, head bytes) of candidate images under ``root``, sorted; and how many files were not."""
    found, ignored = [], 0
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs
                         if not (exclude and is_within(os.path.realpath(os.path.join(folder, d)), exclude)))
        for name in sorted(files):
            if name.endswith(TEMP_SUFFIX):
                continue
            path = os.path.join(folder, name)
            head = _read_head(path)
            ext = os.path.splitext(name)[1].lower()
            if image_format(head) or ext in IMAGE_EXTENSIONS:
                found.append((path, head))
            else:
                ignored += 1
    return found, ignored


class Planner:
    """Builds the job list for one batch, keeping job ids and outputs unique."""

    def __init__(self, batch_id: str, output_root: str, settings: Settings, *,
                 max_pixels: int, max_bytes: int = 0, skip_existing: bool = False,
                 confine_outputs: bool = True):
        self.batch_id = batch_id
        self.output_root = os.path.abspath(output_root)
        self.settings = settings
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes
        self.skip_existing = skip_existing
        self.confine_outputs = confine_outputs
        self.plan = Plan([], [], [])
        self._ids: set[str] = set()
        self._outputs: set[str] = set()
        self._resolve = FolderCache()

    # -- sources -------------------------------------------------------
    def add_inputs(self, inputs: list[str]) -> None:
        exclude = os.path.realpath(self.output_root)
        for given in inputs:
            if os.path.isdir(given):
                base = os.path.basename(os.path.normpath(os.path.abspath(given)))
                prefix = base if len(inputs) > 1 else ""
                found, ignored = walk_images(given, exclude)
                self.plan.ignored_files += ignored
                for path, head in found:
                    rel = os.path.join(prefix, os.path.relpath(path, given))
                    self._add_derived(path, rel, head, self.settings)
            else:
                self._add_derived(given, os.path.basename(given), _read_head(given), self.settings)

    def add_batch_file(self, path: str) -> None:
        try:
            with open(path, "rb") as f:
                lines = f.read().splitlines()
        except OSError as exc:
            raise BatchFileError(f"cannot read batch file {path}: {exc.strerror or exc}") from None
        for number, raw in enumerate(lines, 1):
            if raw.strip():
                self._add_line(number, raw)

    # -- one job -------------------------------------------------------
    def _add_line(self, number: int, raw: bytes) -> None:
        where = f"batch file line {number}"
        try:
            entry = wire.loads(raw)
        except wire.WireError as exc:
            return self._reject(f"line-{number}", "", "", f"{where}: not valid JSON ({exc})")
        if not isinstance(entry, dict) or not isinstance(entry.get("input"), str) or not entry["input"]:
            return self._reject(f"line-{number}", "", "", f"{where}: needs an \"input\" path")
        job_id = entry.get("job")
        if job_id is not None and not isinstance(job_id, str):
            return self._reject(f"line-{number}", entry["input"], "", f"{where}: \"job\" must be a string")
        job_id = job_id or self._next_id()
        output = entry.get("output")
        if output is not None and not isinstance(output, str):
            return self._reject(job_id, entry["input"], "", f"{where}: \"output\" must be a string")
        try:
            settings = self.settings.merged(entry.get("settings") or {})
        except SettingsError as exc:
            return self._reject(job_id, entry["input"], output or "", f"invalid setting: {exc}")
        if job_id in self._ids:
            return self._reject(f"line-{number}", entry["input"], output or "",
                                f"{where}: job id {job_id!r} is used twice")
        if output is None:
            self._add_derived(entry["input"], os.path.basename(entry["input"]),
                              _read_head(entry["input"]), settings, job_id)
        else:
            if not os.path.isabs(output):
                output = os.path.join(self.output_root, output)
            real = image_format(_read_head(entry["input"]))
            if real:
                output = with_real_extension(output, output_format(settings.format, real))
            self._add(job_id, entry["input"], output, settings)

    def _add_derived(self, input_path: str, rel: str, head: bytes, settings: Settings,
                     job_id: str | None = None) -> None:
        output = os.path.join(self.output_root, rel)
        real = image_format(head)
        if real:
            output = with_real_extension(output, output_format(settings.format, real))
        output = self._unique_output(output, os.path.splitext(rel)[1])
        self._add(job_id or self._next_id(), input_path, output, settings, derived=True)

    def _add(self, job_id: str, input_path: str, output: str, settings: Settings,
             derived: bool = False) -> None:
        root = self.output_root if (self.confine_outputs or derived) else None
        try:
            check_output_path(input_path, output, root, self._resolve)
        except PathError as exc:
            return self._reject(job_id, input_path, output, str(exc))
        self._ids.add(job_id)
        self._outputs.add(output)
        job = Job(job_id=job_id, batch_id=self.batch_id, input=input_path, output=output,
                  settings=settings.to_dict(), max_pixels=self.max_pixels, max_bytes=self.max_bytes)
        if self.skip_existing and os.path.isfile(output):
            self.plan.skipped.append(job)
        else:
            self.plan.jobs.append(job)

    def _unique_output(self, output: str, source_ext: str) -> str:
        """Two inputs that would share an output (a.png, a.jpg -> a.webp) both keep theirs."""
        if output not in self._outputs:
            return output
        stem, ext = os.path.splitext(output)
        candidate = f"{stem}-{source_ext.lstrip('.')}{ext}"
        n = 2
        while candidate in self._outputs:
            candidate = f"{stem}-{source_ext.lstrip('.')}-{n}{ext}"
            n += 1
        return candidate

    def _reject(self, job_id: str, input_path: str, output: str, error: str) -> None:
        self._ids.add(job_id)
        self.plan.rejected.append(Rejected(job_id, input_path, output, error))

    def _next_id(self) -> str:
        n = len(self._ids) + 1
        while f"j{n:06d}" in self._ids:
            n += 1
        return f"j{n:06d}"
