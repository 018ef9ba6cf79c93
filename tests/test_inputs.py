"""Turning folders and batch files into jobs."""

import json
import os

import pytest
import pyvips

from broker.inputs import Planner
from broker.settings import Settings
from broker.sniff import HEAD_BYTES, pixel_count


def planner(out, **kw):
    return Planner("b", str(out), kw.pop("settings", Settings()), max_pixels=100, **kw)


def test_walk_picks_images_by_content_and_mirrors_the_tree(photo, tmp_path):
    photo("a.jpg")
    photo("sub/deeper/b.png")
    os.rename(photo("d.jpg"), tmp_path / "in" / "disguised.dat")  # still an image, by content
    (tmp_path / "in" / "notes.txt").write_text("hello")
    (tmp_path / "in" / "broken.jpg").write_text("not really")  # promises an image: becomes a job
    p = planner(tmp_path / "out", settings=Settings(format="webp"))
    p.add_inputs([str(tmp_path / "in")])
    outputs = sorted(os.path.relpath(j.output, tmp_path / "out") for j in p.plan().jobs)
    assert outputs == ["a.webp", "broken.jpg", "disguised.webp", "sub/deeper/b.webp"]
    assert p.plan().ignored_files == 1
    assert len({j.job_id for j in p.plan().jobs}) == 4


def test_original_format_uses_the_real_format_extension(photo, tmp_path):
    src = photo("a.jpg")
    os.rename(src, tmp_path / "in" / "really-a-jpeg.png")
    p = planner(tmp_path / "out")
    p.add_inputs([str(tmp_path / "in")])
    assert p.plan().jobs[0].output.endswith("really-a-jpeg.jpg")


def test_output_folder_inside_the_input_is_left_out(photo, tmp_path):
    photo("a.jpg")
    photo("optimized/a.jpg")   # last run's output
    p = planner(tmp_path / "in" / "optimized")
    p.add_inputs([str(tmp_path / "in")])
    assert [os.path.basename(j.input) for j in p.plan().jobs] == ["a.jpg"]
    assert p.plan().jobs[0].output == str(tmp_path / "in" / "optimized" / "a.jpg")


def test_colliding_outputs_get_distinct_names(photo, tmp_path):
    photo("a.jpg")
    photo("a.png")
    p = planner(tmp_path / "out", settings=Settings(format="webp"))
    p.add_inputs([str(tmp_path / "in")])
    assert sorted(os.path.basename(j.output) for j in p.plan().jobs) == ["a-png.webp", "a.webp"]


def test_several_inputs_keep_their_folder_names(photo, tmp_path):
    photo("x/one.jpg")
    photo("y/one.jpg")
    single = photo("one.jpg")
    p = planner(tmp_path / "out")
    p.add_inputs([str(tmp_path / "in" / "x"), str(tmp_path / "in" / "y"), single])
    outs = sorted(os.path.relpath(j.output, tmp_path / "out") for j in p.plan().jobs)
    assert outs == ["one.jpg", "x/one.jpg", "y/one.jpg"]


def test_a_file_named_twice_is_one_job(photo, tmp_path):
    inside = photo("x/one.jpg")
    photo("x/two.jpg")
    os.symlink(inside, tmp_path / "link.jpg")
    p = planner(tmp_path / "out")
    p.add_inputs([str(tmp_path / "in" / "x"), str(tmp_path / "in" / "x"), inside, str(tmp_path / "link.jpg")])
    assert sorted(os.path.basename(j.input) for j in p.plan().jobs) == ["one.jpg", "two.jpg"]


def test_a_file_whose_name_fits_its_output_keeps_it_whatever_the_order(photo, tmp_path):
    photo("a.png")   # walked first: it used to take a.webp from a.webp itself
    photo("a.webp")
    p = planner(tmp_path / "out", settings=Settings(format="webp"))
    p.add_inputs([str(tmp_path / "in")])
    by_input = {os.path.basename(j.input): os.path.basename(j.output) for j in p.plan().jobs}
    assert by_input == {"a.webp": "a.webp", "a.png": "a-png.webp"}


