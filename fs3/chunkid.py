"""Chunk ids of files: chunk ``index`` of inode ``inode`` is ``inode << 24 | index`` (a 40-bit
inode, a 24-bit index). The one place the layout of a chunk id is written down; the chunk client,
the metadata service, the capability checks and the chunk store's per-file index all use it.
"""

from __future__ import annotations

__all__ = ["INDEX_BITS", "MAX_INDEX", "MAX_INODE", "file_chunk_id", "inode_of"]

INDEX_BITS = 24
MAX_INDEX = (1 << INDEX_BITS) - 1   # chunks per file: 2**24
MAX_INODE = (1 << 40) - 1


def file_chunk_id(inode: int, index: int) -> int:
    """The chunk id of chunk ``index`` of file ``inode``."""
    if not 0 <= inode <= MAX_INODE or not 0 <= index <= MAX_INDEX:
        raise ValueError(f"file_chunk_id: inode {inode} must be < 2**40 and index {index} < 2**24")
    return inode << INDEX_BITS | index


def inode_of(chunk: int) -> int:
    """The inode a chunk id belongs to."""
    return chunk >> INDEX_BITS
