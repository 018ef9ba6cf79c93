"""Recognise image files by their first bytes, not their names.

Used by the ventilator to pick images out of a folder (and to guess which
are big), and by the sidecar to give a clear error for a file that is not an
image at all.
"""

from __future__ import annotations

import os
import stat

HEAD_BYTES = 1024  # enough to see past an SVG's XML prolog, comments and doctype

# Extensions that promise an image: such a file is always turned into a job,
# so that a broken one gets a per-file error instead of vanishing silently.
IMAGE_EXTENSIONS = frozenset(
    ".jpg .jpeg .jpe .jfif .png .gif .webp .avif .heic .heif .tif .tiff .svg".split()
)


def image_format(head: bytes) -> str | None:
    """The image format the leading bytes announce, or None."""
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "webp"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "tiff"
    if head[4:8] == b"ftyp":
        brands = head[8:32]
        if b"avif" in brands or b"avis" in brands:
            return "avif"
        if any(b in brands for b in (b"heic", b"heix", b"mif1", b"msf1", b"hevc")):
            return "heif"
    text = head.removeprefix(b"\xef\xbb\xbf").lstrip().lower()
    if text.startswith(b"<") and b"<svg" in text:
        return "svg"
    return None


def describe_non_image(head: bytes) -> str:
    """A short human description of what a non-image file seems to be."""
    if not head:
        return "empty file (0 bytes)"
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return "not an image: the file contains HTML"
    if text.startswith(b"<?xml") or text.startswith(b"<"):
        return "not an image: the file contains XML/markup"
    if head.startswith(b"%PDF"):
        return "not an image: the file is a PDF document"
    if head.startswith(b"PK\x03\x04"):
        return "not an image: the file is a ZIP archive"
    try:
        head.decode("utf-8")
        return "not an image: the file contains text"
    except UnicodeDecodeError:
        return "not an image: unknown file type"


# JPEG start-of-frame markers (they carry the size); C4, C8 and CC are others.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Metadata can run to megabytes: one of the test wallpapers has 118 segments.
_JPEG_SEGMENTS_MAX = 1024


def pixel_count(path: str, head: bytes) -> int | None:
    """Width x height from the header, or None when it cannot be told cheaply.

    PNG, GIF and WebP give their size in the first 30 bytes; a JPEG's size
    comes after its metadata segments, which are skipped by their lengths
    (a few small reads). Only a guess at how long an image will take.
    """
    if head.startswith(b"\x89PNG\r\n\x1a\n") and len(head) >= 24:
        return int.from_bytes(head[16:20], "big") * int.from_bytes(head[20:24], "big")
    if head.startswith((b"GIF87a", b"GIF89a")) and len(head) >= 10:
        return int.from_bytes(head[6:8], "little") * int.from_bytes(head[8:10], "little")
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP" and len(head) >= 30:
        chunk = head[12:16]
        if chunk == b"VP8 ":
            return (int.from_bytes(head[26:28], "little") & 0x3FFF) * (int.from_bytes(head[28:30], "little") & 0x3FFF)
        if chunk == b"VP8L":
            bits = int.from_bytes(head[21:25], "little")
            return ((bits & 0x3FFF) + 1) * (((bits >> 14) & 0x3FFF) + 1)
        if chunk == b"VP8X":
            return (int.from_bytes(head[24:27], "little") + 1) * (int.from_bytes(head[27:30], "little") + 1)
        return None
    if head.startswith(b"\xff\xd8\xff"):
        return _jpeg_pixels(path, head)
    return None


def _jpeg_pixels(path: str, head: bytes) -> int | None:
    fd = None
    try:
        offset = 2
        for _ in range(_JPEG_SEGMENTS_MAX):
            segment = head[offset:offset + 9]
            if len(segment) < 9:
                if fd is None:
                    # Like read_head: never block (the path may have become a FIFO).
                    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
                    if not stat.S_ISREG(os.fstat(fd).st_mode):
                        return None
                segment = os.pread(fd, 9, offset)
            if len(segment) < 9 or segment[0] != 0xFF:
                return None
            if segment[1] in _JPEG_SOF:
                return int.from_bytes(segment[5:7], "big") * int.from_bytes(segment[7:9], "big")
            offset += 2 + int.from_bytes(segment[2:4], "big")
    except OSError:
        pass
    finally:
        if fd is not None:
            os.close(fd)
    return None
