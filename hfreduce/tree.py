"""The double binary tree between node leaders, topology-aware.

Two binary trees over the nodes (as NCCL builds them): the first is an in-order binary tree over
the nodes in topology order, the second its mirror (or, for an odd count, the same tree shifted
by one), so every node is an inner node in at most one tree and a leaf in the other. Each tree
carries half of every chunk: reduce up the tree, then broadcast down.

Topology: nodes are numbered zone by zone and leaf by leaf (``Cluster.ordered``), so in-order
neighbours, which most tree edges join, share a leaf switch. Across zones (the paper's
two-zone network, where only a few links join the zones) the trees are built per zone and the
zones are chained through one gateway node each (the zone's first node): both trees use the
same single edge between two zones, so one node pair talks across each zone boundary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Tree", "btree", "double_tree", "build_trees", "reroot"]


@dataclass(frozen=True)
class Tree:
    """One tree over node indices: ``parent[i]`` (-1 at the root) and ``children[i]``."""

    parent: tuple[int, ...]
    children: tuple[tuple[int, ...], ...]

    @property
    def root(self) -> int:
        return self.parent.index(-1)

    @classmethod
    def from_parents(cls, parent: Sequence[int]) -> Tree:
        kids: list[list[int]] = [[] for _ in parent]
        for i, p in enumerate(parent):
            if p >= 0:
                kids[p].append(i)
        return cls(tuple(parent), tuple(tuple(sorted(k)) for k in kids))

    def edges(self) -> list[tuple[int, int]]:
        return [(p, i) for i, p in enumerate(self.parent) if p >= 0]

    def depth(self) -> int:
        best = 0
        for i in range(len(self.parent)):
            d, j = 0, i
            while self.parent[j] >= 0:
                j, d = self.parent[j], d + 1
            best = max(best, d)
        return best


def btree(n: int) -> list[int]:
    """Parents of the in-order binary tree over 0..n-1 (NCCL's ``ncclGetBtree``): node 0 is the
    root with one child, a node whose lowest set bit is b has children i - b/2 and i + b/2."""
    parent = [-1] * n
    for rank in range(1, n):
        bit = rank & -rank
        up = (rank ^ bit) | (bit << 1)
        if up >= n:
            up = rank ^ bit
        parent[rank] = up
    return parent


def double_tree(n: int) -> tuple[list[int], list[int]]:
    """Parents of both trees over 0..n-1: the btree and its mirror (even n) or shift (odd n)."""
    t0 = btree(n)
    if n <= 1:
        return t0, list(t0)
    if n % 2 == 1:
        # shift: tree-1 node i plays btree rank (i - 1) mod n
        t1 = [-1] * n
        for i in range(n):
            p = t0[(i - 1) % n]
            t1[i] = -1 if p < 0 else (p + 1) % n
    else:
        t1 = [-1] * n
        for i in range(n):
            p = t0[n - 1 - i]
            t1[i] = -1 if p < 0 else n - 1 - p
    return t0, t1


def reroot(parent: Sequence[int], new_root: int) -> list[int]:
    """The same tree with its edges along the path to ``new_root`` reversed."""
    out = list(parent)
    prev, cur = -1, new_root
    while cur >= 0:
        nxt = parent[cur]
        out[cur] = prev
        prev, cur = cur, nxt
    return out


def build_trees(nodes: Sequence[str], zone_of: dict[str, str] | None = None) -> tuple[Tree, Tree]:
    """The two trees over ``nodes`` (already in topology order: zone by zone, leaf by leaf)."""
    n = len(nodes)
    zones: list[list[int]] = []
    if zone_of:
        for i, name in enumerate(nodes):
            z = zone_of.get(name)
            if zones and zone_of.get(nodes[zones[-1][0]]) == z:
                zones[-1].append(i)
            else:
                zones.append([i])
    else:
        zones = [list(range(n))]
    if len(zones) <= 1:
        t0, t1 = double_tree(n)
        return Tree.from_parents(t0), Tree.from_parents(t1)
    parents = ([-1] * n, [-1] * n)
    prev_gateway = -1
    for members in zones:
        local = double_tree(len(members))
        gateway = members[0]
        for t in (0, 1):
            # re-root the zone's tree at its gateway, then hang it from the previous gateway
            lp = reroot(local[t], 0)
            for j, p in enumerate(lp):
                parents[t][members[j]] = members[p] if p >= 0 else prev_gateway
        prev_gateway = gateway
    return Tree.from_parents(parents[0]), Tree.from_parents(parents[1])
