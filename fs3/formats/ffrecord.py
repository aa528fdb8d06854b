"""FFRecord files as HFAiLab/ffrecord writes them, on local files or on fs3.

Layout (all integers little-endian, which is the native order of the x86 machines ffrecord writes
on; this module packs with ``<`` explicitly so it reads the same files on any host)::

    offset 0          u32  checksum_meta   zlib CRC32 of the bytes of N, crc32[] and offsets[]
                                           (0 = a file from an old writer: not checked)
    offset 4          i64  N               number of samples
    offset 12         u32  crc32[N]        zlib CRC32 of each sample's bytes
    offset 12 + 4N    i64  offsets[N]      absolute offset of each sample
    offset 12 + 12N   the samples, back to back: sample i ends where sample i+1 starts, the last
                      one at the end of the file

ffrecord's writer (src/writer.cpp) computes checksum_meta as ``crc32(crc32(crc32(0, &N, 8),
checksums, 4N), offsets, 8N)`` with zlib, i.e. one CRC32 over those bytes in that order, and
writes it last, at offset 0.

A reader opens one file, a list of files, or a directory (its ``*.ffr`` files, sorted by name),
as one index space: index i of the reader is sample ``i - start(f)`` of the file f that holds it.
A batch of indices is read with one batched read (``FileSystem.read_batch`` on fs3; threads
doing ``pread`` on local files, like ffrecord's libaio batch).
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from ..errors import Fs3Error
from .backend import Backend, backend_for

log = logging.getLogger(__name__)

_HEAD = struct.Struct("<Iq")  # checksum_meta, N
HEAD_SIZE = _HEAD.size  # 12
SUFFIX = ".ffr"


class ChecksumError(Fs3Error, ValueError):
    """Stored data does not match its checksum (or a header is inconsistent): the message names
    the file and the sample or the header. The file is damaged: rewrite it from its source."""


def header_size(n: int) -> int:
    """Bytes before the first sample of a file of ``n`` samples."""
    return HEAD_SIZE + 12 * n


def _meta_crc(n: int, meta: bytes | memoryview) -> int:
    """checksum_meta: the CRC32 of N (8 bytes) followed by the index (crc32[N] then offsets[N])."""
    return zlib.crc32(meta, zlib.crc32(struct.pack("<q", n)))


def _check_meta_crc(path: str, n: int, stored: int, meta: bytes | memoryview) -> None:
    """Raise ChecksumError when the index of ``path`` does not match its stored checksum_meta."""
    crc = _meta_crc(n, meta)
    if crc != stored:
        raise ChecksumError(f"FFRecord file {path}: header checksum mismatch (stored {stored:#010x}, "
                            f"computed {crc:#010x}): the header is damaged; rewrite the file")


def build_header(checksums: np.ndarray, offsets: np.ndarray) -> bytes:
    """The header bytes of a file with these per-sample CRC32s and absolute offsets."""
    n = len(checksums)
    meta = np.asarray(checksums, "<u4").tobytes() + np.asarray(offsets, "<i8").tobytes()
    return _HEAD.pack(_meta_crc(n, meta), n) + meta


class FileWriter:
    """Write ``n`` samples to an FFRecord file: ``write_one(data)`` n times, then ``close()``
    (writes the header, then the metadata checksum at offset 0). A context manager; leaving the
    block with an exception does not write a header (the file is left unusable, not wrong)."""

    def __init__(self, path: str | os.PathLike, n: int, fs: Any = None) -> None:
        if n < 0:
            raise ValueError(f"FFRecord file {path}: the number of samples must be >= 0, not {n}")
        self.path = os.fspath(path)
        self.n = int(n)
        self.count = 0
        self._backend: Backend = backend_for(fs)
        self._own_backend = not isinstance(fs, Backend)  # made here (with any FileSystem it made)
        self._checksums = np.zeros(self.n, "<u4")
        self._offsets = np.zeros(self.n, "<i8")
        self._pos = header_size(self.n)
        self._f = self._backend.open_write(self.path)
        self._f.seek(self._pos)

    def write_one(self, data: bytes | bytearray | memoryview) -> None:
        """Append one sample."""
        if self._f is None:
            raise ValueError(f"FFRecord file {self.path}: write_one after close")
        if self.count >= self.n:
            raise ValueError(f"FFRecord file {self.path}: more samples than the {self.n} announced "
                             f"to FileWriter(path, n); create the writer with the right count")
        mv = memoryview(data).cast("B")
        self._checksums[self.count] = zlib.crc32(mv)
        self._offsets[self.count] = self._pos
        self._f.write(mv)
        self._pos += len(mv)
        self.count += 1

    def close(self) -> None:
        """Write the header (checksums, offsets, metadata checksum) and close the file. Refuses
        (and closes the file without a header) when fewer samples than announced were written."""
        if self._f is None:
            return
        f, self._f = self._f, None
        try:
            if self.count != self.n:
                raise ValueError(f"FFRecord file {self.path}: {self.count} samples written but {self.n} "
                                 f"announced to FileWriter(path, n); the file has no header and is unusable")
            f.seek(0)
            f.write(build_header(self._checksums, self._offsets))
            self._backend.sync(f)
        finally:
            try:
                f.close()
            finally:
                self._release()

    def _abort(self) -> None:
        if self._f is not None:
            f, self._f = self._f, None
            try:
                f.close()
            finally:
                self._release()

    def _release(self) -> None:
        if self._own_backend:
            self._backend.close()

    def __enter__(self) -> FileWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abort()


def write_samples(path: str | os.PathLike, samples: Sequence[bytes], fs: Any = None) -> None:
    """Write ``samples`` (bytes-like) as one FFRecord file."""
    with FileWriter(path, len(samples), fs=fs) as w:
        for s in samples:
            w.write_one(s)


class _FileHeader:
    """The parsed header of one file: ``checksums`` (N) and ``offsets`` (N + 1, the last = size)."""

    __slots__ = ("path", "n", "checksum_meta", "checksums", "offsets")

    def __init__(self, path: str, head: bytes, meta: bytes | None, size: int, check_data: bool) -> None:
        self.path = path
        if len(head) < HEAD_SIZE:
            raise ChecksumError(f"FFRecord file {path}: header is damaged or the file is not an FFRecord "
                                f"file ({size} bytes, shorter than the {HEAD_SIZE}-byte header)")
        self.checksum_meta, self.n = _HEAD.unpack(bytes(head[:HEAD_SIZE]))
        n = self.n
        if meta is None:
            return  # first pass: N only
        if len(meta) != 12 * n:
            raise ChecksumError(f"FFRecord file {path}: header is damaged: it announces {n} samples but "
                                f"the file ends inside the index")
        if check_data and self.checksum_meta != 0:
            _check_meta_crc(path, n, self.checksum_meta, meta)
        self.checksums = np.frombuffer(meta, "<u4", n, 0)
        offs = np.empty(n + 1, np.int64)
        offs[:n] = np.frombuffer(meta, "<i8", n, 4 * n)
        offs[n] = size
        if n and (offs[0] < header_size(n) or np.any(np.diff(offs) < 0)):
            raise ChecksumError(f"FFRecord file {path}: header is damaged: the sample offsets are not increasing "
                                f"within [{header_size(n)}, {size}]")
        self.offsets = offs

    def check_counts(self, size: int) -> None:
        if self.n < 0 or header_size(self.n) > size:
            raise ChecksumError(f"FFRecord file {self.path}: header is damaged: it announces {self.n} samples, "
                                f"whose index does not fit in the file's {size} bytes")


def _expand(path: Any, backend: Backend) -> list[str]:
    if isinstance(path, (list, tuple)):
        out: list[str] = []
        for p in path:
            out.extend(_expand(p, backend))
        return out
    p = os.fspath(path)
    if backend.isdir(p):
        names = sorted(x for x in backend.listdir(p) if x.endswith(SUFFIX))
        if not names:
            raise FileNotFoundError(f"no {SUFFIX} files in the directory {p} ({backend.name} files)")
        return [backend.join(p, x) for x in names]
    return [p]


class FileReader:
    """Read samples of one FFRecord file, a list of files, or a directory of ``*.ffr`` files.

    ``check_data``: verify the header checksum at open and each sample's CRC32 on read (a mismatch
    raises :class:`ChecksumError` naming the file and the sample). ``fs``: None for local files,
    an ``fs3.FileSystem`` (or a factory of one) for fs3 paths.

    A reader may be pickled (a DataLoader with the spawn start method) and survives a fork: it
    keeps the parsed headers and reopens its files/connections in the new process."""

    def __init__(self, path: str | os.PathLike | Sequence[str | os.PathLike], check_data: bool = True,
                 fs: Any = None) -> None:
        self._backend = backend_for(fs)
        self.check_data = check_data
        self.paths = _expand(path, self._backend)
        self.headers = self._read_headers(self.paths)
        self.nsamples = np.zeros(len(self.headers) + 1, np.int64)
        np.cumsum([h.n for h in self.headers], out=self.nsamples[1:])
        self.n = int(self.nsamples[-1])

    def _read_headers(self, paths: list[str]) -> list[_FileHeader]:
        b = self._backend
        sizes = [b.size(p) for p in paths]
        heads = b.read_ranges([(p, 0, HEAD_SIZE) for p in paths])
        firsts = []
        for p, head, size in zip(paths, heads, sizes, strict=True):
            h = _FileHeader(p, bytes(head), None, size, self.check_data)
            h.check_counts(size)
            firsts.append(h)
        metas = b.read_ranges([(p, HEAD_SIZE, 12 * h.n) for p, h in zip(paths, firsts, strict=True)])
        return [_FileHeader(p, bytes(head), bytes(meta), size, self.check_data)
                for p, head, meta, size in zip(paths, heads, metas, sizes, strict=True)]

    def __len__(self) -> int:
        return self.n

    def _locate(self, indices: Iterable[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        idx = np.fromiter((int(i) for i in indices), np.int64)
        bad = (idx < -self.n) | (idx >= self.n)
        if bad.any():
            raise IndexError(f"FFRecord index {int(idx[bad][0])} out of range for {self.n} samples ({self._where()})")
        idx = np.where(idx < 0, idx + self.n, idx)
        fid = np.searchsorted(self.nsamples, idx, side="right") - 1
        return idx, fid, idx - self.nsamples[fid]

    def _where(self) -> str:
        return self.paths[0] if len(self.paths) == 1 else f"{len(self.paths)} files from {self.paths[0]}"

    def read(self, indices: Iterable[int]) -> list[bytes]:
        """The samples at ``indices`` (global), in that order, with one batched read."""
        idx, fid, local = self._locate(indices)
        if len(idx) == 0:
            return []
        ranges = []
        for f, i in zip(fid.tolist(), local.tolist(), strict=True):
            h = self.headers[f]
            off = int(h.offsets[i])
            ranges.append((h.path, off, int(h.offsets[i + 1]) - off))
        datas = self._backend.for_this_process().read_ranges(ranges)
        out: list[bytes] = []
        for k, data in enumerate(datas):
            path, off, length = ranges[k]
            f, i = int(fid[k]), int(local[k])
            if len(data) != length:
                raise ChecksumError(f"FFRecord file {path}: sample {i} (index {int(idx[k])}) read {len(data)} of "
                                    f"{length} bytes at offset {off}: the file is truncated or changed since open")
            if self.check_data:
                crc = zlib.crc32(data)
                want = int(self.headers[f].checksums[i])
                if crc != want:
                    raise ChecksumError(f"FFRecord file {path}: sample {i} (index {int(idx[k])}) checksum mismatch "
                                        f"(stored {want:#010x}, read {crc:#010x}): the sample is damaged; rewrite "
                                        f"the file, or pass check_data=False to read it anyway")
            out.append(data if isinstance(data, bytes) else bytes(data))
        return out

    def read_one(self, index: int) -> bytes:
        return self.read([index])[0]

    def validate(self) -> None:
        """Check every header checksum and every sample's CRC32 (reads everything, in batches)."""
        for h in self.headers:
            if h.checksum_meta != 0:
                meta = self._backend.read_ranges([(h.path, HEAD_SIZE, 12 * h.n)])[0]
                _check_meta_crc(h.path, h.n, h.checksum_meta, meta)
        saved, self.check_data = self.check_data, True
        try:
            step = 1024
            for start in range(0, self.n, step):
                self.read(range(start, min(self.n, start + step)))
        finally:
            self.check_data = saved

    def get_offsets(self) -> list[np.ndarray]:
        """Per file: the absolute sample offsets, N + 1 of them (the last is the file size)."""
        return [h.offsets.copy() for h in self.headers]

    def get_checksums(self) -> list[np.ndarray]:
        """Per file: the stored CRC32 of each sample."""
        return [np.array(h.checksums, np.uint32) for h in self.headers]

    def close(self) -> None:
        self._backend.close()

    def __enter__(self) -> FileReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FileReader({self._where()}, n={self.n}, {self._backend.name})"
