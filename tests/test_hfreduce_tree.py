"""The double binary tree: valid spanning trees, balanced roles, topology-aware zone crossing."""

from __future__ import annotations

import pytest

from hfreduce.tree import Tree, btree, build_trees, double_tree, reroot


def assert_tree(parent, n):
    roots = [i for i, p in enumerate(parent) if p < 0]
    assert len(roots) == 1, parent
    for i in range(n):  # every node reaches the root without a cycle
        seen, j = set(), i
        while parent[j] >= 0:
            assert j not in seen, parent
            seen.add(j)
            j = parent[j]
        assert j == roots[0]


@pytest.mark.parametrize("n", list(range(1, 70)))
def test_double_tree_is_two_spanning_binary_trees(n):
    t0, t1 = double_tree(n)
    for t in (t0, t1):
        assert_tree(t, n)
        tree = Tree.from_parents(t)
        assert all(len(c) <= 2 for c in tree.children)
        assert tree.depth() <= max(1, n.bit_length() + 1)


@pytest.mark.parametrize("n", [4, 6, 8, 16, 32, 64])
def test_each_node_is_inner_in_at_most_one_tree(n):
    t0, t1 = (Tree.from_parents(t) for t in double_tree(n))
    for i in range(n):
        assert not (t0.children[i] and t1.children[i]), i


def test_btree_matches_nccl_shape():
    assert btree(1) == [-1]
    assert btree(2) == [-1, 0]
    assert btree(4) == [-1, 2, 0, 2]
    assert btree(7) == [-1, 2, 4, 2, 0, 6, 4]


def test_reroot_keeps_a_tree():
    p = btree(9)
    for r in range(9):
        q = reroot(p, r)
        assert_tree(q, 9)
        assert q[r] == -1


@pytest.mark.parametrize("sizes", [(2, 2), (3, 5), (1, 1), (4, 1), (2, 3, 4), (8, 8)])
def test_zones_cross_once_through_the_same_pair(sizes):
    names, zone_of = [], {}
    for z, k in enumerate(sizes):
        for i in range(k):
            names.append(f"z{z}n{i}")
            zone_of[names[-1]] = f"zone{z}"
    trees = build_trees(names, zone_of)
    n = len(names)
    crossing = []
    for tree in trees:
        assert_tree(list(tree.parent), n)
        cross = [(p, c) for p, c in tree.edges() if zone_of[names[p]] != zone_of[names[c]]]
        assert len(cross) == len(sizes) - 1  # one edge per zone boundary
        crossing.append({frozenset(e) for e in cross})
    assert crossing[0] == crossing[1]  # both trees use the same node pair


def test_single_zone_uses_plain_double_tree():
    names = [f"n{i}" for i in range(6)]
    t0, t1 = build_trees(names, {n: "a" for n in names})
    assert list(t0.parent) == double_tree(6)[0] and list(t1.parent) == double_tree(6)[1]
