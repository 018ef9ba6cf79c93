"""The benchmark runs (a smoke test on a handful of images; timings are not checked here)."""

import json
import os
import subprocess
import sys

from conftest import ROOT


def test_benchmark_smoke(corpus, tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "run.py"), "--rounds", "1", "--limit", "3",
                           "--thumbs", "12", "--bus-jobs", "300", "--scenarios", "S0,S1,S3", "--json", out],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "IMGBUS_CORPUS": corpus, "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = {r["scenario"]: r for r in json.loads(out.read_text())["results"]}
    assert results["S0"]["jobs"] == 300 and results["S0"]["jobs_per_s"] > 0
    for name in ("S1", "S3"):
        peers = results[name]["peers"]
        assert peers["imgbus"]["speed_vs_imgbus"] == 1.0
        assert "pyvips-pool" in peers and all(p["images_per_s"] > 0 for p in peers.values())
    assert "speed vs imgbus" in proc.stdout
