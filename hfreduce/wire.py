"""The wire format between nodes: one definition for the leaders' tree, the lanes and the C loop.

A frame is ``network.transport``'s prefix (magic, header length, payload length) then a
:data:`DATA_HEADER` then the payload. The header names the collective the sender runs (kind,
dtype, op, root, sequence number, chunk, total bytes) so a receiver that runs another one
reports a :class:`~hfreduce.errors.MismatchError` instead of adding the wrong bytes.

[Note: one wire format, checked against the C loop] The lanes' C loop (``_kernels.c``,
``lane_header``) writes and compares these frames byte for byte. :func:`check_c` has it build
frames (``_C.wire_header``) and compares them with this module's packing, field by field; it
runs when hfreduce is imported with the extension built, so a change on one side that the
other does not follow (or an extension built from older sources) fails at import, naming the
field, instead of as a mismatch between nodes at run time.
"""

from __future__ import annotations

import struct

from network.transport import MAGIC, PREFIX_SIZE

from . import kernels as _kernels
from .errors import MismatchError

__all__ = ["DATA_HEADER", "FRAME", "MAGIC", "PREFIX_SIZE", "T_ABORT", "T_DATA", "check_c", "mismatch_error"]

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


_FIELDS = ("magic", "header length", "payload length", "type", "tree", "kind", "dtype", "op", "root", "seq", "chunk",
           "nbytes", "payload length (header)")
#: sample frames: every field distinct, negative op and root, values past 32 bits
_SAMPLES = ((1, 1, 9, -1, 7, 1 << 40, 3, 5 << 33, 12345), (0, 6, 0, 0, -1, 1, 0, 0, 0))


def check_c(c_module) -> None:
    """Raise ImportError naming each field where the C loop's frames differ from this module's."""
    if not hasattr(c_module, "wire_header"):
        raise ImportError("hfreduce._C was built from older sources (it has no wire_header): rebuild it "
                          "(pip install -e . or make install)")
    for t, kind, dtype, op, root, seq, g, nbytes, n in _SAMPLES:
        ours = FRAME.pack(MAGIC, DATA_HEADER.size, n) + DATA_HEADER.pack(T_DATA, t, kind, dtype, op, root, seq, g,
                                                                          nbytes, n)
        theirs = c_module.wire_header(t, kind, dtype, op, root, seq, g, nbytes, n)
        if theirs == ours:
            continue
        if len(theirs) != len(ours):
            raise ImportError(f"hfreduce._C writes {len(theirs)}-byte frame headers, hfreduce.wire {len(ours)}: "
                              "rebuild the extension or follow the change on both sides")
        a = FRAME.unpack_from(theirs) + DATA_HEADER.unpack_from(theirs, FRAME.size)
        b = FRAME.unpack_from(ours) + DATA_HEADER.unpack_from(ours, FRAME.size)
        bad = [f"{name}: C {x!r}, Python {y!r}" for name, x, y in zip(_FIELDS, a, b, strict=True) if x != y]
        raise ImportError("hfreduce._C and hfreduce.wire disagree on the frame between nodes: " + "; ".join(bad))


if _kernels._C is not None:
    check_c(_kernels._C)