def test_batch_file_lines(photo, tmp_path):
    src = photo("a.jpg")
    batch = tmp_path / "jobs.jsonl"
    batch.write_text("\n".join([
        f'{{"input": "{src}", "job": "first", "settings": {{"format": "png"}}, "case": "ignored"}}',
        "this is not json",
        '{"output": "x.jpg"}',
        f'{{"input": "{src}", "output": "rel/b.webp", "settings": {{"quality": 0}}}}',
        f'{{"input": "{src}", "job": "first"}}',
        f'{{"input": "{src}", "output": "{src}"}}',
        f'{{"input": "{src}", "output": "/elsewhere/c.jpg"}}',
        "",
        f'{{"input": "{src}", "output": "rel/d.webp", "settings": {{"resize": {{"mode": "width", "size": 9}}}}}}',
    ]))
    p = planner(tmp_path / "out", confine_outputs=True)
    p.add_batch_file(str(batch))
    jobs = {j.job_id: j for j in p.plan().jobs}
    assert jobs["first"].settings["format"] == "png" and jobs["first"].output.endswith("a.png")
    errors = [r.error for r in p.plan().rejected]
    assert "batch file line 2: not valid JSON" in errors[0]
    assert 'line 3: needs an "input"' in errors[1]
    assert "batch file line 4: invalid setting: quality must be" in errors[2]
    assert "job id 'first' is used twice" in errors[3]
    # Found only when the batch is checked as a whole, still with their lines.
    assert errors[4].startswith("batch file line 6: ") and "is the input file itself" in errors[4]
    assert errors[5].startswith("batch file line 7: ") and "outside the output folder" in errors[5]
    assert len(p.plan().jobs) == 2
    last = [j for j in p.plan().jobs if j.job_id != "first"][0]
    assert last.output == str(tmp_path / "out" / "rel" / "d.jpg")   # a JPEG stays a JPEG: real extension
    assert last.settings["resize"] == {"mode": "width", "size": 9}


def test_skip_existing(photo, tmp_path):
    photo("a.jpg")
    photo("b.jpg")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.jpg").write_bytes(b"done before")
    p = planner(tmp_path / "out", skip_existing=True)
    p.add_inputs([str(tmp_path / "in")])
    assert [os.path.basename(j.input) for j in p.plan().skipped] == ["a.jpg"]
    assert [os.path.basename(j.input) for j in p.plan().jobs] == ["b.jpg"]


@pytest.mark.parametrize("confine", [True, False])
def test_absolute_outputs_outside_the_folder_only_when_not_confined(photo, tmp_path, confine):
    src = photo("a.jpg")
    batch = tmp_path / "jobs.jsonl"
    batch.write_text(f'{{"input": "{src}", "output": "{tmp_path}/elsewhere/a.jpg"}}\n')
    p = planner(tmp_path / "out", confine_outputs=confine)
    p.add_batch_file(str(batch))
    assert (len(p.plan().jobs), len(p.plan().rejected)) == ((0, 1) if confine else (1, 0))


def test_batch_file_outputs_get_their_real_extension(photo, tmp_path):
    src = photo("x.jpg")
    batch = tmp_path / "jobs.jsonl"
    batch.write_text(f'{{"input": "{src}", "output": "y.jpg", "settings": {{"format": "webp"}}}}\n'
                     f'{{"input": "{src}", "output": "wood.png"}}\n')
    p = planner(tmp_path / "out")
    p.add_batch_file(str(batch))
    assert [os.path.basename(j.output) for j in p.plan().jobs] == ["y.webp", "wood.jpg"]


def test_folder_cache_resolves_links_before_dotdot(tmp_path):
    from broker.paths import FolderCache
    (tmp_path / "target" / "deep").mkdir(parents=True)
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "link").symlink_to(tmp_path / "target" / "deep")
    tricky = f"{tmp_path}/root/link/../x.jpg"
    assert FolderCache()(tricky) == os.path.realpath(tricky) == str(tmp_path / "target" / "x.jpg")


def test_names_that_cannot_travel_are_rejected_alone(photo, tmp_path):
    photo("ok.jpg")
    src = tmp_path / "in"
    os.rename(photo("x.jpg"), os.path.join(os.fsencode(src), b"caf\xe9.jpg"))
    p = planner(tmp_path / "out")
    p.add_inputs([str(src)])
    plan = p.plan()
    assert [os.path.basename(j.input) for j in plan.jobs] == ["ok.jpg"]
    assert "not valid UTF-8" in plan.rejected[0].error and "\\xe9" in plan.rejected[0].input


def test_special_files_never_block_planning(photo, tmp_path):
    photo("a.jpg")
    os.mkfifo(tmp_path / "in" / "pipe.txt")       # not an image name: ignored
    os.mkfifo(tmp_path / "in" / "pipe.jpg")       # an image name: a job that will fail clearly
    p = planner(tmp_path / "out")
    p.add_inputs([str(tmp_path / "in")])
    plan = p.plan()
    assert sorted(os.path.basename(j.input) for j in plan.jobs) == ["a.jpg", "pipe.jpg"]
    assert plan.ignored_files == 1


