"""fs3.fuse: the fs3 FUSE mount (pyfuse3 + trio).

    fs3 mount MOUNTPOINT [-c FILE] [-o key=value ...]     (fs3.cli, calls run_mount)
    python -m fs3.fuse MOUNTPOINT --cluster FILE [-o ...] [--daemon]
    fs3 umount MOUNTPOINT                                 (calls unmount)

Modules, one concept each: ``options`` (mount options, FUSE options, kernel readahead tuning),
``mount`` (start, daemon, signals, unmount), ``ops`` (the pyfuse3 Operations over MetaClient and
FileData), ``handles`` (per-inode and per-open state), ``wbuf`` (per-inode write buffers),
``readahead`` (per-inode prefetch of whole chunks). See docs/fs3-files.md, "The FUSE mount".
"""

from .mount import MountError, pid_file, run_mount, unavailable, unmount
from .options import MountOptions

__all__ = ["MountError", "MountOptions", "pid_file", "run_mount", "unavailable", "unmount"]
