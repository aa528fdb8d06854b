"""The scheduler's side (``/v1/internal/*``, the cluster secret only) and the health check."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from .deps import Service_, State_
from .models import SEQ_MAX, NotifySpec

__all__ = ["router"]

router = APIRouter()


@router.get("/healthz", include_in_schema=False)
async def healthz(st: State_) -> dict:  # on the event loop: it answers whatever the thread pool does
    return {"ok": True, "cluster": st.cluster.name, "limits": st.limits.snapshot()}


@router.get("/v1/internal/wait")
async def internal_wait(p: Service_, st: State_, seq: Annotated[int, Query(ge=-1, le=SEQ_MAX)] = -1,
                        timeout: Annotated[float, Query(ge=0, le=60)] = 1.0) -> dict:
    await st.sched_events.wait(seq, timeout)
    return st.sched_events.counts()


@router.post("/v1/internal/notify")
async def internal_notify(p: Service_, st: State_, body: NotifySpec | None = None) -> dict:
    nodes = body.nodes if body and body.nodes is not None else list(st.agent_events)
    for n in nodes:
        if n in st.agent_events:
            st.agent_events[n].bump()
    return {"woken": nodes}
