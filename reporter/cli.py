"""``python -m reporter``: flags -> ReporterConfig -> run()."""

from __future__ import annotations

import argparse

from loguru import logger

from broker import config as common
from broker.cli import OneLineParser
from broker.security import SecurityError, check_exposure, client_keys
from reporter.subscriber import ReporterConfig, run


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m reporter",
                      description="imgbus reporter: live progress and the console benchmark")
    p.add_argument("--connect", default=common.DEFAULT_METRICS, type=common.endpoint, metavar="ENDPOINT",
                   help="the broker's metrics endpoint (default: %(default)s)")
    p.add_argument("--report-json", metavar="FILE", help="also write the final snapshot as JSON")
    p.add_argument("--quiet", action="store_true", help="no live progress line")
    p.add_argument("--key", metavar="FILE", help="CURVE: this reporter's secret key file")
    p.add_argument("--broker-key", metavar="FILE", help="CURVE: the broker's public key file")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback broker without CURVE (only on a network you trust)")
    p.add_argument("--log-dir", default="logs", metavar="DIR")
    p.add_argument("--log-level", default="WARNING", type=common.log_level, metavar="LEVEL")
    p.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    common.setup_logging("reporter", args.log_dir, args.log_level)
    try:
        keys = client_keys(args.key, args.broker_key)
        if check_exposure([args.connect], keys, args.insecure) and keys is None:
            logger.warning("INSECURE: subscribing to {} without authentication or encryption", args.connect)
    except SecurityError as exc:
        parser.error(str(exc))
    stop = common.StopFlag(args.parent_pid).install()
    try:
        return run(ReporterConfig(args.connect, args.report_json, args.quiet, keys), stop)
    except Exception:
        logger.exception("reporter failed")
        return 3
    finally:
        stop.settle()
