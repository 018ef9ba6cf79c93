"""The pyvips core on small generated images: formats, sizes, and the traps."""

import hashlib
import os

import pytest
import pyvips

from broker.settings import Settings
from sidecar.optimize import ImageError, configure_vips, optimize

configure_vips()


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def load(path, **kw):
    return pyvips.Image.new_from_file(path, **kw)


def run(src, out, **settings):
    return optimize(str(src), str(out), Settings(**settings))


@pytest.mark.parametrize("fmt, loader", [
    ("jpeg", "jpegload"), ("png", "pngload"), ("webp", "webpload"), ("avif", "heifload"), ("tiff", "tiffload"),
])
def test_each_output_format_decodes_as_that_format(photo, tmp_path, fmt, loader):
    src = photo("a.jpg")
    out = tmp_path / "out" / f"a.{fmt}"
    result = run(src, out, format=fmt)
    image = load(str(out))
    assert image.get("vips-loader") == loader
    assert (image.width, image.height) == (640, 480) == (result.width, result.height)
    assert result.format == fmt and result.out_bytes == os.path.getsize(out)
    image.avg()  # decodes completely


@pytest.mark.parametrize("mode, size, expected", [
    ("width", 320, (320, 240)), ("height", 120, (160, 120)), ("longest", 200, (200, 150)),
    ("shortest", 240, (320, 240)), ("longest", 5000, (640, 480)),
])
def test_resize_modes_keep_aspect_and_never_enlarge(photo, tmp_path, mode, size, expected):
    src = photo("a.jpg")
    out = tmp_path / "a.webp"
    result = run(src, out, format="webp", resize_mode=mode, resize_size=size)
    assert (result.width, result.height) == expected
    assert (load(str(out)).width, load(str(out)).height) == expected


def test_big_shrink_on_load_still_gives_exact_size(photo, tmp_path):
    src = photo("big.jpg", width=4000, height=3000)
    result = run(src, tmp_path / "t.jpg", resize_mode="longest", resize_size=256)
    assert (result.width, result.height) == (256, 192)


def test_exif_orientation_is_applied_then_stripped(photo, tmp_path):
    src = photo("rot.jpg", width=400, height=300, orientation=6)
    result = run(src, tmp_path / "a.png", format="png")
    assert (result.width, result.height) == (300, 400)
    resized = run(src, tmp_path / "b.jpg", format="jpeg", resize_mode="width", resize_size=150)
    out = load(str(tmp_path / "b.jpg"))
    assert (resized.width, resized.height) == (150, 200) == (out.width, out.height)
    assert not out.get_typeof("orientation") or out.get("orientation") == 1


@pytest.mark.parametrize("orientation", [2, 3, 5, 6, 7, 8])
@pytest.mark.parametrize("resize", [None, 500])
def test_every_orientation_of_a_large_jpeg(photo, tmp_path, orientation, resize):
    """Large enough that a sequential decode cannot buffer the rotation away."""
    src = photo(f"o{orientation}.jpg", width=1800, height=1200, orientation=orientation)
    kwargs = {"resize_mode": "longest", "resize_size": resize} if resize else {}
    result = run(src, tmp_path / "o.tif", format="tiff", **kwargs)
    expected = pyvips.Image.new_from_file(src).autorot()
    if resize:
        expected = expected.resize(resize / max(expected.width, expected.height))
    assert (result.width, result.height) == (expected.width, expected.height)
    out = load(str(tmp_path / "o.tif"))
    # The content is oriented like libvips' own autorot (a wrong turn differs by ~50).
    assert (out.cast("float") - expected.cast("float")).abs().avg() < (1 if not resize else 12)


def test_alpha_is_flattened_onto_white_for_jpeg(photo, tmp_path):
    src = photo("alpha.png", alpha=True)  # left half fully transparent
    run(src, tmp_path / "a.jpg", format="jpeg")
    out = load(str(tmp_path / "a.jpg"))
    assert out.bands == 3
    assert out.crop(10, 10, 20, 20).avg() > 245        # white, not black
    webp = tmp_path / "a.webp"
    run(src, webp, format="webp")
    assert load(str(webp)).hasalpha()


def _white_beside_transparent_black(path, width=1200, height=900):
    """Opaque white on the left; on the right, alpha 0 over black pixels."""
    x = pyvips.Image.xyz(width, height)[0]
    opaque = x < width // 2
    rgb = opaque.ifthenelse([255, 255, 255], [0, 0, 0])
    rgb.bandjoin(opaque.ifthenelse(255, 0)).cast("uchar").copy(interpretation="srgb").pngsave(str(path))
    return path


