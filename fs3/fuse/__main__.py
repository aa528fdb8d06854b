"""``python -m fs3.fuse MOUNTPOINT --cluster FILE [-o key=value ...] [--daemon]``: mount fs3.

In the foreground by default (logs to stderr, or to ``-o log=FILE``); SIGTERM or SIGINT unmounts
and exits 0. ``--daemon`` starts a daemon and returns once the mount is up. The options are
those of :mod:`fs3.fuse.options`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..errors import Fs3Error


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fs3.fuse", description="Mount fs3 with FUSE.")
    p.add_argument("mountpoint", type=Path)
    p.add_argument("--cluster", "-c", type=Path, required=True, help="cluster description (TOML)")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="KEY=VALUE",
                   help="mount option (fs3.fuse.options), repeatable; comma-separated lists too")
    p.add_argument("--daemon", action="store_true", help="run in the background once mounted")
    p.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    from .mount import _check_mountpoint, _serve_here, run_mount
    from .options import MountOptions, parse_option_args

    options = parse_option_args(a.options)

    try:
        opts = MountOptions.from_dict(options)
        if a.daemon:
            return run_mount(a.cluster, a.mountpoint, foreground=False, options=options)
        handlers: list[logging.Handler] = [logging.FileHandler(opts.log) if opts.log else logging.StreamHandler()]
        logging.basicConfig(level=logging.DEBUG if opts.debug else logging.INFO, handlers=handlers,
                            format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")
        mp = _check_mountpoint(a.mountpoint)
        return _serve_here(a.cluster, mp, opts, ready_fd=a.ready_fd)
    except Fs3Error as exc:
        logging.getLogger("fs3.fuse").error("%s", exc)
        print(f"fs3 mount: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
