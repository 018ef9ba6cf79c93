"""Side-by-side benchmark: imgbus against the tools users would pick instead.

    python bench/run.py [--rounds 3] [--workers 2] [--scenarios S0,S1,S2,S3] [--json bench.json]

Peers run interleaved (A B C A B C ...), on the same inputs, with the same
settings and the same number of processes; each is timed as a whole command
(start-up included). Every run's outputs are checked: same count, same
dimensions, so nobody wins by doing less. Scenarios:

  S0 bus        50 000 no-op jobs through the full pipeline (imgbus only)
  S1 recompress the 51 wallpapers, keep format, JPEG q80, PNG compression 6
  S2 web        the wallpapers, longest side <= 1920, WebP q80
  S3 thumbs     2000 small JPEGs derived from the wallpapers, longest <= 256, JPEG q80

Inputs: the wallpapers from ../shared/corpus/fetch-wallpapers.sh, cached in
$IMGBUS_CORPUS (default ~/.cache/imgbus/wallpapers); S3's images are derived
deterministically into ~/.cache/imgbus/thumbs-2000. Pillow and sharp are
optional: a missing peer is skipped with a note (pip install pillow; npm
install --prefix bench/peers).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import pyvips  # noqa: E402

from broker.settings import target_size  # noqa: E402

CACHE = os.path.expanduser("~/.cache/imgbus")
CORPUS = os.environ.get("IMGBUS_CORPUS", os.path.join(CACHE, "wallpapers"))
SHARED = os.environ.get("IMGBUS_SHARED", os.path.join(os.path.dirname(ROOT), "shared"))
PEERS = ("imgbus", "pyvips-pool", "pillow-pool", "sharp")

SCENARIOS = {
    "S1": {"title": "recompress", "format": None, "quality": 80, "resize": None},
    "S2": {"title": "web", "format": "webp", "quality": 80, "resize": 1920},
    "S3": {"title": "thumbs", "format": "jpeg", "quality": 80, "resize": 256},
}
PNG_COMPRESSION = 6
FORMAT_OF_LOADER = {"jpegload": "jpeg", "pngload": "png", "webpload": "webp"}
EXT = {"jpeg": ".jpg", "png": ".png", "webp": ".webp"}


# -- inputs ------------------------------------------------------------------
def ensure_corpus() -> list[str]:
    files = _images(CORPUS)
    if len(files) < 51:
        subprocess.run(["bash", os.path.join(SHARED, "corpus", "fetch-wallpapers.sh"), CORPUS], check=True)
        files = _images(CORPUS)
    return files


def ensure_thumbs(wallpapers: list[str], count: int = 2000, folder: str | None = None) -> list[str]:
    """Small JPEGs (400-640 px), derived the same way every time."""
    folder = folder or os.path.join(CACHE, f"thumbs-{count}")
    files = _images(folder)
    if len(files) >= count:
        return files[:count]
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        path = os.path.join(folder, f"t{i:04d}.jpg")
        if os.path.exists(path):
            continue
        longest = 400 + (i * 37) % 241
        src = pyvips.Image.thumbnail(wallpapers[i % len(wallpapers)], longest * 2)
        # A different crop of each wallpaper for each image.
        w, h = src.width * 3 // 4, src.height * 3 // 4
        x, y = (i * 53) % (src.width - w + 1), (i * 29) % (src.height - h + 1)
        crop = src.crop(x, y, w, h).thumbnail_image(longest)
        if crop.hasalpha():
            crop = crop.flatten(background=[255] * (crop.bands - 1))
        crop.colourspace("srgb").jpegsave(path, Q=88, keep="none")
    return _images(folder)[:count]


def _images(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                  if f.lower().endswith((".jpg", ".jpeg", ".png")))


def plan_tasks(files: list[str], scenario: dict, out_dir: str) -> list[dict]:
    tasks = []
    for path in files:
        head = pyvips.Image.new_from_file(path)
        fmt = scenario["format"] or FORMAT_OF_LOADER[head.get("vips-loader").removesuffix("_source")
                                                     .removesuffix("_file")]
        w, h = head.width, head.height
        if head.get_typeof("orientation") and head.get("orientation") in (5, 6, 7, 8):
            w, h = h, w
        if scenario["resize"]:
            w, h = target_size(w, h, "longest", scenario["resize"])
        name = os.path.splitext(os.path.basename(path))[0] + EXT[fmt]
        tasks.append({"input": path, "output": os.path.join(out_dir, name), "width": w, "height": h,
                      "format": fmt})
    return tasks


def compile_bytecode() -> None:
    """Compile imgbus's modules once, as Python does on a first import.

    With PYTHONDONTWRITEBYTECODE set, nothing would be cached and each of
    imgbus's processes would compile its modules again at every start, a cost
    no user pays twice (the peers' code is compiled in site-packages already).
    """
    import compileall

    for package in ("broker", "sidecar", "reporter"):
        compileall.compile_dir(os.path.join(ROOT, package), quiet=1)
    compileall.compile_file(os.path.join(ROOT, "launch.py"), quiet=1)


# -- peers -------------------------------------------------------------------
def available_peers() -> dict[str, str]:
    notes = {}
    try:
        import PIL  # noqa: F401
    except ImportError:
        notes["pillow-pool"] = "skipped: Pillow not installed (pip install pillow)"
    if not shutil.which("node"):
        notes["sharp"] = "skipped: node not found"
    elif not os.path.isdir(os.path.join(HERE, "peers", "node_modules", "sharp")):
        notes["sharp"] = "skipped: sharp not installed (npm install --prefix bench/peers)"
    return notes


def peer_command(peer: str, tasks_file: str, jobs_file: str, workers: int, scratch: str,
                 noop: bool = False) -> list[str]:
    if peer == "imgbus":
        cmd = [sys.executable, os.path.join(ROOT, "launch.py"), "--jobs", jobs_file, "--workers", str(workers),
               "--log-dir", os.path.join(scratch, "logs"), "--report-json", os.path.join(scratch, "report.json")]
        return cmd + (["--noop"] if noop else [])
    if peer == "pyvips-pool":
        return [sys.executable, os.path.join(HERE, "peers", "pyvips_pool.py"), tasks_file, str(workers)]
    if peer == "pillow-pool":
        return [sys.executable, os.path.join(HERE, "peers", "pillow_pool.py"), tasks_file, str(workers)]
    return ["node", os.path.join(HERE, "peers", "sharp_pool.js"), tasks_file, str(workers)]


def write_inputs(tasks: list[dict], scenario: dict, scratch: str) -> tuple[str, str]:
    settings = {"quality": scenario["quality"], "png_compression": PNG_COMPRESSION}
    tasks_file = os.path.join(scratch, "tasks.json")
    with open(tasks_file, "w") as f:
        json.dump({"settings": settings, "tasks": tasks}, f)
    jobs_file = os.path.join(scratch, "jobs.jsonl")
    job_settings = {"format": scenario["format"] or "original",
                    "quality": {"global": scenario["quality"], "png": 100},
                    "png_compression": PNG_COMPRESSION,
                    "resize": {"mode": "longest", "size": scenario["resize"]} if scenario["resize"] else None}
    with open(jobs_file, "w") as f:
        for t in tasks:
            f.write(json.dumps({"input": t["input"], "output": t["output"], "settings": job_settings}) + "\n")
    return tasks_file, jobs_file


def verify(tasks: list[dict]) -> str | None:
    """None when every output exists with the expected size, else what is wrong."""
    for t in tasks:
        if not os.path.isfile(t["output"]):
            return f"missing {t['output']}"
        image = pyvips.Image.new_from_file(t["output"])
        if (image.width, image.height) != (t["width"], t["height"]):
            return f"{t['output']}: {image.width}x{image.height}, expected {t['width']}x{t['height']}"
    return None


def run_once(cmd: list[str], scratch: str) -> float:
    env = {**os.environ, "PYTHONPATH": ROOT}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=scratch, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[1] if len(cmd) > 1 else cmd[0]} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return wall


# -- scenarios ---------------------------------------------------------------
def image_scenario(name: str, files: list[str], peers: list[str], rounds: int, workers: int) -> dict:
    scenario = SCENARIOS[name]
    in_bytes = sum(os.path.getsize(f) for f in files)
    walls = {p: [] for p in peers}
    out_bytes = {}
    plan = plan_tasks(files, scenario, "")
    with tempfile.TemporaryDirectory(prefix=f"imgbus-bench-{name}-") as scratch:
        for r in range(rounds):
            for peer in peers:
                out_dir = os.path.join(scratch, peer, "out")
                shutil.rmtree(os.path.join(scratch, peer), ignore_errors=True)
                os.makedirs(out_dir)
                tasks = [dict(t, output=os.path.join(out_dir, t["output"])) for t in plan]
                tasks_file, jobs_file = write_inputs(tasks, scenario, os.path.join(scratch, peer))
                wall = run_once(peer_command(peer, tasks_file, jobs_file, workers, os.path.join(scratch, peer)),
                                os.path.join(scratch, peer))
                problem = verify(tasks)
                if problem:
                    raise RuntimeError(f"{name} {peer}: {problem}")
                walls[peer].append(wall)
                out_bytes[peer] = sum(os.path.getsize(t["output"]) for t in tasks)
                print(f"  {name} round {r + 1} {peer:<12} {wall:7.2f} s", file=sys.stderr, flush=True)
    return _table(name, scenario["title"], len(files), in_bytes, walls, out_bytes)


def _table(name, title, n, in_bytes, walls, out_bytes) -> dict:
    rows = {}
    for peer, values in walls.items():
        median = statistics.median(values)
        rows[peer] = {"median_s": median, "runs_s": values, "images_per_s": n / median,
                      "input_mb_per_s": in_bytes / 1e6 / median, "out_over_in": out_bytes[peer] / in_bytes}
    base = rows["imgbus"]["images_per_s"]
    for row in rows.values():
        row["speed_vs_imgbus"] = row["images_per_s"] / base
    return {"scenario": name, "title": title, "images": n, "input_bytes": in_bytes, "peers": rows}


def memory_check(thumbs: list[str], wallpapers: list[str], workers: int) -> dict:
    """Peak RSS per worker on the wallpapers; RSS after 200 thumbnails vs near the end."""
    result = {}
    with tempfile.TemporaryDirectory(prefix="imgbus-bench-mem-") as scratch:
        report = os.path.join(scratch, "r.json")
        run_once([sys.executable, os.path.join(ROOT, "launch.py"), os.path.dirname(wallpapers[0]),
                  "-o", os.path.join(scratch, "wp"), "--workers", str(workers), "--format", "webp",
                  "--resize", "longest:1920", "--report-json", report, "--log-dir", os.path.join(scratch, "logs")],
                 scratch)
        result["peak_rss_mb_wallpapers"] = max(w["peak_rss_mb"] for w in json.load(open(report))["workers"]["per_worker"])
        results = os.path.join(scratch, "res.jsonl")
        cmd = [sys.executable, os.path.join(ROOT, "launch.py"), os.path.dirname(thumbs[0]), "-o",
               os.path.join(scratch, "th"), "--workers", str(workers), "--format", "jpeg", "--quality", "80",
               "--resize", "longest:256", "--results-jsonl", results, "--log-dir", os.path.join(scratch, "logs")]
        proc = subprocess.Popen(cmd, cwd=scratch, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, "PYTHONPATH": ROOT})
        samples, marks = {}, [200, len(thumbs) - 50]
        while proc.poll() is None and marks:
            done = _count_lines(results)
            if done >= marks[0]:
                samples[marks.pop(0)] = _sidecar_rss(proc.pid)
            time.sleep(0.01)
        proc.wait()
    if len(samples) == 2:
        (n1, early), (n2, late) = sorted(samples.items())
        result.update({"rss_mb_after": {str(n1): early, str(n2): late},
                       "creep_pct": max(100 * (late[i] - early[i]) / early[i] for i in range(min(len(early), len(late))))})
    return result


def _count_lines(path: str) -> int:
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except OSError:
        return 0


def _sidecar_rss(launcher_pid: int) -> list[float]:
    """Resident MB of the launcher's sidecar processes, from /proc."""
    found = []
    for entry in sorted(os.listdir("/proc")):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/comm") as f:
                name = f.read().strip()
            if parent != launcher_pid or name != "imgbus-sidecar":
                continue
            for line in open(f"/proc/{entry}/status"):
                if line.startswith("VmRSS:"):
                    found.append(int(line.split()[1]) / 1024)
        except OSError:
            continue
    return found


def bus_scenario(jobs: int, rounds: int, workers: int) -> dict:
    runs = []
    with tempfile.TemporaryDirectory(prefix="imgbus-bench-S0-") as scratch:
        jobs_file = os.path.join(scratch, "jobs.jsonl")
        with open(jobs_file, "w") as f:
            for i in range(jobs):
                f.write(f'{{"input": "{scratch}/in/{i}.jpg", "output": "{scratch}/out/{i}.jpg"}}\n')
        for r in range(rounds):
            wall = run_once(peer_command("imgbus", "", jobs_file, workers, scratch, noop=True), scratch)
            report = json.load(open(os.path.join(scratch, "report.json")))
            assert report["tasks"]["completed"] == jobs, report["tasks"]
            runs.append({"wall_s": wall, "pipeline_s": report["duration_s"]})
            print(f"  S0 round {r + 1} imgbus {jobs / report['duration_s']:9.0f} jobs/s", file=sys.stderr)
    pipeline = statistics.median(r["pipeline_s"] for r in runs)
    return {"scenario": "S0", "title": "bus", "jobs": jobs, "runs": runs, "pipeline_median_s": pipeline,
            "jobs_per_s": jobs / pipeline, "us_per_job": pipeline / jobs * 1e6,
            "wall_median_s": statistics.median(r["wall_s"] for r in runs)}


# -- output ------------------------------------------------------------------
def print_table(result: dict) -> None:
    if result["scenario"] == "memory":
        print(f"\nmemory: peak RSS per worker on the wallpapers {result['peak_rss_mb_wallpapers']:.0f} MB"
              f" (target < 300)")
        if "creep_pct" in result:
            print(f"  RSS per worker after {' and '.join(result['rss_mb_after'])} thumbnails: "
                  f"{result['rss_mb_after']} MB -> creep {result['creep_pct']:+.1f}% (target within 10%)")
        return
    if result["scenario"] == "S0":
        print(f"\nS0 bus: {result['jobs']} no-op jobs, median of {len(result['runs'])}")
        print(f"  pipeline {result['pipeline_median_s']:.2f} s = {result['jobs_per_s']:,.0f} jobs/s "
              f"= {result['us_per_job']:.1f} us/job   (whole command, start-up included: "
              f"{result['wall_median_s']:.2f} s)")
        return
    print(f"\n{result['scenario']} {result['title']}: {result['images']} images, "
          f"{result['input_bytes'] / 1e6:.1f} MB in")
    print(f"  {'peer':<12} {'median s':>9} {'img/s':>8} {'MB/s in':>8} {'out/in':>7} {'speed vs imgbus':>16}")
    for peer, row in result["peers"].items():
        print(f"  {peer:<12} {row['median_s']:>9.2f} {row['images_per_s']:>8.1f} {row['input_mb_per_s']:>8.2f} "
              f"{row['out_over_in']:>7.3f} {row['speed_vs_imgbus']:>16.2f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--scenarios", default="S0,S1,S2,S3,memory")
    ap.add_argument("--bus-jobs", type=int, default=50_000)
    ap.add_argument("--thumbs", type=int, default=2000)
    ap.add_argument("--limit", type=int, help="use only the first N images of each scenario (smoke runs)")
    ap.add_argument("--json", default="bench-results.json", help="write the tables here")
    args = ap.parse_args(argv)

    compile_bytecode()
    notes = available_peers()
    peers = [p for p in PEERS if p not in notes]
    for peer, note in notes.items():
        print(f"note: {peer} {note}")
    results = []
    wanted = [s.strip() for s in args.scenarios.split(",")]
    wallpapers = ensure_corpus() if {"S1", "S2", "S3", "memory"} & set(wanted) else []
    for name in wanted:
        print(f"{name}...", file=sys.stderr, flush=True)
        if name == "S0":
            results.append(bus_scenario(args.bus_jobs, args.rounds, args.workers))
        elif name == "memory":
            results.append({"scenario": "memory", **memory_check(ensure_thumbs(wallpapers, args.thumbs),
                                                                 wallpapers, args.workers)})
        else:
            files = ensure_thumbs(wallpapers, args.thumbs) if name == "S3" else wallpapers
            results.append(image_scenario(name, files[: args.limit], peers, args.rounds, args.workers))
        print_table(results[-1])
    with open(args.json, "w") as f:
        json.dump({"workers": args.workers, "rounds": args.rounds, "notes": notes, "results": results}, f, indent=2)
    print(f"\ntables written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
