"""Chain-table generation: N storage nodes x T targets per node, replication R.

Each chain takes R targets on R distinct nodes (never two replicas of a chain on one node).
Chains are built greedily so that every pair of nodes shares as close to the same number of
chains as possible (an approximation of 3FS's balanced incomplete block design, which it
solves with an integer program): when a node fails, the reads of its chains move to the
chains' other replicas, so an even pair count spreads that load evenly over the survivors.

The **balance figure** is, over every possible single-node failure, the worst ratio of the
extra read load on the most loaded survivor to the mean extra load on the survivors
(1.0 = perfectly even).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

from .errors import ChainTableError

__all__ = ["ChainTable", "generate_chain_table", "target_id", "failure_balance"]


def target_id(node_index: int, t: int) -> int:
    """The id of target ``t`` (0-based) on the ``node_index``-th storage node: 101, 102, ... 201, ..."""
    return (node_index + 1) * 100 + t + 1


@dataclass(frozen=True)
class ChainTable:
    nodes: tuple[str, ...]
    replication: int
    targets_per_node: int
    chains: tuple[tuple[int, ...], ...]          # chain i+1 -> target ids, head first
    target_node: dict                            # target id -> node name

    def balance(self) -> float:
        return failure_balance(self)


def generate_chain_table(nodes: list[str], targets_per_node: int, replication: int) -> ChainTable:
    """Build the chain table; raises :class:`ChainTableError` naming the problem."""
    n, t, r = len(nodes), targets_per_node, replication
    if len(set(nodes)) != n:
        raise ChainTableError(f"storage nodes listed twice: {nodes}")
    if r < 1:
        raise ChainTableError(f"replication must be >= 1, got {r}")
    if n < r:
        raise ChainTableError(f"{n} storage node(s) cannot hold chains of {r} replicas on distinct nodes "
                              f"(need at least {r} nodes)")
    if not 1 <= t <= 99:
        raise ChainTableError(f"targets_per_node must be 1..99, got {t}")
    if (n * t) % r:
        raise ChainTableError(f"{n} nodes x {t} targets = {n * t} targets is not a multiple of the "
                              f"replication {r}; change targets_per_node")
    chains = _improve(_greedy(n, t, r), n)
    tnode = {target_id(i, k): nodes[i] for i in range(n) for k in range(t)}
    return ChainTable(tuple(nodes), r, t, tuple(chains), tnode)


def _greedy(n: int, t: int, r: int) -> list[tuple[int, ...]]:
    # [Note: feasibility] With C chains left to build, a node with more than C free targets
    # could not place them all on distinct chains. Each step therefore takes every node whose
    # free count equals the number of chains left (counting this one), then the cheapest pairs.
    # That condition (max free <= chains left, sum free = r x chains left) is invariant, so
    # the greedy never gets stuck.
    free = {i: list(range(t)) for i in range(n)}
    pair = {p: 0 for p in combinations(range(n), 2)}
    load = [0] * n
    total = n * t // r
    chains: list[tuple[int, ...]] = []
    for c in range(total):
        left = total - c
        forced = [i for i in range(n) if len(free[i]) == left]
        # candidates: bounded (so big clusters stay fast), the fullest nodes first
        rest = sorted((i for i in range(n) if free[i] and i not in forced),
                      key=lambda i: (-len(free[i]), (i - c) % n))[:max(0, 12 - len(forced))]
        if len(forced) > r or len(forced) + len(rest) < r:  # pragma: no cover - excluded by the invariant
            raise ChainTableError(f"chain placement got stuck at chain {c + 1} (free targets {free})")
        best = None
        for extra in combinations(rest, r - len(forced)):
            combo = tuple(forced) + extra
            cost = sum(pair[tuple(sorted(p))] ** 2 for p in combinations(combo, 2))
            key = (cost, -sum(len(free[i]) for i in combo), tuple(sorted((i - c) % n for i in combo)))
            if best is None or key < best[0]:
                best = (key, combo)
        combo = best[1]
        for p in combinations(combo, 2):
            pair[tuple(sorted(p))] += 1
        # head = the node that has led fewest chains so far (spreads write entry points)
        order = sorted(combo, key=lambda i: (load[i], (i - c) % n))
        load[order[0]] += 1
        chains.append(tuple(target_id(i, free[i].pop(0)) for i in order))
    return chains


def _improve(chains: list[tuple[int, ...]], n: int, rounds: int = 4000) -> list[tuple[int, ...]]:
    """Hill-climb on the greedy table: swap two replicas between chains while it evens out the
    pair counts (sum of squares), never putting two replicas of a chain on one node."""
    import random

    if len(chains) < 2 or len(chains[0]) < 2:
        return chains
    rng = random.Random(12345)  # deterministic: the same inputs give the same table
    rows = [list(c) for c in chains]
    node = lambda tid: tid // 100 - 1  # noqa: E731

    pair: dict[tuple[int, int], int] = {}
    for row in rows:
        for a, b in combinations(sorted(node(x) for x in row), 2):
            pair[(a, b)] = pair.get((a, b), 0) + 1

    def delta(row: list[int], old: int, new: int) -> int:
        d = 0
        for x in row:
            if x == old:
                continue
            k = node(x)
            po, pn = tuple(sorted((k, node(old)))), tuple(sorted((k, node(new))))
            d += (pair.get(pn, 0) + 1) ** 2 - pair.get(pn, 0) ** 2 + (pair[po] - 1) ** 2 - pair[po] ** 2
        return d

    def apply(row: list[int], old: int, new: int) -> None:
        for x in row:
            if x == old:
                continue
            k = node(x)
            pair[tuple(sorted((k, node(old))))] -= 1
            pn = tuple(sorted((k, node(new))))
            pair[pn] = pair.get(pn, 0) + 1
        row[row.index(old)] = new

    for _ in range(rounds):
        i, j = rng.sample(range(len(rows)), 2)
        a, b = rng.choice(rows[i]), rng.choice(rows[j])
        na, nb = node(a), node(b)
        if na == nb or nb in {node(x) for x in rows[i]} or na in {node(x) for x in rows[j]}:
            continue
        d1 = delta(rows[i], a, b)
        apply(rows[i], a, b)
        d2 = delta(rows[j], b, a)
        if d1 + d2 <= 0:
            apply(rows[j], b, a)
        else:
            apply(rows[i], b, a)  # undo
    return [tuple(r) for r in rows]


def failure_balance(table: ChainTable) -> float:
    """Worst (max extra load / mean extra load) over the survivors of any single-node failure."""
    if table.replication < 2 or len(table.nodes) < 2:
        return 1.0
    worst = 1.0
    for failed in table.nodes:
        extra = {n: 0.0 for n in table.nodes if n != failed}
        for chain in table.chains:
            members = [table.target_node[x] for x in chain]
            if failed not in members:
                continue
            survivors = [m for m in members if m != failed]
            for m in survivors:
                extra[m] += 1.0 / len(survivors) - 1.0 / len(members)
        vals = list(extra.values())
        mean = sum(vals) / len(vals)
        if mean > 0:
            worst = max(worst, max(vals) / mean)
    return worst
