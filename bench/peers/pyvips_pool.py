"""Peer: pyvips in a multiprocessing.Pool, one image per task.

usage: pyvips_pool.py TASKS.json PROCS
TASKS.json: {"settings": {...}, "tasks": [{"input", "output", "width", "height", "format"}, ...]}
"""

import json
import os
import sys
from multiprocessing import get_context


def init(threads):
    os.environ["VIPS_CONCURRENCY"] = str(threads)
    global pyvips
    import pyvips
    pyvips.cache_set_max(0)


def work(args):
    task, settings = args
    fmt, q = task["format"], settings["quality"]
    src = pyvips.Image.new_from_file(task["input"], access="sequential")
    if (task["width"], task["height"]) != _upright(src):
        image = pyvips.Image.thumbnail(task["input"], task["width"], height=task["height"], size="force")
    else:
        image = src.autorot()
    if image.hasalpha() and fmt == "jpeg":
        image = image.flatten(background=[255] * (image.bands - 1))
    if fmt == "jpeg":
        image.jpegsave(task["output"], Q=q, optimize_coding=True, subsample_mode="on", keep="none")
    elif fmt == "png":
        image.pngsave(task["output"], compression=settings["png_compression"], keep="none")
    elif fmt == "webp":
        image.webpsave(task["output"], Q=q, effort=4, keep="none")
    return task["output"]


def _upright(image):
    orientation = image.get("orientation") if image.get_typeof("orientation") else 1
    return (image.height, image.width) if orientation in (5, 6, 7, 8) else (image.width, image.height)


def main():
    spec = json.load(open(sys.argv[1]))
    procs = int(sys.argv[2])
    threads = max(1, (os.cpu_count() or 1) // procs)
    with get_context("spawn").Pool(procs, initializer=init, initargs=(threads,)) as pool:
        for _ in pool.imap_unordered(work, [(t, spec["settings"]) for t in spec["tasks"]]):
            pass


if __name__ == "__main__":
    main()
