"""Data formats on fs3 (and on local files): FFRecord sample files (:mod:`fs3.formats.ffrecord`),
the torch Dataset over them (:mod:`fs3.formats.torch`, imported on its own: it needs torch), and the
storage seam both use (:mod:`fs3.formats.backend`). Checkpoints live in :mod:`fs3.checkpoint`.
"""

from .backend import Backend, Fs3Backend, LocalBackend, backend_for
from .ffrecord import ChecksumError, FileReader, FileWriter, write_samples

__all__ = ["Backend", "ChecksumError", "FileReader", "FileWriter", "Fs3Backend", "LocalBackend", "backend_for",
           "write_samples"]
