"""``python -m sidecar``: flags -> WorkerConfig -> run()."""

from __future__ import annotations

import argparse
import ctypes
import os

from broker import config as common
from broker.cli import OneLineParser


# Fewer malloc arenas: libvips' threads would otherwise each keep their own
# pool of freed image memory (measured: peak RSS well past 300 MB).
MALLOC_ARENAS = 2
M_ARENA_MAX = -8  # glibc's mallopt() parameter


def limit_malloc_arenas(arenas: int) -> None:
    """As MALLOC_ARENA_MAX would, unless the user set that; before any thread starts."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    try:
        ctypes.CDLL(None).mallopt(M_ARENA_MAX, arenas)
    except (OSError, AttributeError):
        pass  # not glibc: its allocator has its own ways


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m sidecar", description="imgbus sidecar: an image worker")
    p.add_argument("--connect", default=common.DEFAULT_JOBS, type=common.endpoint, metavar="ENDPOINT",
                   help="the broker's jobs endpoint (default: %(default)s)")
    p.add_argument("--results", type=common.endpoint, metavar="ENDPOINT",
                   help="the broker's results endpoint (default: the jobs port + 1)")
    p.add_argument("--credit", type=int, default=2,
                   help="jobs this worker may hold at once, running and queued (default: 2)")
    p.add_argument("--job-timeout", type=float, default=120.0, metavar="S",
                   help="exit (and let the job be retried) when one image takes longer")
    p.add_argument("--vips-threads", type=int, default=1,
                   help="libvips threads in this worker (default: 1; workers x threads ~ cores)")
    p.add_argument("--input-root", action="append", metavar="DIR",
                   help="read images only under DIR (repeatable; default: the current folder)")
    p.add_argument("--output-root", action="append", metavar="DIR",
                   help="write outputs only under DIR (repeatable; default: the current folder)")
    p.add_argument("--max-image-mb", type=float, default=100.0, metavar="MB",
                   help="largest image message accepted (bytes transport; default: %(default)g)")
    p.add_argument("--key", metavar="FILE", help="CURVE: this worker's secret key file")
    p.add_argument("--broker-key", metavar="FILE", help="CURVE: the broker's public key file")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback broker without CURVE (only on a network you trust)")
    p.add_argument("--cpus", metavar="LIST",
                   help="run only on these CPUs, e.g. 0 or 2-3 (the launcher gives each worker its own)")
    p.add_argument("--noop", action="store_true",
                   help="benchmark mode: acknowledge jobs without touching any file")
    p.add_argument("--log-dir", default="logs", metavar="DIR")
    p.add_argument("--log-level", default="INFO", type=common.log_level, metavar="LEVEL")
    p.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.credit < 1 or args.vips_threads < 1 or args.job_timeout <= 0:
        parser.error("--credit, --vips-threads and --job-timeout must be positive")
    stop = common.StopFlag(args.parent_pid).install()  # first: a signal may come any moment
    if args.cpus is not None:
        # Before any thread exists (libvips', libzmq's, the heartbeat): threads
        # take their CPUs from the thread that starts them.
        try:
            os.sched_setaffinity(0, common.parse_cpus(args.cpus))
        except (ValueError, OSError) as exc:
            parser.error(f"--cpus {args.cpus}: {exc}")
    # libvips reads this once, when it starts: before the first pyvips import.
    os.environ["VIPS_CONCURRENCY"] = str(args.vips_threads)
    limit_malloc_arenas(MALLOC_ARENAS)
    from loguru import logger

    from broker.security import SecurityError, check_exposure, client_keys
    from sidecar.worker import WorkerConfig, run

    worker_id = common.worker_id()
    common.setup_logging("sidecar", args.log_dir, args.log_level, worker_id=worker_id)
    try:
        results = args.results or common.derive_endpoint(args.connect, 1)
        keys = client_keys(args.key, args.broker_key)
        if check_exposure([args.connect, results], keys, args.insecure) and keys is None:
            logger.warning("INSECURE: talking to {} without authentication or encryption", args.connect)
    except (ValueError, SecurityError) as exc:
        parser.error(str(exc))
    config = WorkerConfig(worker_id, args.connect, results, credit=args.credit,
                          job_timeout_s=args.job_timeout, noop=args.noop,
                          input_roots=tuple(args.input_root or [os.getcwd()]),
                          output_roots=tuple(args.output_root or [os.getcwd()]),
                          keys=keys, max_image_bytes=int(args.max_image_mb * 1e6),
                          failure_level="INFO" if args.parent_pid else "WARNING")
    try:
        return run(config, stop)
    except Exception:
        logger.exception("worker failed")
        return 3
    finally:
        stop.settle()
