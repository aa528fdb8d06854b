"""Reduction operators."""

from __future__ import annotations

import enum

__all__ = ["ReduceOp"]


class ReduceOp(enum.IntEnum):
    """How a reduction combines the ranks' values. AVG divides the sum by the world size (floor
    division for integer dtypes); fp16 and bf16 are combined in fp32 and rounded once per pass."""

    SUM = 0
    AVG = 1
    MAX = 2
    MIN = 3