def test_resizing_with_alpha_does_not_bleed_hidden_colour_into_edges(tmp_path):
    """Resampled premultiplied: the black under alpha 0 must not grey the white edge."""
    src = _white_beside_transparent_black(tmp_path / "edge.png")
    run(src, tmp_path / "edge.out.png", format="png", quality=100, resize_mode="width", resize_size=450)
    out = load(str(tmp_path / "edge.out.png"))
    assert out.bands == 4 and out.width == 450
    alpha = out[3]
    edge = (alpha > 0) & (alpha < 255)
    assert edge.avg() > 0  # the resize did make partly transparent pixels
    # Wherever any coverage is left, the colour is still white.
    darkest = (alpha > 0).ifthenelse(out[0:3].bandmean(), 255).min()
    assert darkest >= 250


def test_resizing_onto_white_for_jpeg_keeps_the_edge_white(tmp_path):
    src = _white_beside_transparent_black(tmp_path / "edge.png")
    result = run(src, tmp_path / "edge.jpg", format="jpeg", resize_mode="width", resize_size=450)
    out = load(str(tmp_path / "edge.jpg"))
    assert out.bands == 3 and (result.width, result.height) == (450, 338)
    # Everything was white or transparent: flattened on white, all of it is white.
    assert out.min() >= 245


def test_animated_gif_keeps_its_frames_in_webp_and_when_resized(tmp_path):
    frames = [pyvips.Image.black(40, 30).new_from_image([i * 20, 0, 255 - i * 20]).cast("uchar")
              for i in range(6)]
    anim = pyvips.Image.arrayjoin(frames, across=1).copy()
    anim.set_type(pyvips.GValue.gint_type, "page-height", 30)
    anim.set_type(pyvips.GValue.array_int_type, "delay", [100] * 6)
    src = tmp_path / "anim.gif"
    anim.gifsave(str(src))
    result = run(src, tmp_path / "anim.webp", format="webp", resize_mode="width", resize_size=20)
    out = load(str(tmp_path / "anim.webp"), n=-1)
    assert out.get("n-pages") == 6 and out.get("page-height") == 15 == result.height
    assert result.width == 20


@pytest.mark.parametrize("fmt", ["original", "webp", "jpeg"])
@pytest.mark.parametrize("keep", [0.5, 0.9, 0.99])
def test_a_cut_off_animated_gif_fails_instead_of_losing_frames(tmp_path, fmt, keep):
    frames = [pyvips.Image.black(64, 64).draw_rect([i * 6, 128, 255 - i * 6], i, i, 20, 20, fill=True)
              for i in range(40)]
    anim = pyvips.Image.arrayjoin(frames, across=1).copy()
    anim.set_type(pyvips.GValue.gint_type, "page-height", 64)
    anim.set_type(pyvips.GValue.array_int_type, "delay", [50] * 40)
    data = anim.gifsave_buffer()
    whole, cut = tmp_path / "whole.gif", tmp_path / "cut.gif"
    whole.write_bytes(data)
    cut.write_bytes(data[: int(len(data) * keep)])
    run(whole, tmp_path / "out" / "whole.gif", format=fmt)  # the uncut one is fine
    with pytest.raises(ImageError, match="truncated GIF"):
        run(cut, tmp_path / "out" / "cut.gif", format=fmt)


def test_icc_profile_is_converted_to_srgb(photo, tmp_path):
    src = tmp_path / "p3.jpg"
    base = load(photo("base.png"))
    base.icc_transform("p3", embedded=False, input_profile="srgb").jpegsave(str(src), Q=95, keep="icc")
    assert load(str(src)).get_typeof("icc-profile-data")
    run(src, tmp_path / "out.jpg", format="jpeg")
    out = load(str(tmp_path / "out.jpg"))
    assert not out.get_typeof("icc-profile-data")
    # Converted back to sRGB the colours are close to the original ones.
    assert abs(out.avg() - base.avg()) < 4


def test_not_smaller_keeps_the_original_bytes_only_when_nothing_else_changed(photo, tmp_path):
    src = photo("small.jpg", q=40)
    same = run(src, tmp_path / "same.jpg", quality=100)
    assert same.kept_original and sha(tmp_path / "same.jpg") == sha(src)
    converted = run(src, tmp_path / "conv.png", format="png", quality=100)
    assert not converted.kept_original and load(str(tmp_path / "conv.png")).get("vips-loader") == "pngload"


def test_quality_100_is_lossless_for_webp(photo, tmp_path):
    src = photo("a.png")
    run(src, tmp_path / "a.webp", format="webp", quality=100)
    diff = (load(str(tmp_path / "a.webp")) - load(src)).abs().max()
    assert diff == 0


