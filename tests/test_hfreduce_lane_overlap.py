"""Lanes with up and down on two threads (hfreduce._C's note "up and down overlap").

On by default only where the group spans zones (bench/topology.py measures what it buys on the
shaped two-zone namespace cluster; tests/test_deploy_netns.py cuts a cable under it); here it is
forced on loopback nodes, so the threaded path is checked for exact results with own and
registered buffers, one and several ranks per node, many chunks per collective.
"""

from __future__ import annotations

import pytest
from test_hfreduce_collectives import ENV, run, w_lanes_matrix  # the lanes' result matrix

from hfreduce.errors import HFReduceError
from hfreduce.lanes import overlap_enabled


def test_overlap_follows_the_zones_unless_the_environment_says(monkeypatch):
    monkeypatch.delenv("HFREDUCE_LANE_OVERLAP", raising=False)
    assert overlap_enabled(2) is True
    assert overlap_enabled(1) is False
    for v, want in (("1", True), ("on", True), ("0", False), ("off", False), ("auto", False)):
        monkeypatch.setenv("HFREDUCE_LANE_OVERLAP", v)
        assert overlap_enabled(1) is want, v
    monkeypatch.setenv("HFREDUCE_LANE_OVERLAP", "sometimes")
    with pytest.raises(HFReduceError, match="HFREDUCE_LANE_OVERLAP='sometimes'"):
        overlap_enabled(2)


@pytest.mark.parametrize("nodes,per_node", [(2, 2), (4, 1)])
def test_allreduce_in_lanes_with_up_and_down_on_two_threads(nodes, per_node):
    res = run(w_lanes_matrix, nodes=nodes, per_node=per_node,
              env={**ENV, "HFREDUCE_LANES": "1", "HFREDUCE_LANE_OVERLAP": "1"})
    for enabled, frac, errors in res.values():
        assert errors == []
        assert enabled is True
        assert frac == 1.0
