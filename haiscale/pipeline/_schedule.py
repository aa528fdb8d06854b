"""Pipeline schedules as pure data: the ordered list of actions one stage runs in one step.

An action is ``("F", m)`` (forward of micro-batch m: receive its input from the previous stage,
run the stage, send the output on) or ``("B", m)`` (backward of micro-batch m: receive the output's
gradient from the next stage, back-propagate, send the input's gradient back). Sends never block
the schedule (they are posted and waited for at the end of the step), receives do; with that
rule both schedules below finish for any stage count and micro-batch count, which
:func:`simulate` checks by running every stage's list against the others'.

    GPipe          F0 F1 ... F(M-1)  B0 B1 ... B(M-1)        holds M micro-batches' activations
    1F1B (stage s) warm-up: P-s-1 forwards, then one forward and one backward in turn,
                   then the remaining backwards               holds at most P-s of them

[Note: why 1F1B holds fewer activations] a stage can free a micro-batch's saved tensors only after
its backward. GPipe runs every forward before the first backward, so each stage holds all M;
1F1B (PipeDream-flush) starts the backward of micro-batch 0 as soon as the last stage could have
produced its gradient, and from then on admits a new forward only after finishing a backward, so
stage s never has more than P - s micro-batches in flight. Both do the same work and have the
same bubble (P-1 slots of 2M+... per stage), so the step time is the same and the memory is not.
"""

from __future__ import annotations

from ..errors import UsageError

Action = tuple[str, int]

SCHEDULES = ("gpipe", "1f1b")


def gpipe(stage: int, nstages: int, chunks: int) -> list[Action]:
    """All forwards, then all backwards (GPipe with a synchronous flush)."""
    _check(stage, nstages, chunks)
    return [("F", m) for m in range(chunks)] + [("B", m) for m in range(chunks)]


def one_f_one_b(stage: int, nstages: int, chunks: int) -> list[Action]:
    """PipeDream-flush (1F1B): warm-up forwards, steady one-forward-one-backward, cool-down."""
    _check(stage, nstages, chunks)
    warm = min(nstages - stage - 1, chunks)
    acts: list[Action] = [("F", m) for m in range(warm)]
    for i in range(chunks - warm):
        acts += [("F", warm + i), ("B", i)]
    acts += [("B", m) for m in range(chunks - warm, chunks)]
    return acts


def actions(schedule: str, stage: int, nstages: int, chunks: int) -> list[Action]:
    if schedule == "gpipe":
        return gpipe(stage, nstages, chunks)
    if schedule == "1f1b":
        return one_f_one_b(stage, nstages, chunks)
    raise UsageError(f"unknown pipeline schedule {schedule!r}; known: {', '.join(SCHEDULES)}")


def max_in_flight(acts: list[Action]) -> int:
    """The most micro-batches a stage holds at once (forward done, backward not yet)."""
    live = peak = 0
    for kind, _ in acts:
        live += 1 if kind == "F" else -1
        peak = max(peak, live)
    return peak


def simulate(schedule: str, nstages: int, chunks: int) -> list[tuple[int, Action]]:
    """Run every stage's action list against the others (sends buffered, receives blocking).

    Returns the global order of (stage, action); raises UsageError on a deadlock. Used by the
    tests, and a cheap proof that a schedule finishes before any process is started."""
    lists = [actions(schedule, s, nstages, chunks) for s in range(nstages)]
    pos = [0] * nstages
    fwd_done = [set() for _ in range(nstages)]
    bwd_done = [set() for _ in range(nstages)]
    order: list[tuple[int, Action]] = []
    while any(p < len(lst) for p, lst in zip(pos, lists, strict=True)):
        progressed = False
        for s in range(nstages):
            if pos[s] >= len(lists[s]):
                continue
            kind, m = lists[s][pos[s]]
            if kind == "F":
                ready = s == 0 or m in fwd_done[s - 1]
            else:
                ready = m in fwd_done[s] and (s == nstages - 1 or m in bwd_done[s + 1])
            if ready:
                (fwd_done if kind == "F" else bwd_done)[s].add(m)
                order.append((s, (kind, m)))
                pos[s] += 1
                progressed = True
        if not progressed:
            raise UsageError(f"schedule {schedule} deadlocks with {nstages} stages and {chunks} micro-batches "
                             f"at positions {pos}")
    return order


def _check(stage: int, nstages: int, chunks: int) -> None:
    if nstages < 1 or chunks < 1 or not 0 <= stage < nstages:
        raise UsageError(f"a pipeline needs nstages >= 1, chunks >= 1 and 0 <= stage < nstages; got "
                         f"stage {stage} of {nstages}, {chunks} chunks")
