"""Peer: Pillow in a multiprocessing.Pool, one image per task.

usage: pillow_pool.py TASKS.json PROCS   (same TASKS.json as pyvips_pool.py)
"""

import json
import sys
from multiprocessing import get_context

from PIL import Image, ImageOps


def work(args):
    task, settings = args
    fmt, q, size = task["format"], settings["quality"], (task["width"], task["height"])
    with Image.open(task["input"]) as im:
        if im.format == "JPEG" and size != im.size:
            # DCT scaling, like shrink-on-load; leave a factor of two for the resample.
            im.draft("RGB", (size[0] * 2, size[1] * 2))
        im = ImageOps.exif_transpose(im)
        if im.size != size:
            im = im.resize(size, Image.LANCZOS, reducing_gap=3.0)
        if fmt == "jpeg":
            if im.mode in ("RGBA", "LA", "P"):
                im = im.convert("RGBA")
                background = Image.new("RGB", im.size, (255, 255, 255))
                background.paste(im, mask=im.getchannel("A"))
                im = background
            elif im.mode != "RGB":
                im = im.convert("RGB")
            im.save(task["output"], "JPEG", quality=q, optimize=True, subsampling=2)
        elif fmt == "png":
            im.save(task["output"], "PNG", compress_level=settings["png_compression"])
        elif fmt == "webp":
            im.save(task["output"], "WEBP", quality=q, method=4)
    return task["output"]


def main():
    spec = json.load(open(sys.argv[1]))
    procs = int(sys.argv[2])
    with get_context("spawn").Pool(procs) as pool:
        for _ in pool.imap_unordered(work, [(t, spec["settings"]) for t in spec["tasks"]]):
            pass


if __name__ == "__main__":
    main()
