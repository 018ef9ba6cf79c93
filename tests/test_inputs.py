"""Turning folders and batch files into jobs."""

import os

import pytest

from broker.inputs import Planner
from broker.settings import Settings


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
    outputs = sorted(os.path.relpath(j.output, tmp_path / "out") for j in p.plan.jobs)
    assert outputs == ["a.webp", "broken.jpg", "disguised.webp", "sub/deeper/b.webp"]
    assert p.plan.ignored_files == 1
    assert len({j.job_id for j in p.plan.jobs}) == 4


def test_original_format_uses_the_real_format_extension(photo, tmp_path):
    src = photo("a.jpg")
    os.rename(src, tmp_path / "in" / "really-a-jpeg.png")
    p = planner(tmp_path / "out")
    p.add_inputs([str(tmp_path / "in")])
    assert p.plan.jobs[0].output.endswith("really-a-jpeg.jpg")


def test_output_folder_inside_the_input_is_left_out(photo, tmp_path):
    photo("a.jpg")
    photo("optimized/a.jpg")   # last run's output
    p = planner(tmp_path / "in" / "optimized")
    p.add_inputs([str(tmp_path / "in")])
    assert [os.path.basename(j.input) for j in p.plan.jobs] == ["a.jpg"]
    assert p.plan.jobs[0].output == str(tmp_path / "in" / "optimized" / "a.jpg")


def test_colliding_outputs_get_distinct_names(photo, tmp_path):
    photo("a.jpg")
    photo("a.png")
    p = planner(tmp_path / "out", settings=Settings(format="webp"))
    p.add_inputs([str(tmp_path / "in")])
    assert sorted(os.path.basename(j.output) for j in p.plan.jobs) == ["a-png.webp", "a.webp"]


def test_several_inputs_keep_their_folder_names(photo, tmp_path):
    a = photo("x/one.jpg")
    photo("y/one.jpg")
    p = planner(tmp_path / "out")
    p.add_inputs([str(tmp_path / "in" / "x"), str(tmp_path / "in" / "y"), a])
    outs = sorted(os.path.relpath(j.output, tmp_path / "out") for j in p.plan.jobs)
    assert outs == ["one.jpg", "x/one.jpg", "y/one.jpg"]


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
    jobs = {j.job_id: j for j in p.plan.jobs}
    assert jobs["first"].settings["format"] == "png" and jobs["first"].output.endswith("a.png")
    errors = [r.error for r in p.plan.rejected]
    assert "batch file line 2: not valid JSON" in errors[0]
    assert 'line 3: needs an "input"' in errors[1]
    assert "invalid setting: quality must be" in errors[2]
    assert "job id 'first' is used twice" in errors[3]
    assert "is the input file itself" in errors[4]
    assert "outside the output folder" in errors[5]
    assert len(p.plan.jobs) == 2
    last = [j for j in p.plan.jobs if j.job_id != "first"][0]
    assert last.output == str(tmp_path / "out" / "rel" / "d.jpg")   # a JPEG stays a JPEG: real extension
    assert last.settings["resize"] == {"mode": "width", "size": 9}


def test_skip_existing(photo, tmp_path):
    photo("a.jpg")
    photo("b.jpg")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.jpg").write_bytes(b"done before")
    p = planner(tmp_path / "out", skip_existing=True)
    p.add_inputs([str(tmp_path / "in")])
    assert [os.path.basename(j.input) for j in p.plan.skipped] == ["a.jpg"]
    assert [os.path.basename(j.input) for j in p.plan.jobs] == ["b.jpg"]


@pytest.mark.parametrize("confine", [True, False])
def test_absolute_outputs_outside_the_folder_only_when_not_confined(photo, tmp_path, confine):
    src = photo("a.jpg")
    batch = tmp_path / "jobs.jsonl"
    batch.write_text(f'{{"input": "{src}", "output": "{tmp_path}/elsewhere/a.jpg"}}\n')
    p = planner(tmp_path / "out", confine_outputs=confine)
    p.add_batch_file(str(batch))
    assert (len(p.plan.jobs), len(p.plan.rejected)) == ((0, 1) if confine else (1, 0))


def test_batch_file_outputs_get_their_real_extension(photo, tmp_path):
    src = photo("x.jpg")
    batch = tmp_path / "jobs.jsonl"
    batch.write_text(f'{{"input": "{src}", "output": "y.jpg", "settings": {{"format": "webp"}}}}\n'
                     f'{{"input": "{src}", "output": "wood.png"}}\n')
    p = planner(tmp_path / "out")
    p.add_batch_file(str(batch))
    assert [os.path.basename(j.output) for j in p.plan.jobs] == ["y.webp", "wood.jpg"]


def test_folder_cache_resolves_links_before_dotdot(tmp_path):
    from broker.paths import FolderCache
    (tmp_path / "target" / "deep").mkdir(parents=True)
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "link").symlink_to(tmp_path / "target" / "deep")
    tricky = f"{tmp_path}/root/link/../x.jpg"
    assert FolderCache()(tricky) == os.path.realpath(tricky) == str(tmp_path / "target" / "x.jpg")
