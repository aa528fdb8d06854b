"""What every service's ``main`` shares: ``--cluster FILE --node NAME``, logging, and shutdown on signal.

A service module ends with::

    def main(argv=None):
        ap = service_parser("fs3.mgmtd", "the fs3 cluster manager")
        ap.add_argument(...)                         # its own options
        args, cluster, node = parse_service_args(ap, argv)
        server = ...start...
        wait_for_shutdown()                          # SIGTERM / SIGINT
        server.stop()
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from .errors import ClusterFileError
from .topology import Cluster, Node, load_cluster

__all__ = ["service_parser", "parse_service_args", "wait_for_shutdown", "shutdown_event"]

shutdown_event = threading.Event()


def service_parser(prog: str, description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=f"python -m {prog}", description=description)
    ap.add_argument("--cluster", required=True, help="cluster description (TOML)")
    ap.add_argument("--node", required=True, help="this node's name in the cluster description")
    ap.add_argument("--log-level", default="INFO", help="logging level (default: %(default)s)")
    return ap


def parse_service_args(ap: argparse.ArgumentParser, argv: list[str] | None = None
                       ) -> tuple[argparse.Namespace, Cluster, Node]:
    """Parse, load the cluster, find this node; exits with a one-line error on bad input."""
    args = ap.parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format=f"%(asctime)s {ap.prog.split()[-1]}@{args.node} %(levelname)s %(message)s")
    try:
        cluster = load_cluster(args.cluster)
        node = cluster.node(args.node)
    except (ClusterFileError, KeyError) as exc:
        ap.exit(2, f"{ap.prog}: error: {exc}\n")
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: shutdown_event.set())
    return args, cluster, node


def wait_for_shutdown(poll: float = 0.5) -> None:
    """Block the main thread until SIGTERM or SIGINT (or ``shutdown_event.set()``)."""
    while not shutdown_event.wait(poll):
        pass
    logging.getLogger(__name__).info("shutting down")
    sys.stdout.flush()