def test_outputs_never_land_on_inputs_or_on_each_other(photo, tmp_path):
    b, c = photo("b.jpg"), photo("c.png")
    batch = tmp_path / "jobs.jsonl"
    batch.write_text("\n".join([
        f'{{"input": "{c}", "output": "{b}", "settings": {{"format": "jpeg"}}}}',
        f'{{"input": "{b}", "output": "out/b.webp", "settings": {{"format": "webp"}}}}',
        f'{{"input": "{b}", "output": "out/same.jpg", "job": "s1"}}',
        f'{{"input": "{c}", "output": "out/same.jpg", "job": "s2", "settings": {{"format": "jpeg"}}}}',
        f'{{"input": "{b}", "output": "out/a\\u0000.jpg"}}',
        f'{{"input": "{b}", "output": "x.jpg", "job": "{"X" * 300}"}}',
    ]) + "\n")
    p = planner(tmp_path, confine_outputs=False)
    p.add_batch_file(str(batch))
    plan = p.plan()
    assert sorted(j.job_id for j in plan.jobs) == ["j000002", "s1"]
    errors = " | ".join(r.error for r in plan.rejected)
    assert "would overwrite the input of job" in errors
    assert "is already the output of job s1" in errors
    assert "NUL byte" in errors and '"job" must be a string of 1 to 200' in errors


def test_generated_ids_never_take_a_users_id(photo, tmp_path):
    src = photo("a.jpg")
    batch = tmp_path / "jobs.jsonl"
    batch.write_text("\n".join([
        f'{{"input": "{src}", "output": "o1.jpg", "job": "line-3"}}',
        f'{{"input": "{src}", "output": "o2.jpg"}}',
        "not json",
        f'{{"input": "{src}", "output": "o4.jpg", "job": "j000002"}}',
    ]) + "\n")
    p = planner(tmp_path / "out")
    p.add_batch_file(str(batch))
    plan = p.plan()
    ids = [j.job_id for j in plan.jobs] + [r.job_id for r in plan.rejected]
    assert len(ids) == len(set(ids)) == 4
    assert {"line-3", "j000002"} <= {j.job_id for j in plan.jobs}


def test_linked_folders_are_walked_once(photo, tmp_path):
    photo("a.jpg")
    photo("../archive/2023/b.jpg")
    os.symlink(tmp_path / "archive" / "2023", tmp_path / "in" / "2023")
    os.symlink(tmp_path / "in", tmp_path / "in" / "loop")
    p = planner(tmp_path / "out")
    p.add_inputs([str(tmp_path / "in")])
    assert sorted(os.path.basename(j.input) for j in p.plan().jobs) == ["a.jpg", "b.jpg"]


def test_svg_behind_a_prolog_is_an_image():
    from broker.sniff import image_format
    svg = b'\xef\xbb\xbf<?xml version="1.0"?>\n<!-- made by hand -->\n<!DOCTYPE svg PUBLIC "-//W3C//DTD SVG 1.1//EN" "x">\n<svg xmlns="http://www.w3.org/2000/svg"/>'
    assert image_format(svg) == "svg"
    assert image_format(b"<html><body>no</body></html>") is None


def _image(path, width, height, **save):
    image = pyvips.Image.xyz(width, height)[0].cast("uchar").bandjoin([64, 128]).copy(interpretation="srgb")
    if save.pop("alpha", False):
        image = image.bandjoin(200)
    image.write_to_file(str(path), **save)
    return path


@pytest.mark.parametrize("name, save", [
    ("a.png", {}), ("a.gif", {}), ("lossy.webp", {}), ("lossless.webp", {"lossless": True}),
    ("alpha.webp", {"alpha": True}), ("a.jpg", {}),
])
def test_pixel_count_reads_the_size_from_the_header(tmp_path, name, save):
    path = _image(tmp_path / name, 321, 123, **save)
    assert pixel_count(str(path), path.read_bytes()[:HEAD_BYTES]) == 321 * 123


def test_pixel_count_skips_jpeg_metadata_past_the_first_bytes(tmp_path):
    """A JPEG's size can sit megabytes in, behind EXIF, ICC and XMP segments."""
    plain = _image(tmp_path / "plain.jpg", 300, 200).read_bytes()
    filler = b"".join(b"\xff\xe1" + (65000).to_bytes(2, "big") + bytes(64998) for _ in range(20))
    path = tmp_path / "meta.jpg"
    path.write_bytes(plain[:2] + filler + plain[2:])
    assert pyvips.Image.new_from_file(str(path)).width == 300  # still a valid JPEG
    assert pixel_count(str(path), path.read_bytes()[:HEAD_BYTES]) == 300 * 200
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(plain[:2] + filler[:100_000])
    assert pixel_count(str(truncated), truncated.read_bytes()[:HEAD_BYTES]) is None


