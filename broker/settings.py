"""Per-image settings: output format, quality, resize. Pure; no I/O.

The same ``Settings`` object is built from command-line flags, from a batch
file line, and from a job message, so every component validates alike.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

FORMATS = ("original", "jpeg", "png", "webp", "avif", "tiff")
QUALITY_FORMATS = ("jpeg", "png", "webp", "avif")
RESIZE_MODES = ("none", "width", "height", "longest", "shortest")

# The real format of an output file decides its extension.
EXTENSIONS = {
    "jpeg": ".jpg",
    "png": ".png",
    "webp": ".webp",
    "avif": ".avif",
    "tiff": ".tif",
    "gif": ".gif",
}
# Other spellings of the same format's extension, which are kept as given.
EXTENSION_SPELLINGS = {
    "jpeg": frozenset({".jpg", ".jpeg", ".jpe", ".jfif"}),
    "tiff": frozenset({".tif", ".tiff"}),
}


def with_real_extension(path: str, fmt: str) -> str:
    """``path`` named for the format its file will really have."""
    if fmt not in EXTENSIONS:
        return path
    stem, ext = _split_extension(path)
    if ext.lower() in EXTENSION_SPELLINGS.get(fmt, {EXTENSIONS[fmt]}):
        return path
    return stem + EXTENSIONS[fmt]


def _split_extension(path: str) -> tuple[str, str]:
    head, tail = path.rsplit("/", 1) if "/" in path else ("", path)
    stem, dot, ext = tail.rpartition(".")
    if not dot or not stem:
        return path, ""
    return (f"{head}/" if head else "") + stem, "." + ext


# Formats that can carry several frames (animation) and an alpha channel.
ANIMATED_FORMATS = frozenset({"webp", "gif"})
ALPHA_FORMATS = frozenset({"png", "webp", "avif", "tiff", "gif"})

DEFAULT_QUALITY = 90


class SettingsError(ValueError):
    """A setting with a bad value; the message names the setting."""


def _quality_value(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 100:
        raise SettingsError(f"{name} must be an integer from 1 to 100, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class Settings:
    format: str = "original"
    quality: int = DEFAULT_QUALITY
    # Per-format overrides; None means "use quality".
    quality_jpeg: int | None = None
    quality_png: int | None = None
    quality_webp: int | None = None
    quality_avif: int | None = None
    resize_mode: str = "none"
    resize_size: int = 0
    # zlib level for PNG output; None: 7 (9 when lossless).
    png_compression: int | None = None

    def __post_init__(self):
        if self.format not in FORMATS:
            raise SettingsError(f"format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        _quality_value("quality", self.quality)
        for fmt in QUALITY_FORMATS:
            value = getattr(self, f"quality_{fmt}")
            if value is not None:
                _quality_value(f"quality.{fmt}", value)
        level = self.png_compression
        if level is not None and (isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= 9):
            raise SettingsError(f"png_compression must be an integer from 0 to 9, got {level!r}")
        if self.resize_mode not in RESIZE_MODES:
            raise SettingsError(
                f"resize mode must be one of {', '.join(RESIZE_MODES)}, got {self.resize_mode!r}"
            )
        if self.resize_mode != "none":
            size = self.resize_size
            if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= 100_000:
                raise SettingsError(f"resize size must be an integer from 1 to 100000, got {size!r}")

    def quality_for(self, fmt: str) -> int:
        override = getattr(self, f"quality_{fmt}", None) if fmt in QUALITY_FORMATS else None
        return self.quality if override is None else override

    def to_dict(self) -> dict:
        quality = {"global": self.quality}
        for fmt in QUALITY_FORMATS:
            value = getattr(self, f"quality_{fmt}")
            if value is not None:
                quality[fmt] = value
        data = {
            "format": self.format,
            "quality": quality,
            "resize": {"mode": self.resize_mode, "size": self.resize_size},
        }
        if self.png_compression is not None:
            data["png_compression"] = self.png_compression
        return data

    def merged(self, overrides: dict) -> Settings:
        """These settings with a batch line's or a job's ``settings`` applied."""
        if not isinstance(overrides, dict):
            raise SettingsError(f"settings must be an object, got {overrides!r}")
        changes: dict = {}
        if "format" in overrides:
            changes["format"] = overrides["format"]
        if "quality" in overrides:
            changes.update(_quality_changes(overrides["quality"]))
        if "resize" in overrides:
            changes.update(_resize_changes(overrides["resize"]))
        if "png_compression" in overrides:
            changes["png_compression"] = overrides["png_compression"]
        return replace(self, **changes) if changes else self

    @classmethod
    def from_dict(cls, data: dict) -> Settings:
        return cls().merged(data)


def _quality_changes(quality) -> dict:
    if isinstance(quality, dict):
        unknown = set(quality) - {"global", *QUALITY_FORMATS}
        if unknown:
            raise SettingsError(f"quality: unknown format {sorted(unknown)[0]!r}")
        changes = {f"quality_{k}": v for k, v in quality.items() if k != "global"}
        if "global" in quality:
            changes["quality"] = quality["global"]
        return changes
    return {"quality": quality}


def _resize_changes(resize) -> dict:
    if resize is None:
        return {"resize_mode": "none", "resize_size": 0}
    if isinstance(resize, str):
        return parse_resize(resize)
    if not isinstance(resize, dict):
        raise SettingsError(f"resize must be an object like {{\"mode\": \"longest\", \"size\": 1920}}, got {resize!r}")
    return {"resize_mode": resize.get("mode", "none"), "resize_size": resize.get("size", 0)}


def parse_resize(text: str) -> dict:
    """``MODE:SIZE`` (or ``none``) from the command line."""
    mode, _, size = text.partition(":")
    if mode == "none" and not size:
        return {"resize_mode": "none", "resize_size": 0}
    if not size.isdigit():
        raise SettingsError(f"resize must look like MODE:SIZE (e.g. longest:1920), got {text!r}")
    return {"resize_mode": mode, "resize_size": int(size)}


def target_size(width: int, height: int, mode: str, size: int) -> tuple[int, int]:
    """Output dimensions for an upright ``width`` x ``height`` image.

    Keeps the aspect ratio and never enlarges.
    """
    if mode == "none":
        return width, height
    ref = {
        "width": width,
        "height": height,
        "longest": max(width, height),
        "shortest": min(width, height),
    }[mode]
    if size >= ref:
        return width, height
    scale = size / ref
    return max(1, round(width * scale)), max(1, round(height * scale))


def output_format(requested: str, input_format: str) -> str:
    """The real format an output will have.

    ``original`` keeps the input's format when imgbus can write it; HEIC and
    SVG inputs cannot be written back, so they become JPEG and PNG.
    """
    if requested != "original":
        return requested
    if input_format in EXTENSIONS:
        return input_format
    return {"heif": "jpeg", "svg": "png"}.get(input_format, "png")
