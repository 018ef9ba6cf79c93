"""``python -m broker``: flags -> BrokerConfig -> run().

The batch flags are shared with launch.py, which validates them with the
same code and hands them on to the broker it starts.
"""

from __future__ import annotations

import argparse
import os
import sys

from broker import config as common
from broker.config import BrokerConfig
from broker.paths import is_within
from broker.settings import FORMATS, QUALITY_FORMATS, Settings, SettingsError, parse_resize


class UsageError(ValueError):
    """Bad command-line usage; the message is one line for the user."""


class OneLineParser(argparse.ArgumentParser):
    """Errors as a single line (no usage dump), exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_batch_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="image files or folders (recursive)")
    p.add_argument("-o", "--output", metavar="DIR", help="output folder (default: ./out)")
    p.add_argument("--jobs", metavar="FILE.jsonl", help="a batch file: one JSON job per line")
    p.add_argument("--format", choices=FORMATS, default="original", help="output format")
    p.add_argument("--quality", type=int, default=90, metavar="Q", help="quality 1-100; 100 = lossless")
    for fmt in QUALITY_FORMATS:
        p.add_argument(f"--quality-{fmt}", type=int, metavar="Q", help=f"quality for {fmt} output")
    p.add_argument("--png-compression", type=int, metavar="0-9",
                   help="zlib level for PNG output (default: 7, or 9 at quality 100)")
    p.add_argument("--resize", default="none", metavar="MODE:SIZE",
                   help="none | width:N | height:N | longest:N | shortest:N (never enlarges)")
    p.add_argument("--report-json", metavar="FILE", help="write the final report as JSON")
    p.add_argument("--results-jsonl", metavar="FILE", help="write one JSON line per job")
    p.add_argument("--log-dir", default="logs", metavar="DIR", help="JSON-lines logs (default: ./logs)")
    p.add_argument("--log-level", default="INFO", type=common.log_level, metavar="LEVEL",
                   help="stderr log level: DEBUG, INFO, WARNING, ERROR... (default: %(default)s)")
    p.add_argument("--max-pixels", type=int, default=BrokerConfig.max_pixels,
                   help="reject images declaring more pixels (default: %(default)s)")
    p.add_argument("--skip-existing", action="store_true", help="skip jobs whose output exists")
    p.add_argument("--max-attempts", type=int, default=BrokerConfig.max_attempts,
                   help="tries for a job whose worker dies or hangs (default: %(default)s)")
    p.add_argument("--job-timeout", type=float, default=BrokerConfig.job_timeout_s, metavar="S",
                   help="seconds one image may take (default: %(default)s)")
    p.add_argument("--max-image-mb", type=float, default=BrokerConfig.max_image_bytes / 1e6, metavar="MB",
                   help="refuse input files larger than this (default: %(default)g)")
    p.add_argument("--transport", choices=("path", "bytes"), default="path",
                   help="path: workers read and write the files (shared filesystem); "
                        "bytes: images travel in the messages and the broker writes outputs")


def add_broker_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--jobs-endpoint", default=common.DEFAULT_JOBS, type=common.endpoint, help="ROUTER: jobs to sidecars")
    p.add_argument("--results-endpoint", type=common.endpoint,
                   help="PULL: completions (default: the jobs port + 1, where sidecars look for it)")
    p.add_argument("--metrics-endpoint", type=common.endpoint,
                   help="PUB: progress, metrics (default: the jobs port + 2)")
    p.add_argument("--min-workers", type=int, default=1,
                   help="wait for this many workers before dispatching (default: 1)")
    p.add_argument("--ready-wait", type=float, default=BrokerConfig.ready_wait_s, metavar="S",
                   help="...but no longer than this after the first one (default: %(default)s)")
    p.add_argument("--heartbeat-timeout", type=float, default=BrokerConfig.heartbeat_timeout_s, metavar="S")
    p.add_argument("--no-worker-timeout", type=float, default=BrokerConfig.no_worker_timeout_s, metavar="S",
                   help="abort the batch when no worker has been alive this long (default: %(default)s)")
    p.add_argument("--grace", type=float, default=BrokerConfig.grace_s, metavar="S",
                   help="on SIGINT/SIGTERM, wait this long for jobs in flight (default: %(default)s)")
    p.add_argument("--linger", type=float, default=BrokerConfig.linger_s, metavar="S",
                   help="keep publishing the final report this long (default: %(default)s)")
    p.add_argument("--key", metavar="FILE", help="CURVE: the broker's secret key file (broker.key_secret)")
    p.add_argument("--authorized-keys", metavar="DIR", help="CURVE: folder of client public keys allowed in")
    p.add_argument("--insecure", action="store_true",
                   help="allow non-loopback endpoints without CURVE (only on a network you trust)")
    p.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)


def settings_from_args(args) -> Settings:
    try:
        return Settings(
            format=args.format,
            quality=args.quality,
            **{f"quality_{fmt}": getattr(args, f"quality_{fmt}") for fmt in QUALITY_FORMATS},
            **parse_resize(args.resize),
            png_compression=args.png_compression,
        )
    except SettingsError as exc:
        raise UsageError(str(exc)) from None


def batch_config_from_args(args) -> dict:
    """The BrokerConfig fields that launch.py and the broker share."""
    settings = settings_from_args(args)
    for path in args.inputs:
        if not os.path.exists(path):
            raise UsageError(f"input not found: {path}")
    if args.jobs and not os.path.isfile(args.jobs):
        raise UsageError(f"batch file not found: {args.jobs}")
    if not args.inputs and not args.jobs:
        raise UsageError("nothing to do: give INPUT files/folders or --jobs FILE")
    if args.max_pixels < 1 or args.max_attempts < 1 or args.job_timeout <= 0 or args.max_image_mb <= 0:
        raise UsageError("--max-pixels, --max-attempts, --job-timeout and --max-image-mb must be positive")
    if args.output and os.path.exists(args.output) and not os.path.isdir(args.output):
        raise UsageError(f"output folder is a file: {args.output}")
    output_root = os.path.realpath(args.output or "out")
    for path in args.inputs:
        if os.path.isdir(path) and is_within(os.path.realpath(path), output_root):
            # The walk leaves the output folder out (so outputs are never read
            # back as inputs): here that would leave out every image.
            where = "is" if os.path.realpath(path) == output_root else "is inside"
            raise UsageError(f"input folder {path} {where} the output folder {args.output or 'out'}: "
                             "its outputs would mix with its images; choose another -o")
    for flag, path in (("--report-json", args.report_json), ("--results-jsonl", args.results_jsonl)):
        if path:
            folder = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
                raise UsageError(f"{flag}: cannot write into folder {folder}")
    try:
        os.makedirs(args.log_dir, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--log-dir: cannot create {args.log_dir}: {exc.strerror}") from None
    if not os.access(args.log_dir, os.W_OK):
        raise UsageError(f"--log-dir: cannot write into {args.log_dir}")
    return dict(
        inputs=tuple(args.inputs),
        jobs_file=args.jobs,
        output_dir=args.output or "out",
        output_dir_given=args.output is not None,
        settings=settings,
        report_json=args.report_json,
        results_jsonl=args.results_jsonl,
        max_pixels=args.max_pixels,
        skip_existing=args.skip_existing,
        max_attempts=args.max_attempts,
        job_timeout_s=args.job_timeout,
        max_image_bytes=int(args.max_image_mb * 1e6),
        transport=args.transport,
    )


def _next_to_jobs(jobs_endpoint: str, offset: int) -> str:
    try:
        return common.derive_endpoint(jobs_endpoint, offset)
    except ValueError as exc:
        raise UsageError(f"{exc}; give --results-endpoint and --metrics-endpoint") from None


def config_from_args(args) -> BrokerConfig:
    for flag in ("ready_wait", "grace", "linger"):
        if getattr(args, flag) < 0:
            raise UsageError(f"--{flag.replace('_', '-')} cannot be negative")
    for flag in ("heartbeat_timeout", "no_worker_timeout"):
        if getattr(args, flag) <= 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be positive")
    if args.min_workers < 1:
        raise UsageError("--min-workers must be at least 1")
    return BrokerConfig(
        **batch_config_from_args(args),
        jobs_endpoint=args.jobs_endpoint,
        results_endpoint=args.results_endpoint or _next_to_jobs(args.jobs_endpoint, 1),
        metrics_endpoint=args.metrics_endpoint or _next_to_jobs(args.jobs_endpoint, 2),
        min_workers=args.min_workers,
        ready_wait_s=args.ready_wait,
        heartbeat_timeout_s=args.heartbeat_timeout,
        no_worker_timeout_s=args.no_worker_timeout,
        grace_s=args.grace,
        linger_s=args.linger,
        key_file=args.key,
        authorized_keys=args.authorized_keys,
        insecure=args.insecure,
    )


def batch_argv(args) -> list[str]:
    """The batch flags of ``args`` again, for ``python -m broker`` (inputs: input_argv)."""
    argv = []
    for name in ("output", "jobs", "format", "quality", *(f"quality_{f}" for f in QUALITY_FORMATS),
                 "resize", "png_compression", "report_json", "results_jsonl", "log_dir", "log_level", "max_pixels",
                 "max_attempts", "job_timeout", "max_image_mb", "transport"):
        value = getattr(args, name)
        if value is not None:
            # --name=value: a value that starts with "-" stays a value.
            argv.append(f"--{name.replace('_', '-')}={value}")
    if args.skip_existing:
        argv.append("--skip-existing")
    return argv


def input_argv(args) -> list[str]:
    """The inputs, last on a command line: after "--" no name can pass for a flag."""
    return ["--", *args.inputs] if args.inputs else []


def parse_inputs_anywhere(parser: argparse.ArgumentParser, argv: list[str] | None):
    """Options and INPUTs in any order (``a -o out b``); ``--`` still ends the
    options, which argparse's own intermixed parsing gets wrong."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--" not in argv:
        return parser.parse_intermixed_args(argv)
    cut = argv.index("--")
    args = parser.parse_intermixed_args(argv[:cut])
    args.inputs = [*args.inputs, *argv[cut + 1:]]
    return args


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m broker",
                      description="imgbus broker: ventilator + sink for one batch of images",
                      epilog="python -m broker keys DIR [--client NAME ...] makes CURVE key pairs")
    add_batch_arguments(p)
    add_broker_arguments(p)
    return p


