"""Which global rank runs which (data-parallel replica, pipeline stage).

[Note: one-NIC placement (fireflyer paper §V-B2)] A Fire-Flyer node has 8 GPUs and one NIC. The
usual layout (Megatron's: the data-parallel index varies fastest, ``rank = stage * dp + replica``)
puts one *stage* of 8 replicas on a node: every GPU of the node runs the same action at the same
moment, so all 8 send their activations at once and queue on the one NIC. The paper gives the GPUs
of a node to different data-parallel ranks *and* staggers them: here rank r of the one-NIC layout
is replica ``r % dp`` at stage ``(r // dp + r % dp) % pp``, so consecutive ranks (the GPUs of a
node) are different replicas at different stages. GPUs at different stages are at
different points of their schedules (stage s is s slots behind stage 0; the first and last stages
send in one direction only; stages differ in compute), so their sends leave spread out rather than
as one burst of 8 on one NIC at one instant. Both layouts send the same bytes per step: the gain
is in the burst, which a one-machine test cannot measure; the tests check the placement.
It is still a bijection: for a fixed replica, ``r // dp`` runs over 0..pp-1 and so does the stage.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UsageError


@dataclass(frozen=True)
class RankLayout:
    """``grid[replica][stage]`` is the global rank; ``where[rank]`` is its (replica, stage)."""

    dp: int
    pp: int
    grid: tuple[tuple[int, ...], ...]

    @property
    def where(self) -> dict[int, tuple[int, int]]:
        return {r: (d, s) for d, row in enumerate(self.grid) for s, r in enumerate(row)}

    def pipeline_of(self, rank: int) -> tuple[int, ...]:
        """The global ranks of ``rank``'s pipeline, stage 0 first."""
        return self.grid[self.where[rank][0]]

    def dp_groups(self) -> tuple[tuple[int, ...], ...]:
        """Each stage's data-parallel group (the ranks holding it), stage 0 first."""
        return tuple(tuple(row[s] for row in self.grid) for s in range(self.pp))


def rank_layout(world_size: int, pp_size: int, one_nic: bool = False) -> RankLayout:
    """Place ``world_size`` ranks in ``world_size // pp_size`` replicas of a ``pp_size``-stage pipeline.

    ``one_nic=False``: replica index fastest (``rank = stage * dp + replica``, Megatron's order).
    ``one_nic=True``: the staggered placement of the note above."""
    if pp_size < 1 or world_size < 1 or world_size % pp_size:
        raise UsageError(f"the world size ({world_size}) must be a multiple of the pipeline size ({pp_size})")
    dp = world_size // pp_size
    grid = [[-1] * pp_size for _ in range(dp)]
    for r in range(world_size):
        replica = r % dp
        stage = (r // dp + replica) % pp_size if one_nic else r // dp
        grid[replica][stage] = r
    return RankLayout(dp, pp_size, tuple(tuple(row) for row in grid))


def node_placement(layout: RankLayout, procs_per_node: int) -> list[list[tuple[int, int]]]:
    """For each node (``procs_per_node`` consecutive ranks), the (replica, stage) of its ranks."""
    where = layout.where
    n = layout.dp * layout.pp
    return [[where[r] for r in range(start, min(start + procs_per_node, n))] for start in range(0, n, procs_per_node)]
