"""One image in, one optimized image out, with pyvips. No sockets here.

Stages, each timed:
  decode  read the file, check the header against the pixel limit, decode
          (shrinking on load where the format allows), orient upright and
          convert to sRGB
  resize  flatten onto white for formats without alpha, then resample to
          the target size (alpha premultiplied)
  encode  save to the output format in memory
  write   keep the smaller of input and output when nothing else changed,
          then write atomically

Every failure becomes ``ImageError`` with a message fit for a person.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field

import pyvips

from broker.paths import (
    FolderCache, OutsideFolders, PathError, check_confined, check_output_path, read_input, write_atomically,
)
from broker.settings import ALPHA_FORMATS, ANIMATED_FORMATS, Settings, output_format, target_size
from broker.sniff import HEAD_BYTES, describe_non_image, image_format

# Enough for a 16k x 16k image; about the same limit as Pillow's bomb check.
DEFAULT_MAX_PIXELS = 16384 * 16384
# Larger images that need no resize stream from decoder to encoder.
STREAM_PIXELS = 1_000_000
# Orientations 5-8 swap width and height.
TRANSPOSED_ORIENTATIONS = frozenset({5, 6, 7, 8})


class ImageError(Exception):
    """This image cannot be optimized; the message says why."""


class Abandoned(Exception):
    """The batch was stopped while this image was being made: nothing was written."""


@dataclass
class Outcome:
    in_bytes: int
    out_bytes: int
    width: int
    height: int
    format: str
    kept_original: bool
    timings: dict = field(default_factory=dict)


class LoadWarnings(logging.Handler):
    """Warnings libvips raised while decoding.

    Some damage (garbage inside a JPEG's data) is only a warning to libvips,
    even with fail_on="warning", and the decoder reports it when it is
    freed. pyvips hands libvips' log to Python logging; this collects it.
    """

    CORRUPT = ("corrupt", "premature", "truncat", "invalid", "bad huffman")
    BENIGN = ("extraneous bytes",)  # junk between segments: the image itself is whole

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage().strip())

    def damage(self) -> str | None:
        for message in self.messages:
            low = message.lower()
            if any(w in low for w in self.CORRUPT) and not any(w in low for w in self.BENIGN):
                return message.removeprefix("VIPS: ")
        return None


LOAD_WARNINGS = LoadWarnings()


def configure_vips() -> None:
    """No operation cache (every image is new, and the cache only grows);
    libvips warnings collected rather than printed."""
    pyvips.cache_set_max(0)
    pyvips.cache_set_max_mem(0)
    pyvips.cache_set_max_files(0)
    vips_log = logging.getLogger("pyvips")
    if LOAD_WARNINGS not in vips_log.handlers:
        vips_log.addHandler(LOAD_WARNINGS)
    vips_log.propagate = False


def warm_up() -> None:
    """Pay libvips' first-use costs (codec set-up, thread pool) before taking jobs,
    so that a worker's first image is as fast as its hundredth."""
    tiny = pyvips.Image.black(64, 48, bands=3).cast("uchar")
    for fmt in ("jpeg", "png", "webp"):
        data = encode(tiny, fmt, Settings(quality=80))
        image = pyvips.Image.new_from_buffer(data, "", access="sequential")
        image.resize(0.5, kernel="lanczos3").copy_memory()


def optimize(input_path: str, output_path: str, settings: Settings, *,
             max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = 0, tag: str = "imgbus",
             input_roots: tuple[str, ...] | None = None,
             output_roots: tuple[str, ...] | None = None, abandon=lambda: False,
             writing=contextlib.nullcontext(), staged: bool = True) -> Outcome:
    """Optimize ``input_path`` into ``output_path``; raise ImageError on failure.

    With roots given, the input must lie under an input root and the output
    under an output root (after resolving links), whatever the job says.
    The output is written holding ``writing`` (see worker.Busy.writing).
    ``staged``: see optimize_bytes.
    """
    start = time.perf_counter()
    try:
        resolve = FolderCache()  # each path resolved once for all the checks
        check_output_path(input_path, output_path, resolve=resolve)
        if input_roots is not None:
            check_confined(input_path, input_roots, "input", resolve)
        if output_roots is not None:
            check_confined(output_path, output_roots, "output", resolve)
        data = read_input(input_path, max_bytes)
    except OutsideFolders:
        raise  # not about this image: the job is for another worker
    except PathError as exc:
        raise ImageError(str(exc)) from None
    read_s = time.perf_counter() - start
    encoded, outcome = optimize_bytes(data, settings, max_pixels=max_pixels, staged=staged)
    if staged:
        outcome.timings["decode"] += read_s
    clock = time.perf_counter()
    with writing:
        if abandon():
            raise Abandoned("the batch was stopped before this image was written")
        try:
            write_atomically(output_path, encoded, tag)
        except OSError as exc:
            raise ImageError(f"cannot write output: {exc.strerror or exc}") from None
    if staged:
        outcome.timings["write"] = time.perf_counter() - clock
    return outcome


def optimize_bytes(data, settings: Settings, *, max_pixels: int = DEFAULT_MAX_PIXELS, staged: bool = True):
    """The image work alone, in memory: ``(output bytes, Outcome)``. No file access.

    ``staged``: hold the image in memory between stages so that each one is
    timed. Otherwise the image streams from decoder to encoder in one libvips
    pipeline (7 % less time per small image: one pipeline instead of three),
    and the Outcome has no stage timings.
    """
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    if image_format(bytes(data[:HEAD_BYTES])) is None:
        raise ImageError(describe_non_image(bytes(data[:HEAD_BYTES])))
    LOAD_WARNINGS.messages.clear()
    image, in_format, upright, streamed = _decode(data, settings, max_pixels, staged)
    if not streamed:
        _check_damage()
    clock = _lap(timings, "decode", clock)

    out_format = output_format(settings.format, in_format)
    resizing = target_size(*upright, settings.resize_mode, settings.resize_size) != upright
    # A timed image that streams is resized into memory, so that the resize
    # has a time of its own; untimed, it streams on into the encoder (one
    # pipeline, one thread hand-off less).
    resized_apart = staged and streamed and resizing
    image = reshape(image, upright, settings, out_format, materialize=not streamed or resized_apart)
    if resized_apart:
        _check_damage()  # only the small resized copy is left
    clock = _lap(timings, "resize", clock)

    try:
        encoded = encode(image, out_format, settings)
    except ImageError:
        if streamed and not resized_apart:
            # The decoder ran inside the encoder: its own complaint says more.
            del image
            _check_damage()
        raise
    width, height = image.width, _page_height(image)
    del image
    if streamed and not resized_apart:
        _check_damage()  # the decoder has just been freed
    _lap(timings, "encode", clock)

    # Same format, same size, and no smaller: the input is the better output.
    kept = out_format == in_format and (width, height) == upright and len(encoded) >= len(data)
    if kept:
        encoded = data
    timings["write"] = 0.0
    return encoded, Outcome(len(data), len(encoded), width, height, out_format, kept,
                            timings if staged else {})


def _lap(timings: dict, stage: str, start: float) -> float:
    now = time.perf_counter()
    timings[stage] = now - start
    return now


def _check_damage() -> None:
    """Call once the decoders are freed: that is when they report their warnings."""
    damage = LOAD_WARNINGS.damage()
    if damage:
        raise ImageError(f"corrupt image data: {damage}")


def _decode(data: bytes, settings: Settings, max_pixels: int, staged: bool = True):
    """``data`` upright in sRGB: (image, input format, upright size, streamed).

    Normally the pixels are decoded into memory here, so that each stage is
    timed on its own. A large image is left streaming instead: decoding then
    happens strip by strip inside the resize (or, with no resize, inside the
    encoder), which saves a full-size copy and its memory traffic; its time
    counts under that stage.
    """
    # Only the header is read here; pixels are decoded by copy_memory() below.
    header = _vips(lambda: pyvips.Image.new_from_buffer(data, "", access="sequential", fail_on="warning"))
    in_format = _loader_format(header)
    if in_format == "gif" and not gif_is_whole(data):
        raise ImageError("truncated GIF: the file ends before its last frame does")
    pages = _get(header, "n-pages", 1)
    width, height = header.width, header.height
    if max_pixels and width * height > max_pixels:
        raise ImageError(
            f"image too large: {width}x{height} is {width * height / 1e6:.3g} megapixels, "
            f"over the limit of {max_pixels / 1e6:.3g} megapixels (--max-pixels)"
        )
    orientation = _get(header, "orientation", 1)
    if orientation in TRANSPOSED_ORIENTATIONS:
        width, height = height, width
    out_format = output_format(settings.format, in_format)
    if pages > 1 and in_format in ("gif", "webp") and out_format in ANIMATED_FORMATS:
        if max_pixels and width * height * pages > max_pixels:
            raise ImageError(f"animation too large: {pages} frames of {width}x{height} is over --max-pixels")
        image = _vips(lambda: pyvips.Image.new_from_buffer(
            data, "", n=-1, access="sequential", fail_on="warning"))
    else:
        options = _load_options(in_format, (width, height), settings)
        if orientation not in (0, 1):
            # Rotating reads rows out of order: a sequential decode cannot serve it.
            options["access"] = "random"
        if options == {"access": "sequential"}:
            image = header  # nothing to change: decode what is already open
        else:
            image = _vips(lambda: pyvips.Image.new_from_buffer(data, "", fail_on="warning", **options))
        if orientation not in (0, 1):
            image = image.autorot()
        elif pages == 1 and (width * height >= STREAM_PIXELS or not staged):
            return _to_srgb(image), in_format, (width, height), True
    image = _vips(_to_srgb(image).copy_memory)
    del header
    return image, in_format, (width, height), False


def gif_is_whole(data) -> bool:
    """A GIF ends with its trailer byte (";"), give or take padding.

    libvips decodes a cut-off animation without complaint, as the frames
    before the cut: the output would silently lose the rest.
    """
    tail = bytes(data[-64:]).rstrip(b"\0\r\n ")
    return tail.endswith(b";")


def _load_options(in_format: str, upright: tuple[int, int], settings: Settings) -> dict:
    """Let JPEG and WebP decode at a reduced size when resizing down.

    libjpeg's scaled IDCT is a proper downsampling filter, so a JPEG is
    decoded at 1/2, 1/4 or 1/8 scale as long as that stays at or above the
    target (3840 -> 1920 decodes straight at 1920); lanczos3 does the rest.
    WebP's scaled decode is cruder: it stops at twice the target.
    """
    target = target_size(*upright, settings.resize_mode, settings.resize_size)
    factor = min(upright[0] / target[0], upright[1] / target[1])
    options = {"access": "sequential"}
    if in_format == "jpeg" and factor >= 2:
        options["shrink"] = max(s for s in (2, 4, 8) if s <= factor)
    elif in_format == "webp" and factor > 2:
        options["scale"] = 2 / factor
    return options


def _to_srgb(image):
    """Colour-manage into sRGB (or keep grey); embedded profiles are honoured.

    A profile that says it is sRGB needs no conversion: sRGB to sRGB through
    floating-point Lab would only cost time (up to 200 ms on a wallpaper).
    """
    grey = image.interpretation in ("b-w", "grey16")
    if image.get_typeof("icc-profile-data") and not grey and not icc_is_srgb(image.get("icc-profile-data")):
        image = _vips(lambda: image.icc_transform("srgb", embedded=True, intent="perceptual"))
    if image.interpretation not in ("srgb", "b-w"):
        image = _vips(lambda: image.colourspace("b-w" if grey else "srgb"))
    if image.format != "uchar":
        image = image.cast("uchar")
    return image


def icc_is_srgb(profile: bytes) -> bool:
    """True for an RGB profile whose description names sRGB (IEC 61966-2.1)."""
    if len(profile) < 132 or profile[16:20] != b"RGB ":
        return False
    description = _icc_description(profile)
    return "srgb" in description.lower()


def _icc_description(profile: bytes) -> str:
    """The text of the profile's 'desc' tag (ICC v2 'desc' or v4 'mluc'); "" if unreadable."""
    try:
        for i in range(int.from_bytes(profile[128:132], "big")):
            entry = profile[132 + 12 * i: 144 + 12 * i]
            if entry[:4] != b"desc":
                continue
            start = int.from_bytes(entry[4:8], "big")
            data = profile[start: start + int.from_bytes(entry[8:12], "big")]
            if data[:4] == b"desc":
                return data[12: 12 + int.from_bytes(data[8:12], "big")].decode("latin-1")
            if data[:4] == b"mluc":
                length, offset = int.from_bytes(data[20:24], "big"), int.from_bytes(data[24:28], "big")
                return data[offset: offset + length].decode("utf-16-be", "replace")
    except (ValueError, IndexError):
        pass
    return ""


def reshape(image, upright: tuple[int, int], settings: Settings, out_format: str, materialize: bool = True):
    """Resize to the target size, and drop alpha where the format has none."""
    target = target_size(*upright, settings.resize_mode, settings.resize_size)
    if image.hasalpha() and out_format not in ALPHA_FORMATS:
        # Before resizing: fewer bands to resample, and no premultiplying.
        image = image.flatten(background=[255] * (image.bands - 1)).cast(image.format)
    if target != (image.width, _page_height(image)):
        image = _resize(image, target)
    return _vips(image.copy_memory) if materialize else image


def _resize(image, target: tuple[int, int]):
    page_height = _page_height(image)
    pages = image.height // page_height
    if pages > 1:
        # Resize frame by frame so that no frame bleeds into the next.
        frames = [image.crop(0, i * page_height, image.width, page_height) for i in range(pages)]
        out = pyvips.Image.arrayjoin([_resize_one(f, target) for f in frames], across=1)
        out = out.copy()
        out.set_type(pyvips.GValue.gint_type, "page-height", target[1])
        return out
    return _resize_one(image, target)


def _resize_one(image, target: tuple[int, int]):
    hscale = target[0] / image.width
    vscale = target[1] / image.height
    if image.hasalpha():
        # Resample premultiplied so transparent pixels do not bleed dark edges.
        # Back in 8 bits before resampling, as libvips' own thumbnail does:
        # resampling floats costs three times as much, and differs from this
        # only where alpha is nearly zero.
        premultiplied = image.premultiply().cast(image.format)
        out = premultiplied.resize(hscale, vscale=vscale, kernel="lanczos3").unpremultiply()
        return out.cast(image.format)
    return image.resize(hscale, vscale=vscale, kernel="lanczos3")


def encode(image, fmt: str, settings: Settings) -> bytes:
    quality = settings.quality_for(fmt)
    lossless = quality == 100
    try:
        if fmt == "jpeg":
            return image.jpegsave_buffer(Q=quality, optimize_coding=True, keep="none",
                                         subsample_mode="off" if lossless else "on")
        if fmt == "png":
            level = settings.png_compression
            if lossless:
                return image.pngsave_buffer(compression=9 if level is None else level, keep="none")
            return image.pngsave_buffer(compression=7 if level is None else level, palette=True,
                                        Q=quality, keep="none")
        if fmt == "webp":
            return image.webpsave_buffer(Q=quality, lossless=lossless, effort=4, keep="none")
        if fmt == "avif":
            return image.heifsave_buffer(compression="av1", Q=quality, lossless=lossless, effort=2,
                                         subsample_mode="off" if lossless else "auto", keep="none")
        if fmt == "tiff":
            return image.tiffsave_buffer(compression="deflate", predictor="horizontal", keep="none")
        if fmt == "gif":
            return image.gifsave_buffer(keep="none")
    except pyvips.Error as exc:
        message = _vips_message(exc)
        if message.startswith("corrupt"):
            raise ImageError(message) from None  # the input failed to decode on the way in
        raise ImageError(f"cannot encode {fmt}: {message}") from None
    raise ImageError(f"unsupported output format {fmt!r}")


_LOADER_FORMATS = {
    "jpegload": "jpeg", "pngload": "png", "webpload": "webp", "gifload": "gif",
    "tiffload": "tiff", "svgload": "svg",
}


def _loader_format(image) -> str:
    loader = _get(image, "vips-loader", "")
    for prefix in ("_buffer", "_source", "_file"):
        loader = loader.removesuffix(prefix)
    if loader == "heifload":
        return "avif" if _get(image, "heif-compression", "") == "av1" else "heif"
    if loader in _LOADER_FORMATS:
        return _LOADER_FORMATS[loader]
    raise ImageError(f"unsupported image type (loader {loader or 'unknown'})")


def _get(image, name: str, default):
    return image.get(name) if image.get_typeof(name) else default


def _page_height(image) -> int:
    ph = _get(image, "page-height", 0)
    return ph if ph and image.height % ph == 0 else image.height


def _vips(call):
    """Run a pyvips call, turning its errors into a readable ImageError."""
    try:
        return call()
    except pyvips.Error as exc:
        raise ImageError(_vips_message(exc)) from None


def _vips_message(exc: pyvips.Error) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    # libvips prefixes the useful line with a generic one ("unable to copy to memory").
    useful = [line for line in lines if not line.startswith(("unable to", "VipsOperation"))] or lines
    text = "; ".join(dict.fromkeys(useful))
    if any(word in text.lower() for word in ("premature", "truncat", "read error", "load error", "corrupt",
                                             "invalid", "warning", "bad ", "extraneous")):
        return f"corrupt or truncated image: {text}"
    if "not a known" in text or "is not in a known format" in text:
        return "not a supported image format"
    if text.startswith("unable to call"):
        # libvips said only that its loader failed: the file is damaged.
        return f"corrupt or truncated image ({text})"
    return text or "image could not be processed"
