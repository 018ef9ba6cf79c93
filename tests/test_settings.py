"""Settings validation, per-format quality, resize maths."""

import pytest

from broker.settings import (
    Settings, SettingsError, output_format, parse_resize, target_size, with_real_extension,
)


def test_defaults_match_the_original_product():
    s = Settings()
    assert (s.format, s.quality, s.resize_mode) == ("original", 90, "none")


@pytest.mark.parametrize("kwargs, fragment", [
    ({"format": "bmp"}, "format must be one of"),
    ({"quality": 0}, "quality must be an integer from 1 to 100"),
    ({"quality": 101}, "quality must be"),
    ({"quality_webp": 0}, "quality.webp"),
    ({"resize_mode": "diagonal", "resize_size": 5}, "resize mode"),
    ({"resize_mode": "width", "resize_size": 0}, "resize size"),
])
def test_bad_values_name_the_setting(kwargs, fragment):
    with pytest.raises(SettingsError, match=fragment):
        Settings(**kwargs)


def test_per_format_quality_overrides_the_global_one():
    s = Settings.from_dict({"quality": {"global": 70, "webp": 55, "png": 100}})
    assert s.quality_for("jpeg") == 70
    assert s.quality_for("webp") == 55
    assert s.quality_for("png") == 100
    assert s.quality_for("tiff") == 70


def test_merged_applies_a_batch_line_over_the_defaults():
    base = Settings(format="webp", quality=80)
    merged = base.merged({"resize": {"mode": "longest", "size": 300}, "quality": 60})
    assert (merged.format, merged.quality, merged.resize_mode, merged.resize_size) == ("webp", 60, "longest", 300)
    assert base.merged({}) is base


def test_round_trip_through_a_job_message():
    s = Settings(format="avif", quality=50, quality_avif=40, resize_mode="width", resize_size=800)
    assert Settings.from_dict(s.to_dict()) == s


def test_unknown_quality_format_is_an_error():
    with pytest.raises(SettingsError, match="unknown format 'bmp'"):
        Settings.from_dict({"quality": {"bmp": 3}})


@pytest.mark.parametrize("text, expected", [
    ("none", {"resize_mode": "none", "resize_size": 0}),
    ("longest:1920", {"resize_mode": "longest", "resize_size": 1920}),
])
def test_parse_resize(text, expected):
    assert parse_resize(text) == expected


def test_parse_resize_rejects_garbage():
    with pytest.raises(SettingsError, match="MODE:SIZE"):
        parse_resize("longest")


@pytest.mark.parametrize("size, mode, n, expected", [
    ((4000, 3000), "width", 1000, (1000, 750)),
    ((4000, 3000), "height", 600, (800, 600)),
    ((3000, 4000), "longest", 1000, (750, 1000)),
    ((4000, 3000), "shortest", 300, (400, 300)),
    ((400, 300), "longest", 1000, (400, 300)),      # never enlarges
    ((400, 300), "none", 10, (400, 300)),
    ((10000, 3), "width", 100, (100, 1)),           # never rounds to zero
])
def test_target_size_keeps_aspect_and_never_enlarges(size, mode, n, expected):
    assert target_size(*size, mode, n) == expected


def test_output_format_for_original():
    assert output_format("original", "png") == "png"
    assert output_format("original", "gif") == "gif"
    assert output_format("original", "heif") == "jpeg"   # no HEVC encoder
    assert output_format("webp", "png") == "webp"


def test_png_compression_is_validated_and_carried():
    s = Settings.from_dict({"png_compression": 6})
    assert s.png_compression == 6 and Settings.from_dict(s.to_dict()) == s
    with pytest.raises(SettingsError, match="png_compression"):
        Settings(png_compression=10)


@pytest.mark.parametrize("path, fmt, expected", [
    ("/o/a.jpg", "webp", "/o/a.webp"),
    ("/o/a.JPEG", "jpeg", "/o/a.JPEG"),
    ("/o/a.tiff", "tiff", "/o/a.tiff"),
    ("/o/wood.png", "jpeg", "/o/wood.jpg"),
    ("/o/noext", "png", "/o/noext.png"),
    ("/o.d/.hidden", "png", "/o.d/.hidden.png"),
    ("/o/a.b.c.gif", "gif", "/o/a.b.c.gif"),
])
def test_outputs_are_named_for_their_real_format(path, fmt, expected):
    assert with_real_extension(path, fmt) == expected