def keys_main(argv: list[str]) -> int:
    """``python -m broker keys DIR``: CURVE key pairs for a broker and its clients."""
    p = OneLineParser(prog="python -m broker keys", description="make CURVE key pairs")
    p.add_argument("folder", metavar="DIR")
    p.add_argument("--client", action="append", metavar="NAME",
                   help="make a client key pair NAME (repeatable; default: sidecar and reporter)")
    args = p.parse_args(argv)
    from broker.security import make_keys

    clients = args.client or ["sidecar", "reporter"]
    made = make_keys(args.folder, clients)
    folder = args.folder.rstrip("/") or "/"
    print("\n".join(made))
    print(f"""
broker host:   python -m broker ... --key {folder}/broker.key_secret --authorized-keys {folder}/authorized
client hosts:  copy {folder}/broker.key and that client's NAME.key_secret, then
               python -m sidecar ... --key NAME.key_secret --broker-key broker.key
Secret files (*.key_secret) are readable by their owner only; keep them so.
To admit another client later: python -m broker keys {folder} --client NAME""")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["keys"]:
        return keys_main(argv[1:])
    parser = build_parser()
    args = parse_inputs_anywhere(parser, argv)
    try:
        config = config_from_args(args)
    except UsageError as exc:
        parser.error(str(exc))
    stop = common.StopFlag(args.parent_pid).install()  # first: a signal may come any moment
    common.setup_logging("broker", args.log_dir, args.log_level)
    from loguru import logger

    from broker.inputs import BatchFileError
    from broker.security import SecurityError
    from broker.server import CannotListen, run

    try:
        return run(config, stop)
    except (BatchFileError, SecurityError, CannotListen) as exc:
        logger.error(str(exc))
        return 2
    except Exception:
        logger.exception("broker failed")
        return 3
    finally:
        stop.settle()


if __name__ == "__main__":
    sys.exit(main())
