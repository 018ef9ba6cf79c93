"""Recognise image files by their first bytes, not their names.

Used by the ventilator to pick images out of a folder and by the sidecar to
give a clear error for a file that is not an image at all.
"""

from __future__ import annotations

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
