"""haiscale.pipeline: pipeline parallelism (GPipe and 1F1B) on hfreduce point-to-point, with data
parallelism per stage and the one-NIC rank placement of the Fire-Flyer paper. See
docs/haiscale-pipeline.md.

    schedules    _schedule.py   the actions of a stage as pure data; a deadlock check
    placement    _layout.py     which rank holds which (replica, stage)
    runtime      _runtime.py    splitting, transports, one stage's step, activation accounting
    wrappers     _pipe.py       GPipe, PipeDream, make_subgroups
"""

from ._layout import RankLayout, node_placement, rank_layout
from ._pipe import GPipe, PipeDream, Pipeline, PipelineGroup, make_subgroups
from ._runtime import ActivationMeter, partition, run_local, split
from ._schedule import SCHEDULES, gpipe, max_in_flight, one_f_one_b, simulate

__all__ = [
    "SCHEDULES", "ActivationMeter", "GPipe", "PipeDream", "Pipeline", "PipelineGroup", "RankLayout",
    "gpipe", "make_subgroups", "max_in_flight", "node_placement", "one_f_one_b", "partition", "rank_layout",
    "run_local", "simulate", "split",
]
