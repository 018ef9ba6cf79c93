"""Path rules shared by the ventilator and the sidecar.

Inputs are never modified: an output that is, or resolves to, its input is
refused on both sides (the sidecar checks again, since a job may come from a
batch file or another host). Outputs appear atomically: written to a hidden
temporary name in the same folder, then renamed.
"""

from __future__ import annotations

import os
import stat

TEMP_SUFFIX = ".imgbus-tmp"


class PathError(ValueError):
    """An output path imgbus refuses to write."""


class FolderCache:
    """``os.path.realpath`` that resolves each folder and each path once:
    planning a batch of 50 000 jobs in a few folders should not resolve the
    same folders 200 000 times. Short-lived on purpose (one planning pass, or
    one job's checks): the file system can change."""

    def __init__(self):
        self._folders: dict[str, str] = {}
        self._paths: dict[str, str] = {}

    def __call__(self, path: str) -> str:
        real = self._paths.get(path)
        if real is None:
            real = self._paths[path] = self._resolve(path)
        return real

    def _resolve(self, path: str) -> str:
        # Never fold ".." by hand: "link/.." is the parent of the link's
        # target, not of the link. realpath() resolves in the right order.
        folder, name = os.path.split(path)
        if name in ("", ".", "..") or os.path.islink(path):
            return os.path.realpath(path)
        real = self._folders.get(folder)
        if real is None:
            real = self._folders[folder] = os.path.realpath(folder or ".")
        return os.path.join(real, name)


def printable(text: str) -> str:
    """Text that always encodes as UTF-8: bytes of a file name that are not
    UTF-8 shown as \\xNN (and any other lone surrogate escaped too)."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def read_input(path: str, max_bytes: int = 0) -> bytes:
    """The whole input file, or PathError with a message fit for a person.

    Only regular files are read (a FIFO would block, /dev/zero never ends),
    and never more than ``max_bytes``, even if the file grows meanwhile.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            info = os.fstat(fd)
            if stat.S_ISDIR(info.st_mode):
                raise IsADirectoryError(path)
            if not stat.S_ISREG(info.st_mode):
                raise PathError("input is not a regular file (a pipe, socket or device)")
            if max_bytes and info.st_size > max_bytes:
                raise PathError(f"input is larger than the limit of {max_bytes / 1e6:.3g} MB (--max-image-mb)")
            if not max_bytes:
                return f.read()
            # As much as fstat announced, plus a byte to notice growth: read()
            # allocates what it is asked for, and 100 MB per small image costs.
            data = f.read(min(info.st_size, max_bytes) + 1)
            if len(data) > info.st_size:  # it grew meanwhile: read on, up to the limit
                data += f.read(max_bytes + 1 - len(data))
            if len(data) > max_bytes:
                raise PathError(f"input is larger than the limit of {max_bytes / 1e6:.3g} MB (--max-image-mb)")
            return data
    except PathError:
        raise
    except FileNotFoundError:
        raise PathError("input file not found") from None
    except IsADirectoryError:
        raise PathError("input is a folder, not a file") from None
    except OSError as exc:
        raise PathError(f"cannot read input: {exc.strerror or exc}") from None
    except ValueError:
        raise PathError("input path contains a NUL byte") from None


def check_output_path(input_path: str, output_path: str, output_root: str | None = None,
                      resolve=os.path.realpath) -> None:
    """Raise PathError if writing ``output_path`` could touch the input or leave the root."""
    real_out = resolve(output_path)
    if real_out == resolve(input_path):
        raise PathError(f"output path {output_path} is the input file itself; refusing to overwrite an input")
    try:
        if os.path.samefile(input_path, output_path):
            raise PathError(f"output path {output_path} is a link to the input file; refusing to overwrite an input")
    except OSError:
        pass  # one of them does not exist: they cannot be the same file
    if os.path.isdir(real_out):
        raise PathError(f"output path {output_path} is a folder")
    if output_root is not None and not is_within(real_out, resolve(output_root)):
        raise PathError(f"output path {output_path} is outside the output folder {output_root}")


class OutsideFolders(PathError):
    """The path is not under the worker's folders even as written: the job was
    meant for a worker started elsewhere, not a trick of the image's."""


def check_confined(path: str, roots: tuple[str, ...], what: str, resolve=os.path.realpath) -> None:
    """Raise PathError unless ``path`` (links resolved) lies under one of ``roots``.

    OutsideFolders when the path as written is outside them too; a plain
    PathError when only a link leads it out.
    """
    real = resolve(path)
    real_roots = [resolve(root) for root in roots]
    if any(is_within(real, root) for root in real_roots):
        return
    folders = ", ".join(roots[:3]) + (f" and {len(roots) - 3} more" if len(roots) > 3 else "")
    written = os.path.abspath(path)
    if real != written and any(is_within(written, root) for root in (*map(os.path.abspath, roots), *real_roots)):
        raise PathError(f"{what} path {path} (a link to {real}) is outside this worker's {what} folders "
                        f"({folders}); refused")
    raise OutsideFolders(f"{what} path {path} is outside this worker's {what} folders ({folders}); "
                         f"start the sidecar in that folder or give it --{what}-root")


def is_within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def temp_path_for(output_path: str, tag: str) -> str:
    """A hidden sibling of ``output_path`` that a sweep can recognise."""
    folder, name = os.path.split(output_path)
    tag = tag.replace(".", "_").replace(os.sep, "_")  # the sweep splits on dots
    return os.path.join(folder, f".{name}.{tag}{TEMP_SUFFIX}")


def write_atomically(output_path: str, data: bytes, tag: str) -> None:
    """Write ``data`` so that ``output_path`` is either absent, old, or complete."""
    folder = os.path.dirname(output_path) or "."
    os.makedirs(folder, exist_ok=True)
    tmp = temp_path_for(output_path, tag)
    try:
        with _create_exclusive(tmp) as f:
            f.write(data)
        os.replace(tmp, output_path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _create_exclusive(path: str):
    """A new file that is really new: never follow a link planted at ``path``."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except FileExistsError:
        os.unlink(path)  # our own leftover from an attempt that was killed
        fd = os.open(path, flags, 0o644)
    return os.fdopen(fd, "wb")


def sweep_temp_files(output_paths) -> int:
    """Remove temporary files left next to ``output_paths`` by killed workers."""
    removed = 0
    for folder, names in _by_folder(output_paths).items():
        try:
            entries = os.listdir(folder)
        except OSError:
            continue
        for entry in entries:
            if not (entry.startswith(".") and entry.endswith(TEMP_SUFFIX)):
                continue
            original = entry[1:].rsplit(".", 2)[0]
            if original in names:
                try:
                    os.unlink(os.path.join(folder, entry))
                    removed += 1
                except OSError:
                    pass
    return removed


def _by_folder(paths) -> dict[str, set[str]]:
    folders: dict[str, set[str]] = {}
    for path in paths:
        folder, name = os.path.split(path)
        folders.setdefault(folder or ".", set()).add(name)
    return folders
