"""fs3 clients: :mod:`fs3.client.chunks` reads and writes chunks by (chain, chunk id)."""

from .chunks import ChunkClient, ReadIO, WriteIO, WriteResult, file_chunk_id

__all__ = ["ChunkClient", "ReadIO", "WriteIO", "WriteResult", "file_chunk_id"]