@pytest.mark.parametrize("content, fragment", [
    (b"", "empty file"),
    (b"<!DOCTYPE html><html><body>404</body></html>", "HTML"),
    (b"just some words", "text"),
])
def test_non_images_fail_clearly(tmp_path, content, fragment):
    src = tmp_path / "x.jpg"
    src.write_bytes(content)
    with pytest.raises(ImageError, match=fragment):
        run(src, tmp_path / "out" / "x.jpg")
    assert not (tmp_path / "out").exists()


def test_truncated_jpeg_fails_and_leaves_no_output(photo, tmp_path):
    src = photo("t.jpg")
    data = open(src, "rb").read()
    open(src, "wb").write(data[: len(data) // 2])
    before = sha(src)
    with pytest.raises(ImageError, match="corrupt or truncated"):
        run(src, tmp_path / "out" / "t.webp", format="webp")
    assert sha(src) == before
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


def test_missing_and_folder_inputs(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        run(tmp_path / "nope.jpg", tmp_path / "o.jpg")
    (tmp_path / "dir.jpg").mkdir()
    with pytest.raises(ImageError, match="folder"):
        run(tmp_path / "dir.jpg", tmp_path / "o.jpg")


def test_pixel_limit_is_checked_from_the_header(photo, tmp_path):
    src = photo("a.jpg")
    with pytest.raises(ImageError, match=r"image too large: 640x480 is 0\.307 megapixels, "
                                         r"over the limit of 0\.307 megapixels"):
        optimize(src, str(tmp_path / "o.jpg"), Settings(), max_pixels=640 * 480 - 1)


def test_output_that_is_the_input_is_refused(photo, tmp_path):
    src = photo("same.jpg")
    before = sha(src)
    twisted = os.path.join(os.path.dirname(src), "..", "in", ".", "same.jpg")
    for target in (src, twisted):
        with pytest.raises(ImageError, match="input file itself"):
            run(src, target)
    os.link(src, tmp_path / "hardlink.jpg")
    with pytest.raises(ImageError, match="link to the input"):
        run(src, tmp_path / "hardlink.jpg")
    assert sha(src) == before


def test_no_temporary_file_is_left_behind(photo, tmp_path):
    src = photo("a.jpg")
    out_dir = tmp_path / "out"
    run(src, out_dir / "a.webp", format="webp")
    assert os.listdir(out_dir) == ["a.webp"]


def test_corrupt_data_inside_a_complete_jpeg_fails(photo, tmp_path):
    src = photo("mid.jpg", width=1200, height=900)
    data = bytearray(open(src, "rb").read())
    third = len(data) // 3
    data[third:third + 2000] = b"\xaa" * 2000       # garbage in the middle, end intact
    open(src, "wb").write(bytes(data))
    with pytest.raises(ImageError, match="corrupt"):
        run(src, tmp_path / "out" / "mid.webp", format="webp")
    assert not (tmp_path / "out" / "mid.webp").exists()


def test_pipes_and_devices_are_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "pipe.jpg")
    with pytest.raises(ImageError, match="not a regular file"):
        run(tmp_path / "pipe.jpg", tmp_path / "o.jpg")
    os.symlink("/dev/zero", tmp_path / "zero.jpg")
    with pytest.raises(ImageError, match="not a regular file"):
        run(tmp_path / "zero.jpg", tmp_path / "o.jpg")


def test_input_size_limit(photo, tmp_path):
    src = photo("a.jpg")
    with pytest.raises(ImageError, match=r"larger than the limit of 0\.001 MB"):
        optimize(src, str(tmp_path / "o.jpg"), Settings(), max_bytes=1000)


def test_an_input_that_grows_after_its_size_was_read_is_read_whole_up_to_the_limit(tmp_path, monkeypatch):
    from broker import paths

    path = tmp_path / "growing.bin"
    path.write_bytes(b"x" * 5000)
    real_fstat = os.fstat

    class Understated:  # what fstat said before the file grew to 5000 bytes
        def __init__(self, fd):
            self._info = real_fstat(fd)
            self.st_mode, self.st_size = self._info.st_mode, 1000

    monkeypatch.setattr(paths.os, "fstat", Understated)
    assert paths.read_input(str(path), max_bytes=8000) == b"x" * 5000
    with pytest.raises(paths.PathError, match="larger than the limit"):
        paths.read_input(str(path), max_bytes=3000)


@pytest.mark.parametrize("damage", ["truncate", "garble"])
@pytest.mark.parametrize("size", [(2600, 1800), (640, 480)])
@pytest.mark.parametrize("resize", ["none", "longest"])
@pytest.mark.parametrize("staged", [True, False])
def test_images_that_stream_still_fail_on_damage(photo, tmp_path, damage, size, resize, staged):
    """Streamed (large, or untimed) images decode inside the resize or the
    encoder; the damage must still be caught and nothing written."""
    src = photo("big.jpg", width=size[0], height=size[1])
    data = bytearray(open(src, "rb").read())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 3: len(data) // 3 + len(data) // 6] = b"\xaa" * (len(data) // 6)
    open(src, "wb").write(bytes(data))
    settings = Settings(resize_mode=resize, resize_size=400 if resize != "none" else 0)
    # The same words whichever way it was decoded: never blamed on the encoder.
    with pytest.raises(ImageError, match="^corrupt or truncated image"):
        optimize(str(src), str(tmp_path / "out" / "big.jpg"), settings, staged=staged)
    assert not (tmp_path / "out" / "big.jpg").exists()


def test_large_image_streams_to_the_same_result(photo, tmp_path):
    src = photo("big.png", width=2600, height=1800)
    result = run(src, tmp_path / "big.webp", format="webp", quality=100)
    out = load(str(tmp_path / "big.webp"))
    assert (result.width, result.height) == (2600, 1800)
    assert (out - load(src)).abs().max() == 0


def test_srgb_profiles_are_recognised_and_others_are_not():
    from sidecar.optimize import icc_is_srgb
    base = pyvips.Image.black(8, 8, bands=3)
    srgb = base.icc_transform("srgb", input_profile="srgb", embedded=False).get("icc-profile-data")
    p3 = base.icc_transform("p3", input_profile="srgb", embedded=False).get("icc-profile-data")
    assert icc_is_srgb(srgb) and not icc_is_srgb(p3)
    assert not icc_is_srgb(b"garbage" * 30)


def test_a_png_with_no_image_data_is_called_damaged(tmp_path):
    pyvips.Image.black(100, 100, bands=3).pngsave(str(tmp_path / "ok.png"))
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "empty.png").write_bytes(data[:data.index(b"IDAT") - 4] + data[data.index(b"IEND") - 4:])
    with pytest.raises(ImageError, match="corrupt or truncated image"):
        run(tmp_path / "empty.png", tmp_path / "out.png")
    assert not (tmp_path / "out.png").exists()


@pytest.mark.parametrize("settings", [
    {"format": "jpeg", "resize_mode": "longest", "resize_size": 200},
    {"format": "png", "quality": 100},
    {"format": "webp"},
])
def test_streaming_a_small_image_gives_the_same_output_without_stage_timings(photo, tmp_path, settings):
    src = photo("a.png", width=500, height=400, alpha=True)
    timed = run(src, tmp_path / "timed.out", **settings)
    streamed = optimize(str(src), str(tmp_path / "streamed.out"), Settings(**settings), staged=False)
    assert (tmp_path / "timed.out").read_bytes() == (tmp_path / "streamed.out").read_bytes()
    assert (streamed.width, streamed.height, streamed.out_bytes) == (timed.width, timed.height, timed.out_bytes)
    assert set(timed.timings) == {"decode", "resize", "encode", "write"} and streamed.timings == {}


def test_a_truncated_image_fails_when_streamed_too(photo, tmp_path):
    whole = open(photo("a.jpg", width=600, height=400), "rb").read()
    (tmp_path / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    for staged in (True, False):
        with pytest.raises(ImageError, match="corrupt or truncated"):
            optimize(str(tmp_path / "cut.jpg"), str(tmp_path / f"out{staged}.jpg"), Settings(), staged=staged)
        assert not (tmp_path / f"out{staged}.jpg").exists()


def test_a_worker_refuses_a_job_for_other_folders_but_fails_one_that_links_out(photo, tmp_path):
    """Outside its folders as written: refused, for another worker. Inside but
    linked out: the image's doing, a failure of that job alone."""
    from broker import wire
    from sidecar.worker import WorkerConfig, process

    src = photo("a.jpg")
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "sub").symlink_to(elsewhere)
    config = WorkerConfig("w-1", "tcp://127.0.0.1:1", "tcp://127.0.0.1:2",
                          input_roots=(str(tmp_path / "in"),), output_roots=(str(out),))

    def job(job_id, input_path, output_path):
        return wire.Job(job_id, "b", str(input_path), str(output_path), Settings().to_dict())

    refused, _ = process(job("j1", src, tmp_path / "other" / "a.jpg"), config)
    assert type(refused) is wire.Refused and refused.job_id == "j1"
    assert "output path" in refused.reason and "--output-root" in refused.reason
    failed, _ = process(job("j2", src, out / "sub" / "a.jpg"), config)
    assert type(failed) is wire.Done and not failed.ok and "a link to" in failed.error
    done, _ = process(job("j3", src, out / "a.jpg"), config)
    assert done.ok and os.listdir(elsewhere) == [] and sorted(os.listdir(out)) == ["a.jpg", "sub"]