def test_jobs_go_out_biggest_first_by_pixels_not_bytes(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    # A flat PNG of many pixels is a small file; a noisy photo of few is a big one.
    pyvips.Image.black(3000, 2000).new_from_image([200, 200, 200]).cast("uchar").pngsave(str(src / "flat.png"))
    pyvips.Image.gaussnoise(800, 600).cast("uchar").jpegsave(str(src / "noisy.jpg"), Q=95)
    _image(src / "mid.png", 1500, 1000)
    assert os.path.getsize(src / "flat.png") < os.path.getsize(src / "noisy.jpg")
    p = planner(tmp_path / "out")
    p.add_inputs([str(src)])
    assert [os.path.basename(j.input) for j in p.plan().jobs] == ["flat.png", "mid.png", "noisy.jpg"]


def test_pixel_count_never_blocks_on_a_path_that_became_a_fifo(tmp_path):
    """The header was read from a JPEG; by the time its metadata is walked the
    path is a FIFO with no writer: opening it must not block."""
    plain = _image(tmp_path / "plain.jpg", 300, 200).read_bytes()
    head = plain[:2] + b"\xff\xe1" + (65000).to_bytes(2, "big") + bytes(HEAD_BYTES - 6)
    os.mkfifo(tmp_path / "swapped.jpg")
    assert pixel_count(str(tmp_path / "swapped.jpg"), head) is None


def test_the_brokers_own_files_never_replace_an_input(photo, tmp_path):
    from dataclasses import replace

    from broker.config import BrokerConfig
    from broker.security import SecurityError
    from broker.server import check_own_files, plan_batch

    src = photo("a.jpg")
    os.symlink(src, tmp_path / "link.json")
    config = BrokerConfig(inputs=(str(tmp_path / "in"),), output_dir=str(tmp_path / "out"), output_dir_given=True)
    plan = plan_batch(config, "b")
    with pytest.raises(SecurityError, match="--report-json"):
        check_own_files(replace(config, report_json=str(tmp_path / "link.json")), plan)
    with pytest.raises(SecurityError, match="--results-jsonl"):
        check_own_files(replace(config, results_jsonl=src), plan)
    check_own_files(replace(config, report_json=str(tmp_path / "r.json")), plan)  # not an input: fine


def test_a_sample_of_the_batch_is_timed_drawn_over_all_of_it():
    from broker.inputs import choose_timed
    from broker.wire import Job

    def batch(n, batch_id="b"):
        jobs = [Job(f"j{i}", batch_id, f"/in/{i}.jpg", f"/out/{i}.jpg", {}) for i in range(n)]
        choose_timed(jobs, batch_id)
        return [i for i, job in enumerate(jobs) if job.timed]

    assert batch(5) == [0, 1, 2, 3, 4]          # a small batch: every job
    assert len(batch(20)) == 8                   # at least eight...
    big = batch(1000)
    assert len(big) == 125                       # ...else one in eight
    assert batch(1000) == big and batch(1000, "other") != big   # the same batch, the same sample
    # Not the first jobs (the largest: jobs go out biggest first) but all through the batch.
    assert 350 < sum(big) / len(big) < 650 and max(big) > 900


def test_a_confined_path_that_is_a_link_elsewhere_names_where_it_leads(tmp_path):
    from broker.paths import OutsideFolders, PathError, check_confined

    (tmp_path / "root").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "root" / "inside.jpg").write_bytes(b"x")
    (tmp_path / "root" / "away").symlink_to(tmp_path / "other")
    check_confined(str(tmp_path / "root" / "inside.jpg"), (str(tmp_path / "root"),), "input")
    with pytest.raises(PathError, match=r"a link to .*/other/b\.jpg\) is outside this worker's input folders"):
        check_confined(str(tmp_path / "root" / "away" / "b.jpg"), (str(tmp_path / "root"),), "input")
    with pytest.raises(OutsideFolders) as caught:
        check_confined(str(tmp_path / "other" / "b.jpg"), (str(tmp_path / "root"),), "input")
    # Outside even as written: not the image's doing but the worker's folders, which it names.
    assert "a link" not in str(caught.value) and f"({tmp_path / 'root'})" in str(caught.value)
    assert "--input-root" in str(caught.value)
    # Inside as written, out through a link: the image's doing, an ordinary refusal.
    with pytest.raises(PathError) as caught:
        check_confined(str(tmp_path / "root" / "away" / "b.jpg"), (str(tmp_path / "root"),), "input")
    assert type(caught.value) is PathError


@pytest.mark.parametrize("output", ["", ".", "..", "sub/", "sub/."])
def test_a_batch_output_that_names_no_file_is_refused(photo, tmp_path, output):
    src = photo("a.jpg")
    batch = tmp_path / "jobs.jsonl"
    batch.write_text(json.dumps({"input": src, "output": output}) + "\n")
    p = planner(tmp_path / "out")
    p.add_batch_file(str(batch))
    plan = p.plan()
    assert plan.jobs == []
    assert plan.rejected[0].error == f'batch file line 1: "output" must name a file, not {output!r}'
