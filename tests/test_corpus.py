"""The real corpus: 51 wallpapers from Debian packages, through 2 workers."""

import json
import os

import pyvips

from broker.settings import target_size
from conftest import run_launch


def test_wallpapers_to_webp_1920(corpus, tmp_path):
    out, report, results = tmp_path / "out", tmp_path / "r.json", tmp_path / "res.jsonl"
    proc = run_launch([corpus, "-o", out, "--workers", 2, "--format", "webp", "--resize", "longest:1920",
                       "--report-json", report, "--results-jsonl", results, "--log-dir", tmp_path / "logs"],
                      timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(report.read_text())
    lines = [json.loads(l) for l in open(results)]
    assert r["tasks"]["total"] == r["tasks"]["completed"] == len(lines) == 51
    assert r["workers"]["total"] == 2
    assert sum(w["tasks"] for w in r["workers"]["per_worker"]) == 51
    assert all(w["tasks"] > 0 for w in r["workers"]["per_worker"])
    total_in = total_out = 0
    for line in lines:
        src = pyvips.Image.new_from_file(line["input"])
        image = pyvips.Image.new_from_file(line["output"])
        assert image.get("vips-loader") == "webpload"
        assert (image.width, image.height) == target_size(src.width, src.height, "longest", 1920)
        assert (image.width, image.height) == (line["width"], line["height"])
        image.avg()
        total_in += os.path.getsize(line["input"])
        total_out += os.path.getsize(line["output"])
    assert (r["bytes"]["in"], r["bytes"]["out"]) == (total_in, total_out)
    assert "Worker pool" in proc.stdout and "Finished/total:        51/51" in proc.stdout
