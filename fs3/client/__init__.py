"""fs3 clients: :mod:`fs3.client.chunks` reads and writes chunks by (chain, chunk id);
:mod:`fs3.client.filedata` reads and writes byte ranges of files over their chunks."""

from .chunks import ChunkClient, ReadIO, WriteIO, WriteResult, file_chunk_id
from .filedata import FileData, Layout

__all__ = ["ChunkClient", "FileData", "Layout", "ReadIO", "WriteIO", "WriteResult", "file_chunk_id"]
