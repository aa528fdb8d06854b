"""Shared checks of the haiscale tests (DDP and FSDP compare state dicts the same way)."""

from __future__ import annotations

import torch

ATOL, RTOL = 2e-5, 1e-4


def assert_close_dicts(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=ATOL, rtol=RTOL, msg=lambda m, k=k: f"{k}: {m}")
