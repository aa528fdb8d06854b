"""Which chains a new file stripes over (chosen by meta at create, never changed afterwards).

Chunk ``i`` of inode ``n`` lives on ``chains[i % len(chains)]`` (``fs3.client.chunks.file_chunk_id``).
The stripe is ``[fs3] stripe`` chains (at most all of them), taken consecutively from the sorted
chain ids starting at ``ino % nchains``: consecutive files start on different chains, so small
files spread over the cluster and a large file's chunks over ``stripe`` chains.
"""

from __future__ import annotations

from ..routing import Routing

__all__ = ["choose_layout"]


def choose_layout(ino: int, routing: Routing, stripe: int) -> dict:
    """``{"chunk_size", "chains"}`` for a new file ``ino`` under ``routing``."""
    ids = routing.chain_ids()
    if not ids:
        return {"chunk_size": routing.chunk_size, "chains": []}
    n = len(ids)
    k = max(1, min(stripe, n))
    start = ino % n
    return {"chunk_size": routing.chunk_size, "chains": [ids[(start + j) % n] for j in range(k)]}
