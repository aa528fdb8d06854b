"""hfreduce errors as they travel between processes (ABORT between leaders and down a lane)."""

from __future__ import annotations

import msgpack
import pytest

from hfreduce.errors import KINDS, HFReduceError, InvalidArgument, error_from_wire, error_to_wire


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_kind_crosses_the_wire_with_its_culprit(kind):
    err = KINDS[kind]("rank 3 (node n1) died", rank=3, node="n1", detected_by=5)
    back = error_from_wire(msgpack.unpackb(msgpack.packb(error_to_wire(err))))
    assert type(back) is KINDS[kind]
    assert (str(back), back.rank, back.node, back.detected_by) == ("rank 3 (node n1) died", 3, "n1", 5)


def test_an_unlisted_class_arrives_as_the_base_error():
    back = error_from_wire(error_to_wire(InvalidArgument("bad", rank=1)))
    assert type(back) is HFReduceError and back.rank == 1 and str(back) == "bad"


def test_the_c_loop_and_python_agree_on_the_frame_between_nodes():
    """hfreduce.wire is the one definition; the lanes' C loop must write the same bytes."""
    from types import SimpleNamespace

    from hfreduce import kernels, wire

    if kernels._C is None:
        pytest.skip("the C extension is not built")
    wire.check_c(kernels._C)  # also ran at import

    def drifted(*fields):  # a C side that moved the root one byte (as a header edit might)
        h = bytearray(kernels._C.wire_header(*fields))
        h[21:25] = (fields[4] + 1).to_bytes(4, "big", signed=True)
        return bytes(h)

    with pytest.raises(ImportError, match=r"root: C 8, Python 7"):
        wire.check_c(SimpleNamespace(wire_header=drifted))
    with pytest.raises(ImportError, match="older sources"):
        wire.check_c(SimpleNamespace())
