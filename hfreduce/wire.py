"""The wire format between nodes: one definition for the leaders' tree, the lanes and the C loop.

A frame is ``network.transport``'s prefix (magic, header length, payload length) then a
:data:`DATA_HEADER` then the payload. The header names the collective the sender runs (kind,
dtype, op, root, sequence number, chunk, total bytes) so a receiver that runs another one
reports a :class:`~hfreduce.errors.MismatchError` instead of adding the wrong bytes.

The lanes' C loop (``_kernels.c``, ``lane_header``) writes and compares these frames byte for
byte with the same layout.
"""

from __future__ import annotations

import struct

from network.transport import MAGIC, PREFIX_SIZE

from .errors import MismatchError

__all__ = ["DATA_HEADER", "FRAME", "MAGIC", "PREFIX_SIZE", "T_ABORT", "T_DATA", "mismatch_error"]

#: type, tree, kind, dtype, op, root, seq, chunk, nbytes (of the collective), payload length
DATA_HEADER = struct.Struct("!BBBBbiQQQQ")
#: network.transport's frame prefix: magic, header length, payload length
FRAME = struct.Struct("!IIQ")
#: frame types (the header's first byte)
T_DATA = 1
T_ABORT = 2

assert FRAME.size == PREFIX_SIZE


def mismatch_error(fields: tuple, spec, g: int, peer_node: str, peer_rank: int, my_node: str, me: int,
                   who: str = "rank") -> MismatchError:
    """A DATA frame ``fields`` from another node does not match the collective ``spec`` runs here."""
    from .engine import _describe

    theirs = _describe([fields[2], fields[8], fields[3], fields[4], fields[5], fields[7]])
    mine = _describe([spec.kind, spec.nbytes, spec.dtype, spec.op, spec.root, g])
    return MismatchError(f"node {peer_node} ({who} {peer_rank}) is running {theirs} (#{fields[6]}) while node "
                         f"{my_node} runs {mine} (#{spec.seq})", rank=peer_rank, node=peer_node, detected_by=me)
