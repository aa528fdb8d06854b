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
