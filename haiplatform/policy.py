"""The scheduling policy: a pure function from one snapshot to a list of decisions.

No I/O, no clock, no randomness: :func:`decide` reads a :class:`Snapshot` (the live jobs with
their ranks, the nodes, the quotas and ``now``) and returns :class:`Decision` objects that the
scheduler loop writes to the database in one transaction. The live loop, the tests and any
simulator run this same code.

One scheduling cycle is a pipeline of named phases, as in the Kubernetes scheduling framework:

====================  ===================================================================
phase                 what it does
====================  ===================================================================
``node_health``       nodes whose agent missed heartbeats for ``heartbeat_timeout`` -> lost
``reconcile``         attempts holding nodes: mark running; stop on a failed rank, a stop /
                      suspend request, the attempt's time limit (TIMEOUT) or the watchdog
                      (HUNG); a node lost under one is drained (``DrainNode``) and the
                      attempt re-queued (NODE_LOST|INTERRUPT) while ``restart_count <
                      max_node_requeues``, else failed; finish when every rank has ended (a
                      suspended attempt is re-queued as the next attempt of its chain)
``priority``          the effective level: AUTO -> the highest level with per-priority quota
                      room (NORMAL without one), ABOVE_NORMAL -> NORMAL after
                      ``demote_after`` of chain run time (``SetPriority`` when it changes)
``gate``              held attempts, disabled users' and those whose dependencies have not
                      ended wait outside the queue (``SetReason``); a failed ``after_ok``
                      dependency cancels (``CancelJob``)
``queue_sort``        queued attempts by effective priority (high first), then ``first_id``
                      (the chain's first submission: a resumed job keeps its place)
``filters``           a job array's throttle (``ArrayThrottle``) and quota per user / group at the
                      effective level (``QuotaFilter``), both skipped, not blocking;
                      reference-fifo: the fitting prefix and strict order
``score``             fireflyer: one leaf if it fits a leaf (best fit), else one zone filling
                      leaves, else across zones if a cross-zone slot is free; backfill
                      reservations honoured (``TopologyScore``); reference-fifo: random
``preempt``           fireflyer: strictly higher priority, victims that ran ``min_run_time``,
                      least work lost, the fewest that make room; their nodes reserved for
                      the preemptor (``LeastWorkLost``); reference-fifo: running attempts
                      outside the priority-ordered prefix that fits are suspended
``reserve``           fireflyer: reservations for the first ``reservations`` blocked
                      attempts from the running ones' time limits (``BackfillReserve``)
``bind``              take the nodes, lay out the ranks (``StartJob``)
====================  ===================================================================

The queue's phases are plugins composed in a :class:`Profile` (``PROFILES``: "fireflyer", the
default, and "reference-fifo", the open reference's matcher); each filter and the score answer
with a typed :class:`Status` (success, unschedulable, wait) and a reason. Reasons carry no clock
values, so a waiting attempt's reason is only rewritten when its situation changes.

[Note: backfill, not strict order] The fireflyer profile lets an attempt start behind a blocked one
only where it delays no reserved start: a blocked attempt at the head of the queue gets a
reservation (when known ends free room for it) and later attempts may take its reserved free nodes
only if they are expected to end first. Quota-blocked attempts are skipped, not blocking: their
owner's quota, not the cluster, holds them back.

[Note: simulator] :func:`plan` needs nothing but the snapshot: nodes with ``last_seen = now`` and
attempts whose ranks are all RUNNING are what a simulator passes; a stopping victim's ``reason``
(written by the StopJob) tells which preemptor it frees nodes for.
"""

from __future__ import annotations

import math
import random
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Protocol

from .states import AUTO, PRIORITIES, Desired, JobStatus, NodeState, RankStatus, StopCode

__all__ = ["NodeView", "RankView", "JobView", "QuotaView", "Snapshot", "PolicyConfig", "Decision", "MarkNode",
           "MarkRunning", "StartJob", "StopJob", "CancelJob", "FinishJob", "SetReason", "MarkRanksLost",
           "SetPriority", "DrainNode", "PROFILES", "queue_position", "never_fits",
           "decide", "plan", "queue_sort", "quota_filter", "rank_layout",
           "Code", "Status", "CycleState", "QueueSortPlugin", "FilterPlugin", "ScorePlugin", "Profile",
           "PrioritySort", "QuotaFilter", "StrictOrder", "TopologyScore", "RandomScore", "DEFAULT_PROFILE",
           "REFERENCE_FIFO", "PLAIN_FIFO", "PreemptPlugin", "ReservePlugin", "LeastWorkLost", "PrefixPreempt", "PrefixFilter",
           "BackfillReserve", "Pool", "place_topology", "auto_level", "ArrayThrottle", "gate", "dependency",
           "held_reason", "reason_kind", "array_status"]


#: the reason of an attempt waiting for free nodes (also the reason a new submission starts with)
WAITING = "waiting for nodes"


# -- the snapshot ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class NodeView:
    name: str
    zone: str = ""
    leaf: str = ""
    gpus: int = 0
    state: str = NodeState.UP
    drained: bool = False
    last_seen: float = 0.0


@dataclass(frozen=True)
class RankView:
    rank: int
    node: str
    status: str = RankStatus.CREATED
    desired: str = Desired.RUN
    exit_code: int | None = None


@dataclass(frozen=True)
class JobView:
    id: int
    user: str
    nodes: int
    priority: int = 10
    status: str = JobStatus.QUEUED
    first_id: int = 0          # 0: the job is its own chain's first attempt
    group: str | None = None
    procs_per_node: int = 0
    stop_requested: int = 0
    stop_code: int = 0
    assigned_nodes: tuple[str, ...] = ()
    ranks: tuple[RankView, ...] = ()
    reason: str = ""
    submitted_priority: int = 10      # what the user asked; AUTO (-1) for "auto"
    created_at: float = 0.0           # this attempt's creation (its queue entry)
    submitted_at: float = 0.0         # the chain's first submission
    started_at: float | None = None   # this attempt started (scheduled_at); None while queued
    chain_run_s: float = 0.0          # run time of the chain's earlier attempts
    time_limit: float = 0.0           # each attempt's run time limit, 0 = none
    watchdog: float = 0.0             # no output for this long -> hung; 0 = off
    last_output: float = 0.0          # newest output of any rank (ts), 0 = none
    last_checkpoint: float = 0.0      # newest reported checkpoint (ts), 0 = never
    restart_count: int = 0
    held: bool = False                # queued but not scheduled until released
    after: tuple[int, ...] = ()       # chain ids that must have ended (any way) first
    after_ok: tuple[int, ...] = ()    # chain ids that must have succeeded first
    array_id: int | None = None       # a job array's task: the array (its first task's chain id)
    array_throttle: int = 0           # at most this many of the array's tasks hold nodes (0: no limit)

    @property
    def rank_key(self) -> int:
        return self.first_id or self.id


@dataclass(frozen=True)
class QuotaView:
    subject: str               # user:NAME | group:NAME
    max_nodes: int
    priority: int | None = None  # None: counts every priority


@dataclass(frozen=True)
class Snapshot:
    now: float
    jobs: tuple[JobView, ...] = ()      # live attempts (queued, scheduled, running, stopping)
    nodes: tuple[NodeView, ...] = ()
    quotas: tuple[QuotaView, ...] = ()
    #: the latest attempt's status of every chain a queued attempt depends on (absent: no such chain)
    chains: dict[int, str] = field(default_factory=dict)
    disabled: frozenset[str] = frozenset()   # users whose queued jobs do not start
    #: of each job array a queued attempt depends on (by its array id): every task's chain -> the
    #: status of its latest attempt (see :func:`array_status`)
    arrays: dict[int, dict[int, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class PolicyConfig:
    heartbeat_timeout: float = 10.0
    min_run_time: float = 300.0       # a running attempt is not preempted before it ran this long
    demote_after: float = 1800.0      # ABOVE_NORMAL -> NORMAL after this much chain run time
    max_node_requeues: int = 10       # a lost node re-queues the attempt while restart_count < this
    reservations: int = 16            # how many blocked attempts get a backfill reservation
    cross_zone_jobs: int = 1          # running attempts that may span zones at a time
    seed: int = 0                     # reference-fifo's random node choice
    #: backfill's estimate of a running attempt's length when it has no time limit (as a Slurm
    #: partition's MaxTime): with no estimate at all nothing could be reserved, and a big attempt
    #: could wait forever behind a stream of small ones without limits (see [Note: unknown ends])
    default_time_limit: float = 7 * 86400.0


# -- the decisions --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Decision:
    pass


@dataclass(frozen=True)
class MarkNode(Decision):
    node: str
    state: str
    reason: str = ""


@dataclass(frozen=True)
class MarkRanksLost(Decision):
    job_id: int
    node: str


@dataclass(frozen=True)
class MarkRunning(Decision):
    job_id: int


@dataclass(frozen=True)
class StartJob(Decision):
    job_id: int
    nodes: tuple[str, ...]
    ranks: tuple[tuple[int, str, int], ...]   # (rank, node, local_rank)
    priority: int | None = None               # the effective level it starts at (AUTO resolved)


@dataclass(frozen=True)
class StopJob(Decision):
    job_id: int
    code: int
    desired: str = Desired.STOP  # stop | suspend (the agent signals a suspend first)
    reason: str = ""


@dataclass(frozen=True)
class CancelJob(Decision):
    job_id: int
    reason: str = "canceled while queued"


@dataclass(frozen=True)
class FinishJob(Decision):
    job_id: int
    status: str
    stop_code: int
    exit_code: int | None
    reason: str = ""
    requeue: bool = False       # a suspended attempt: insert the chain's next attempt


@dataclass(frozen=True)
class SetReason(Decision):
    job_id: int
    reason: str


@dataclass(frozen=True)
class SetPriority(Decision):
    """The effective level of a queued or running attempt changes (AUTO resolution, demotion)."""

    job_id: int
    priority: int
    reason: str = ""


@dataclass(frozen=True)
class DrainNode(Decision):
    """Drain a node (one lost under a running attempt), so nothing new is placed on it."""

    node: str
    reason: str = ""


# -- phases ---------------------------------------------------------------------------------------

def node_health(snap: Snapshot, cfg: PolicyConfig) -> list[Decision]:
    """Nodes that stopped heartbeating are lost (an agent's registration brings them back)."""
    out: list[Decision] = []
    for n in snap.nodes:
        if n.state == NodeState.UP and snap.now - n.last_seen > cfg.heartbeat_timeout:
            out.append(MarkNode(n.name, NodeState.LOST, f"no heartbeat for {snap.now - n.last_seen:.1f} s "
                                                        f"(timeout {cfg.heartbeat_timeout:g} s)"))
    return out


def _final_status(job: JobView, ranks: Iterable[RankView]) -> tuple[str, int | None]:
    ranks = list(ranks)
    # the job's exit code is the first rank that failed on its own, not a rank the scheduler then
    # killed (SIGTERM: -15) to stop the job
    failed = [r.exit_code for r in ranks if r.status == RankStatus.FAILED and r.exit_code not in (None, 0)]
    codes = failed or [r.exit_code for r in ranks if r.exit_code not in (None, 0)]
    exit_code = codes[0] if codes else (0 if ranks and all(r.exit_code == 0 for r in ranks) else None)
    code = job.stop_code
    if code & StopCode.INTERRUPT:
        return JobStatus.SUSPENDED, exit_code
    if code & (StopCode.NODE_LOST | StopCode.FAILED | StopCode.INIT_FAILED | StopCode.TIMEOUT | StopCode.HUNG):
        return JobStatus.FAILED, exit_code
    if code & (StopCode.MANUAL_STOP | StopCode.STOP):
        return JobStatus.STOPPED, exit_code
    if any(r.status != RankStatus.SUCCEEDED for r in ranks):
        return JobStatus.FAILED, exit_code
    return JobStatus.SUCCEEDED, exit_code


def hms(seconds: float) -> str:
    """Seconds as H:MM:SS."""
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _limit(job: JobView, cfg: PolicyConfig, now: float) -> tuple[int, str, str] | None:
    """The wall-clock limit and the hang watchdog of a started attempt: (code, desired, reason) or None."""
    if job.started_at is None:
        return None
    # [Note: a limit per attempt] as Slurm's --time: a resumed attempt (after a preemption or a lost
    # node) gets the whole limit again, so the run time lost to preemption is never held against it
    if job.time_limit > 0 and now - job.started_at >= job.time_limit:
        return StopCode.TIMEOUT, Desired.STOP, f"time limit {hms(job.time_limit)} reached"
    if job.watchdog > 0 and now - max(job.last_output, job.started_at) > job.watchdog:
        return StopCode.HUNG, Desired.STOP, f"no output for {job.watchdog:g} s (watchdog)"
    return None


def reconcile(snap: Snapshot, cfg: PolicyConfig, lost_nodes: set[str]) -> list[Decision]:
    """Move attempts that hold nodes along their lifecycle; cancel stopped queued ones.

    A node lost under an attempt drains the node and ends the attempt ``suspended`` (stop code
    NODE_LOST|INTERRUPT, re-queued to resume from its checkpoint) while its chain has restarted fewer
    than ``max_node_requeues`` times, else ``failed``. A started attempt past its time limit or
    silent for longer than its watchdog is stopped and ends ``failed`` (TIMEOUT / HUNG)."""
    out: list[Decision] = []
    for job in snap.jobs:
        if job.status == JobStatus.QUEUED:
            if job.stop_requested:
                out.append(CancelJob(job.id))
            continue
        if job.status not in JobStatus.ACTIVE:
            continue
        ranks = {r.rank: r for r in job.ranks}
        stop_code = job.stop_code
        stopping = job.status == JobStatus.STOPPING
        # ranks on a lost node are lost
        for node in sorted({r.node for r in ranks.values() if r.node in lost_nodes
                            and r.status not in RankStatus.DONE}):
            out.append(MarkRanksLost(job.id, node))
            out.append(DrainNode(node, f"node {node} lost under job {job.id}"))
            for k, r in ranks.items():
                if r.node == node and r.status not in RankStatus.DONE:
                    ranks[k] = RankView(r.rank, r.node, RankStatus.LOST, r.desired, r.exit_code)
        views = list(ranks.values())
        lost_at = sorted({r.node for r in views if r.status == RankStatus.LOST})
        if not stopping:
            why = None
            if lost_at and job.restart_count < cfg.max_node_requeues:
                why = (StopCode.NODE_LOST | StopCode.INTERRUPT, Desired.STOP,
                       f"node {','.join(lost_at)} lost; re-queued")
            elif lost_at:
                why = (StopCode.NODE_LOST, Desired.STOP, f"node {','.join(lost_at)} lost "
                                                         f"(after {job.restart_count} restarts)")
            elif any(r.status == RankStatus.FAILED for r in views):
                failed = next(r for r in views if r.status == RankStatus.FAILED)
                why = (StopCode.FAILED, Desired.STOP, f"rank {failed.rank} failed (exit code {failed.exit_code})")
            elif job.stop_requested:
                desired = Desired.SUSPEND if job.stop_requested & StopCode.INTERRUPT else Desired.STOP
                why = (job.stop_requested, desired, "suspend requested" if desired == Desired.SUSPEND
                       else "stop requested")
            else:
                why = _limit(job, cfg, snap.now)
            if why is not None and not (views and all(r.status in RankStatus.DONE for r in views)):
                out.append(StopJob(job.id, why[0], why[1], why[2]))
                continue
            if why is not None and why[0] & (StopCode.NODE_LOST | StopCode.FAILED):
                stop_code |= why[0]   # a failure seen only now; a late stop request or limit changes nothing
        if views and all(r.status in RankStatus.DONE for r in views):
            done = JobView(**{**job.__dict__, "stop_code": stop_code})
            status, exit_code = _final_status(done, views)
            # [Note: why an attempt ended] the restart history (``hai status``) shows each attempt's
            # reason: keep the StopJob's own words (who preempted it, which limit, which rank failed)
            said = job.reason if stopping and job.reason else ""
            if status == JobStatus.SUSPENDED:
                reason = (f"node {','.join(lost_at)} lost; re-queued" if stop_code & StopCode.NODE_LOST
                          else f"{said or 'suspended'}; the chain continues in a new attempt")
            elif status == JobStatus.SUCCEEDED:
                reason = "every rank exited 0"
            else:
                reason = said or StopCode.describe(stop_code)
            out.append(FinishJob(job.id, status, stop_code, exit_code, reason,
                                 requeue=status == JobStatus.SUSPENDED))
            continue
        if job.status == JobStatus.SCHEDULED and views and all(
                r.status in (RankStatus.RUNNING, *RankStatus.DONE) for r in views):
            out.append(MarkRunning(job.id))
    return out


def held_reason(chain: int) -> str:
    """The waiting reason of a held chain (it says how to release it)."""
    return f"held (hai release {chain})"


#: (prefix of a reason, the kind shown in its place) for :func:`reason_kind`, first match wins
_REASON_KINDS = (("held", "held"), ("user ", "waiting: user disabled"), ("out_of_quota", "waiting: quota"),
                 ("quota_exceeded", "waiting: quota"), ("dependency failed", "dependency failed"),
                 ("dependency", "waiting: dependency"), ("array throttle", "waiting: array throttle"),
                 ("preempted", "preempted"), ("preempting", "preempting"), ("reserved", "waiting: reserved"),
                 ("waiting", "waiting for nodes"), ("re-queued", "re-queued"), ("resumed", "resumed"))


def reason_kind(reason: str | None) -> str:
    """A reason without its particulars (who is disabled, whose quota, who preempted): what
    ``GET /v1/queue`` shows for other users' jobs under ``queue_visibility = "hide-others"``.

    [Note: a whitelist of kinds] Reasons are free text built in many places and several name a
    user; mapping known prefixes to fixed words (and anything else to "waiting") cannot leak a
    name a future reason adds."""
    if not reason:
        return ""
    for prefix, kind in _REASON_KINDS:
        if reason.startswith(prefix):
            return kind
    return "waiting"


def dependency(job: JobView, chains: dict[int, str],
               arrays: dict[int, dict[int, str]] | None = None) -> tuple[bool, str | None]:
    """(cancel, reason): whether ``job``'s dependencies can never be met (an ``after_ok`` chain ended
    otherwise than succeeded: cancel with the reason), else the one it still waits for (None: met).

    ``after`` is Slurm's afterany: any end will do, and a chain that does not exist (any more) counts
    as ended; ``after_ok`` needs SUCCEEDED. ``arrays``: the tasks (chain -> status) of each array a
    dependency names by its id (``chains`` holds the array's :func:`array_status`), for the reasons."""
    arrays = arrays or {}
    for c in job.after_ok:
        st = chains.get(c)
        if st is None:
            return True, f"dependency failed: job {c} does not exist"
        if st in JobStatus.ENDED and st != JobStatus.SUCCEEDED:
            bad = next((t for t, ts in arrays.get(c, {}).items() if ts == st), None)
            return True, (f"dependency failed: job {c} ended {str(st).upper()}" if bad is None else
                          f"dependency failed: array {c}: task {bad} ended {str(st).upper()}")
    for c in (*job.after, *job.after_ok):
        st = chains.get(c)
        if st is not None and st not in JobStatus.ENDED:
            tasks = arrays.get(c)
            if tasks:
                left = sum(ts not in JobStatus.ENDED for ts in tasks.values())
                return False, f"dependency: waits for array {c} ({left} of {len(tasks)} tasks not ended)"
            return False, f"dependency: waits for job {c}"
    return False, None


def array_status(tasks: Iterable[str]) -> str:
    """A job array's status as a dependency (Slurm's): live while any task is (its status), else
    the first task status that is not SUCCEEDED (an after_ok dependent fails), else SUCCEEDED."""
    tasks = list(tasks)
    live = [t for t in tasks if t not in JobStatus.ENDED]
    if live:
        return live[0]
    return next((t for t in tasks if t != JobStatus.SUCCEEDED), JobStatus.SUCCEEDED)


def gate(snap: Snapshot, ended: dict[int, str] | None = None) -> tuple[dict[int, str], list[Decision]]:
    """The queued attempts that may not start this cycle whatever the nodes (attempt id -> why it
    waits: held, its user disabled, a dependency not met yet), and a :class:`CancelJob` for each whose
    ``after_ok`` dependency can never be met. Gated attempts leave the queue for this cycle: they
    take no queue position and block nothing behind them (strict order included). ``ended``: chains
    that end in this very cycle (chain id -> status), so their dependents move on at once."""
    chains = {**snap.chains, **ended} if ended else snap.chains
    arrays: dict[int, dict[int, str]] = {}
    if snap.arrays:  # [Note: a dependency on an array] its id waits for (or fails on) every task
        chains = dict(chains)
        for a, tasks in snap.arrays.items():
            arrays[a] = {c: (ended or {}).get(c, st) for c, st in tasks.items()}
            chains[a] = array_status(arrays[a].values())
    waits: dict[int, str] = {}
    out: list[Decision] = []
    for j in snap.jobs:
        if j.status != JobStatus.QUEUED or j.stop_requested:
            continue
        cancel, why = dependency(j, chains, arrays) if (j.after or j.after_ok) else (False, None)
        if cancel:
            out.append(CancelJob(j.id, why or "dependency failed"))
        elif j.held:
            waits[j.id] = held_reason(j.rank_key)
        elif j.user in snap.disabled:
            waits[j.id] = f"user {j.user} is disabled"
        elif why:
            waits[j.id] = why
    return waits, out


def queue_sort(jobs: Iterable[JobView]) -> list[JobView]:
    """Queued attempts, highest priority first, then by the chain's first submission."""
    return sorted((j for j in jobs if j.status == JobStatus.QUEUED and not j.stop_requested),
                  key=lambda j: (-j.priority, j.rank_key, j.id))


def _subjects(user: str, group: str | None) -> set[str]:
    """The quota subjects that apply to a job of ``user`` (and ``group``)."""
    return {f"user:{user}"} | ({f"group:{group}"} if group else set())


def _quotas_for(job: JobView, quotas: Iterable[QuotaView]) -> list[QuotaView]:
    subjects = _subjects(job.user, job.group)
    return [q for q in quotas if q.subject in subjects and (q.priority is None or q.priority == job.priority)]


def _quota_usage_key(q: QuotaView) -> tuple[str, int | None]:
    return (q.subject, q.priority)


def quota_filter(job: JobView, quotas: Iterable[QuotaView], usage: dict) -> str | None:
    """None when ``job`` fits its quotas, else the reason it waits."""
    for q in _quotas_for(job, quotas):
        if job.nodes > q.max_nodes:
            return (f"quota_exceeded: asks {job.nodes} nodes, quota {q.subject}"
                    f"{'' if q.priority is None else f' at priority {q.priority}'} is {q.max_nodes}")
        used = usage.get(_quota_usage_key(q), 0)
        if used + job.nodes > q.max_nodes:
            return (f"out_of_quota: {q.subject}{'' if q.priority is None else f' at priority {q.priority}'} "
                    f"uses {used} of {q.max_nodes} nodes")
    return None


def _charge(job: JobView, quotas: Iterable[QuotaView], usage: dict) -> None:
    for q in _quotas_for(job, quotas):
        k = _quota_usage_key(q)
        usage[k] = usage.get(k, 0) + job.nodes


def rank_layout(job: JobView, nodes: tuple[str, ...], node_views: dict[str, NodeView]
                ) -> tuple[tuple[int, str, int], ...]:
    """(rank, node, local_rank) for each process: ``procs_per_node`` (default: the first node's GPUs, or 1)
    processes on each node, ranks node by node."""
    ppn = job.procs_per_node or max(1, node_views[nodes[0]].gpus)
    return tuple((i * ppn + lr, node, lr) for i, node in enumerate(nodes) for lr in range(ppn))


# -- the free nodes of one cycle ------------------------------------------------------------------

INF = math.inf
NORMAL = PRIORITIES["normal"]
ABOVE_NORMAL = PRIORITIES["above_normal"]
_PREEMPTED_BY = re.compile(r"preempted by job (\d+)\b")


def _fill(n: int, usable: dict[str, list[str]], leaves: Iterable[str]) -> list[str]:
    """``n`` nodes from ``leaves`` in as few leaves as possible: whole leaves, fullest first, then the
    remainder from the leaf with the fewest usable nodes that holds it (so no other leaf is broken)."""
    order = sorted(leaves, key=lambda leaf: (-len(usable[leaf]), leaf))
    picked: list[str] = []
    rest = []
    for leaf in order:
        if n - len(picked) >= len(usable[leaf]):
            picked += sorted(usable[leaf])
        else:
            rest.append(leaf)
        if len(picked) == n:
            return picked
    need = n - len(picked)
    _, leaf = min((len(usable[leaf]), leaf) for leaf in rest if len(usable[leaf]) >= need)
    return picked + sorted(usable[leaf])[:need]


def place_topology(n: int, usable: dict[str, list[str]], leaf_zone: dict[str, str], leaf_size: int,
                   cross_ok: bool) -> tuple[tuple[str, ...] | None, str]:
    """Choose ``n`` of the ``usable`` nodes (by leaf) as the topology rules say: (nodes, "") or (None, why).

    A job of at most ``leaf_size`` nodes goes inside one leaf, the leaf with the fewest usable nodes
    that holds it (best fit: larger holes stay whole for larger jobs; why "leaf"); a bigger one inside
    one zone, the zone with the fewest usable nodes that holds it, filling leaves; only when no zone
    holds it and ``cross_ok`` (a cross-zone slot is free) across zones, fullest zones first (why
    "cross"). Why "nodes": fewer than ``n`` usable nodes in all."""
    total = sum(len(v) for v in usable.values())
    if total < n:
        return None, "nodes"
    if n <= leaf_size:
        best = min(((len(v), leaf) for leaf, v in usable.items() if len(v) >= n), default=None)
        if best is None:
            return None, "leaf"
        return tuple(sorted(usable[best[1]])[:n]), ""
    zones: dict[str, list[str]] = defaultdict(list)
    for leaf in usable:
        zones[leaf_zone.get(leaf, "")].append(leaf)
    counts = {z: sum(len(usable[leaf]) for leaf in leaves) for z, leaves in zones.items()}
    fits = [(c, z) for z, c in counts.items() if c >= n]
    if fits:
        return tuple(_fill(n, usable, zones[min(fits)[1]])), ""
    if not cross_ok:
        return None, "cross"
    picked: list[str] = []
    for _, z in sorted((-c, z) for z, c in counts.items()):
        need = n - len(picked)
        picked += _fill(min(need, counts[z]), usable, zones[z])
        if len(picked) == n:
            break
    return tuple(picked), ""


class Pool:
    """The ready nodes not taken yet in one cycle, by leaf, with the backfill reservations on them.

    [Note: incremental counts] A cycle builds the free sets once and removes the nodes each decision
    takes, so a placement reads per-leaf sets instead of rescanning 1,250 nodes per queued job."""

    def __init__(self, nodes: Iterable[NodeView], free: Iterable[str]) -> None:
        self.views: dict[str, NodeView] = {}
        self.leaf_of: dict[str, str] = {}
        self.leaf_zone: dict[str, str] = {}
        size: dict[str, int] = defaultdict(int)
        for n in nodes:
            self.views[n.name] = n
            self.leaf_of[n.name] = n.leaf
            self.leaf_zone[n.leaf] = n.zone
            size[n.leaf] += 1
        self.leaf_size = max(size.values(), default=0)
        self.zone_of: dict[str, str] = {x: self.leaf_zone[leaf] for x, leaf in self.leaf_of.items()}
        zsize: dict[str, int] = defaultdict(int)
        for z in self.zone_of.values():
            zsize[z] += 1
        self.zone_size = max(zsize.values(), default=0)
        self.by_leaf: dict[str, set[str]] = defaultdict(set)
        for x in free:
            self.by_leaf[self.leaf_of[x]].add(x)
        self.count = sum(len(v) for v in self.by_leaf.values())
        #: node -> the reserved start (a backfill reservation) that needs it; free nodes only matter
        self.res_t: dict[str, float] = {}

    def take(self, names: Iterable[str]) -> None:
        for x in names:
            s = self.by_leaf.get(self.leaf_of.get(x, ""))
            if s is not None and x in s:
                s.discard(x)
                self.count -= 1

    def names(self) -> list[str]:
        return sorted(x for s in self.by_leaf.values() for x in s)

    def usable(self, end: float = -INF) -> dict[str, list[str]]:
        """leaf -> the free nodes an attempt expected to end at ``end`` may take: none that a
        reservation needs before then (``end=INF``: no reserved node at all)."""
        res = self.res_t
        out: dict[str, list[str]] = {}
        for leaf, s in self.by_leaf.items():
            if s:
                v = [x for x in s if res.get(x, INF) >= end] if res else list(s)
                if v:
                    out[leaf] = v
        return out


def _zones_of(names: Iterable[str], views: dict[str, NodeView]) -> int:
    return len({views[x].zone for x in names if x in views})


# -- plugins --------------------------------------------------------------------------------------
# [Note: plugins] The queue phases are small named plugins over one cycle's state, as in the
# Kubernetes scheduling framework: a queue sort orders the queued attempts; each filter answers
# one attempt with a typed Status (and the reason an attempt waits); a score plugin picks the nodes
# of an attempt the filters let through; a preemption plugin frees nodes for an attempt that did not
# get any; a reservation plugin holds nodes for a blocked attempt against later ones (backfill).
# A Profile is one composition of them: PROFILES["fireflyer"] (DEFAULT_PROFILE) and
# PROFILES["reference-fifo"].

class Code(StrEnum):
    """A plugin's verdict on one attempt."""

    SUCCESS = "success"
    UNSCHEDULABLE = "unschedulable"  # held back by its own limits (a quota): the queue goes on behind it
    WAIT = "wait"                    # no room for it now: in strict order, nothing behind it starts


@dataclass(frozen=True)
class Status:
    code: Code = Code.SUCCESS
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.code == Code.SUCCESS


SUCCESS = Status()


@dataclass
class CycleState:
    """What the queue's plugins see and update during one cycle."""

    snap: Snapshot
    pool: Pool                           # ready nodes not taken yet
    usage: dict = field(default_factory=dict)  # (quota subject, priority) -> nodes charged
    blocked: bool = False                # an attempt ahead could not get nodes (strict order)
    cfg: PolicyConfig = field(default_factory=PolicyConfig)
    rng: random.Random = field(default_factory=random.Random)  # seeded from cfg.seed by plan()
    ready: set[str] = field(default_factory=set)     # up, not drained, not lost
    active: list[JobView] = field(default_factory=list)  # attempts holding nodes (effective priority)
    stopping: set[int] = field(default_factory=set)  # attempts stopping, or told to stop this cycle
    cross_used: int = 0                  # running attempts that span zones
    out: list[Decision] = field(default_factory=list)  # decisions of the plugins (preemptions)
    claimed: set[str] = field(default_factory=set)   # held nodes promised to a preemptor or a reservation
    scratch: dict = field(default_factory=dict)      # per-plugin state for this cycle, by plugin name
    array_running: dict[int, int] = field(default_factory=dict)  # array id -> its tasks holding nodes

    def expected_end(self, job: JobView) -> float:
        """When ``job`` would end if started now (or started at ``started_at``): its time limit (per
        attempt), or ``default_time_limit`` without one (INF when that is 0)."""
        limit = job.time_limit if job.time_limit > 0 else self.cfg.default_time_limit
        if limit <= 0:
            return INF
        return (job.started_at if job.started_at is not None else self.snap.now) + limit


class QueueSortPlugin(Protocol):
    name: str

    def sort(self, jobs: Iterable[JobView]) -> list[JobView]: ...


class FilterPlugin(Protocol):
    name: str

    def filter(self, job: JobView, cs: CycleState) -> Status: ...


class ScorePlugin(Protocol):
    name: str

    def place(self, job: JobView, cs: CycleState) -> tuple[Status, tuple[str, ...] | None]: ...


class PreemptPlugin(Protocol):
    name: str

    def prepare(self, cs: CycleState, queue: list[JobView]) -> None: ...

    def preempt(self, job: JobView, cs: CycleState) -> Status | None: ...


class ReservePlugin(Protocol):
    name: str

    def open(self, cs: CycleState) -> bool: ...

    def reserve(self, job: JobView, cs: CycleState) -> str | None: ...


@dataclass(frozen=True)
class PrioritySort:
    """:func:`queue_sort`: priority (high first), then the chain's first submission."""

    name: str = "priority_sort"

    def sort(self, jobs: Iterable[JobView]) -> list[JobView]:
        return queue_sort(jobs)


@dataclass(frozen=True)
class ArrayThrottle:
    """A job array's ``%N``: at most N of its tasks hold nodes at once; a task over it waits without
    blocking others (``CycleState.array_running`` counts the tasks holding nodes, started ones included)."""

    name: str = "array_throttle"

    def filter(self, job: JobView, cs: CycleState) -> Status:
        if job.array_id is None or job.array_throttle <= 0:
            return SUCCESS
        n = cs.array_running.get(job.array_id, 0)
        if n < job.array_throttle:
            return SUCCESS
        return Status(Code.UNSCHEDULABLE, f"array throttle: {n} of array {job.array_id} running "
                                          f"(at most {job.array_throttle})")


@dataclass(frozen=True)
class QuotaFilter:
    """:func:`quota_filter`: an attempt over its user's or group's quota waits, without blocking others."""

    name: str = "quota"

    def filter(self, job: JobView, cs: CycleState) -> Status:
        if not cs.snap.quotas:
            return SUCCESS
        why = quota_filter(job, cs.snap.quotas, cs.usage)
        return SUCCESS if why is None else Status(Code.UNSCHEDULABLE, why)


@dataclass(frozen=True)
class StrictOrder:
    """[Note: strict order] nothing starts behind an attempt that could not get nodes."""

    name: str = "strict_order"

    def filter(self, job: JobView, cs: CycleState) -> Status:
        return Status(Code.WAIT, _needs(job.nodes, cs.pool.count)) if cs.blocked else SUCCESS


def _needs(n: int, free: int) -> str:
    return f"{WAITING}: needs {n}, {free} free"


def _why(kind: str, n: int, free: int) -> str:
    return {"leaf": f"waiting for {n} free nodes in one leaf",
            "cross": "waiting for a cross-zone slot"}.get(kind) or _needs(n, free)


@dataclass(frozen=True)
class TopologyScore:
    """:func:`place_topology` over the free nodes the attempt may take: none a backfill reservation
    needs before the attempt's expected end; a cross-zone placement only while a slot is free.

    [Note: failure cache] Nodes are only taken during a cycle, never given back, so an attempt that
    found no place rules out every later one at least as big that ends no earlier (within one size
    class: a leaf-sized job, or bigger); the 10,000-job queue then costs a comparison per job."""

    name: str = "topology"

    def place(self, job: JobView, cs: CycleState) -> tuple[Status, tuple[str, ...] | None]:
        pool = cs.pool
        n = job.nodes
        if n > pool.count:
            return Status(Code.WAIT, _needs(n, pool.count)), None
        end = cs.expected_end(job)
        big = n > pool.leaf_size
        fails = cs.scratch.setdefault(self.name, [])
        for fb, fn, fe, kind, tot in fails:
            if fb == big and n >= fn and (end >= fe or not pool.res_t):
                return Status(Code.WAIT, _why("nodes" if n > tot else kind, n, tot)), None
        usable = pool.usable(end)
        chosen, kind = place_topology(n, usable, pool.leaf_zone, pool.leaf_size,
                                      cs.cross_used < cs.cfg.cross_zone_jobs)
        if chosen is None:
            tot = sum(len(v) for v in usable.values())
            if len(fails) < 64:
                fails.append((big, n, end, kind, tot))
            return Status(Code.WAIT, _why(kind, n, tot)), None
        return SUCCESS, chosen


@dataclass(frozen=True)
class RandomScore:
    """The reference matcher's placement: random free nodes (seeded by ``PolicyConfig.seed``), no topology."""

    name: str = "random"

    def place(self, job: JobView, cs: CycleState) -> tuple[Status, tuple[str, ...] | None]:
        if cs.pool.count < job.nodes:
            return Status(Code.WAIT, _needs(job.nodes, cs.pool.count)), None
        return SUCCESS, tuple(sorted(cs.rng.sample(cs.pool.names(), job.nodes)))


def _preempted_reason(job: JobView) -> str:
    return f"preempted by job {job.id} (user {job.user}, priority {job.priority})"


def _preempting(ids: Iterable[int]) -> str:
    ids = sorted(ids)
    return f"preempting job{'s' if len(ids) > 1 else ''} {', '.join(map(str, ids))}"


def _fewest(cands: list[tuple[JobView, int]], need: int) -> list[JobView]:
    """The fewest victims (of ``cands``: (victim, nodes it frees), in rank order) that free ``need``
    nodes, preferring earlier-ranked ones: a victim is taken when, with it, the slots left can still
    be filled by the biggest ones after it."""
    if len(cands) > 64:   # a long list: the greedy prefix in rank order (bounded work per cycle)
        out, got = [], 0
        for v, k in cands:
            out.append(v)
            got += k
            if got >= need:
                return out
        return out
    gains = sorted((k for _, k in cands), reverse=True)
    slots, got = 0, 0
    while got < need:
        got += gains[slots]
        slots += 1
    if gains[0] == gains[-1]:   # all free as many nodes (most often one each): the first ones in rank order
        return [v for v, _ in cands[:slots]]
    out, left = [], need
    for i, (v, k) in enumerate(cands):
        if left <= 0:
            break
        rest = sorted((k2 for _, k2 in cands[i + 1:]), reverse=True)[:slots - 1]
        if k + sum(rest) >= left:
            out.append(v)
            left -= k
            slots -= 1
    return out


@dataclass(frozen=True)
class LeastWorkLost:
    """Preemption: free the nodes a blocked attempt needs by suspending lower-priority attempts.

    Only a strictly higher effective priority preempts (so never a job of the same user at the same
    priority), and only attempts that have run ``min_run_time``. Victims are ranked by the work they
    would lose (now - max(last checkpoint, start)), then the lowest priority, then the newest; for each
    leaf (a leaf-sized job), zone (a bigger one) or, with a cross-zone slot free, the whole cluster,
    the fewest victims in that order that make room, and the group needing the fewest wins.

    [Note: victims are reserved] A victim's nodes are the preemptor's: while its victims are stopping
    (their reason "preempted by job N"), the preemptor picks no more victims, waits for them, and keeps
    the free nodes its placement needs from every later attempt."""

    name: str = "least_work_lost"

    def prepare(self, cs: CycleState, queue: list[JobView]) -> None:
        now, cfg = cs.snap.now, cs.cfg
        pending: dict[int, list[JobView]] = defaultdict(list)
        cands = []
        for j in cs.active:
            if j.status == JobStatus.STOPPING:
                m = _PREEMPTED_BY.match(j.reason)
                if m:
                    pending[int(m.group(1))].append(j)
            elif j.id not in cs.stopping and j.started_at is not None and now - j.started_at >= cfg.min_run_time:
                # the work it would lose: node-seconds since its last checkpoint (or its start)
                lost = (now - max(j.last_checkpoint, j.started_at)) * max(1, len(j.assigned_nodes))
                cands.append(((lost, j.priority, -j.rank_key), j))
        cands.sort(key=lambda c: c[0])
        # the ready nodes each victim would free, by leaf, zone and in all (computed once per cycle)
        per: dict[str, dict[int, tuple[tuple[str, int], ...]]] = {"leaf": {}, "zone": {}, "all": {}}
        pool = cs.pool
        for _, j in cands:
            mine = [x for x in j.assigned_nodes if x in cs.ready]
            for scope, key in (("leaf", pool.leaf_of), ("zone", pool.zone_of)):
                c: dict[str, int] = defaultdict(int)
                for x in mine:
                    c[key.get(x, "")] += 1
                per[scope][j.id] = tuple(c.items())
            per["all"][j.id] = (("", len(mine)),) if mine else ()
        cs.scratch[self.name] = {"pending": pending, "victims": [j for _, j in cands], "scans": {}, "head": 0, **per,
                                 "floor": min((j.priority for _, j in cands), default=INF),
                                 "taken": set(), "fails": []}
        # the free nodes of a waiting preemptor's placement are claimed before any attempt is placed
        # (it may sort behind higher-priority ones, which must not take them either)

    def _scan(self, st: dict, scope: str, p: int):
        """The victims below priority ``p`` by group of ``scope`` (leaf, zone, all), each list in rank
        order as (rank, victim, nodes it frees there), the nodes they free per group and the most one
        frees; built once per (scope, p) in a cycle, then kept current as victims are taken.

        [Note: one scan per level] Without it every blocked job would rescan the ~1,000 running ones."""
        key = (scope, p)
        if key not in st["scans"]:
            cands: dict[str, list[tuple[int, JobView, int]]] = defaultdict(list)
            count: dict[str, int] = defaultdict(int)
            maxgain: dict[str, int] = defaultdict(int)
            per_of, taken = st[scope], st["taken"]
            for i, v in enumerate(st["victims"]):
                if v.priority >= p or v.id in taken:
                    continue   # strictly lower only: never a job of the preemptor's user at its priority
                for g, k in per_of[v.id]:
                    cands[g].append((i, v, k))
                    count[g] += k
                    maxgain[g] = max(maxgain[g], k)
            st["scans"][key] = (cands, count, maxgain)
        return st["scans"][key]

    def preempt(self, job: JobView, cs: CycleState) -> Status | None:
        st = cs.scratch[self.name]
        pool = cs.pool
        end = cs.expected_end(job)
        if job.id in st["pending"]:
            victims = st["pending"][job.id]
            extra = [x for v in victims for x in v.assigned_nodes if x in cs.ready]
            cs.claimed.update(extra)
            usable = pool.usable(end)
            for x in extra:
                usable.setdefault(pool.leaf_of.get(x, ""), []).append(x)
            cross_ok = cs.cross_used < cs.cfg.cross_zone_jobs or any(
                _zones_of(v.assigned_nodes, pool.views) > 1 for v in victims)   # it takes a victim's slot
            chosen, _ = place_topology(job.nodes, usable, pool.leaf_zone, pool.leaf_size, cross_ok)
            if chosen is not None:
                pool.take(chosen)
            return Status(Code.WAIT, _preempting(v.id for v in victims))
        p, n = job.priority, job.nodes
        if p <= st["floor"]:
            return None
        big = n > pool.leaf_size
        for fp, fb, fn, fe in st["fails"]:
            if fp >= p and fb == big and n >= fn and (end >= fe or not pool.res_t):
                return None
        now = cs.snap.now
        usable = pool.usable(end)
        leaf_zone, leaf_of, zone_of = pool.leaf_zone, pool.leaf_of, pool.zone_of
        scopes = ["zone", "all"] if big and cs.cross_used < cs.cfg.cross_zone_jobs else ["zone"] if big else ["leaf"]
        taken = st["taken"]
        best = None
        for scope in scopes:
            have: dict[str, int] = defaultdict(int)
            for leaf, v in usable.items():
                have[leaf if scope == "leaf" else "" if scope == "all" else leaf_zone.get(leaf, "")] += len(v)
            # one victim that makes room alone, the first in rank order: nothing beats it (most often
            # among the first few victims: look there before going group by group)
            single = None
            victims, per_of = st["victims"], st[scope]
            while st["head"] < len(victims) and victims[st["head"]].id in taken:
                st["head"] += 1
            for i in range(st["head"], min(st["head"] + 32, len(victims))):
                v = victims[i]
                if v.priority < p and v.id not in taken:
                    g = next((g for g, k in per_of[v.id] if k >= n - have[g]), None)
                    if g is not None:
                        single = (i, v, g)
                        break
            if single is not None:
                best = (1, 0.0, single[2], [single[1]], scope)
                break
            cands, count, maxgain = self._scan(st, scope, p)
            for g, lst in cands.items():
                need = n - have[g]
                if maxgain[g] < need or count[g] < need:
                    continue
                for i, v, k in lst:
                    if k >= need and v.id not in taken:
                        if single is None or i < single[0]:
                            single = (i, v, g)
                        break
            if single is not None:
                best = (1, 0.0, single[2], [single[1]], scope)
                break
            # the fewest victims a group needs (its biggest gains first); only the groups that need
            # the fewest are worked out victim by victim
            fewest: dict[str, int] = {}
            least_yet = INF
            for g, lst in cands.items():
                need = n - have[g]
                if count[g] >= need:
                    if maxgain[g] == 1 or -(-need // maxgain[g]) > least_yet:
                        fewest[g] = need if maxgain[g] == 1 else -(-need // maxgain[g])   # exact / a bound
                        least_yet = min(least_yet, fewest[g]) if maxgain[g] == 1 else least_yet
                        continue
                    got = k = 0
                    for gain in sorted((c[2] for c in lst if c[1].id not in taken), reverse=True):
                        got += gain
                        k += 1
                        if got >= need:
                            break
                    fewest[g] = k
                    least_yet = min(least_yet, k)
            least = min(fewest.values(), default=0)
            for g, k in fewest.items():
                if k == least:
                    chosen_v = _fewest([(v, k) for _, v, k in cands[g] if v.id not in taken], n - have[g])
                    lost = sum((now - max(v.last_checkpoint, v.started_at or now)) * len(v.assigned_nodes)
                               for v in chosen_v)
                    cand = (len(chosen_v), lost, g, chosen_v, scope)
                    if best is None or cand[:2] < best[:2]:
                        best = cand
            if best is not None:
                break
        if best is None and n > pool.zone_size and cs.cross_used >= cs.cfg.cross_zone_jobs:
            best = self._through_cross_victim(job, cs, st, usable)
        if best is None:
            if n == 1:
                st["floor"] = max(st["floor"], p)   # not one victim left below p: nothing below p can preempt
            elif len(st["fails"]) < 64:
                st["fails"].append((p, big, n, end))
            return None
        _, _, g, victims, scope = best
        grp = (lambda x: leaf_of.get(x, "")) if scope == "leaf" else \
            (lambda x: zone_of.get(x, "")) if scope == "zone" else (lambda x: "")
        # the placement: the victims' nodes, then free nodes of the group as the topology rules pick
        mine = {leaf: [x for x in xs if grp(x) == g] for leaf, xs in usable.items()}
        vn = [x for v in victims for x in v.assigned_nodes if x in cs.ready and grp(x) == g]
        for x in vn:
            mine.setdefault(leaf_of.get(x, ""), []).append(x)
        chosen, _ = place_topology(n, {k: v for k, v in mine.items() if v}, leaf_zone, pool.leaf_size,
                                   scope == "all")
        if chosen is None:   # the group's nodes are enough but not in a valid shape: no preemption
            return None
        pool.take(chosen)
        cs.claimed.update(chosen)
        reason = _preempted_reason(job)
        for v in victims:
            st["taken"].add(v.id)
            for (scope2, p2), (_, count2, _) in st["scans"].items():
                if v.priority < p2:
                    for g2, k2 in st[scope2][v.id]:
                        count2[g2] -= k2
            cs.stopping.add(v.id)
            cs.out.append(StopJob(v.id, StopCode.INTERRUPT, Desired.SUSPEND, reason))
        return Status(Code.WAIT, _preempting(v.id for v in victims))


    @staticmethod
    def _through_cross_victim(job: JobView, cs: CycleState, st: dict, usable: dict[str, list[str]]):
        """[Note: the cross-zone slot] A job bigger than a zone needs a cross-zone slot; when every
        slot is held, only suspending a victim that spans zones frees one. The first such victim in
        rank order, then victims in rank order until the nodes are enough (a rare path: a simple one)."""
        p, n, taken, views = job.priority, job.nodes, st["taken"], cs.pool.views
        below = [v for v in st["victims"] if v.priority < p and v.id not in taken]
        first = next((v for v in below if _zones_of(v.assigned_nodes, views) > 1), None)
        if first is None:
            return None
        chosen = [first]
        have = sum(len(xs) for xs in usable.values()) + sum(k for _, k in st["all"][first.id])
        for v in below:
            if have >= n:
                break
            if v is not first:
                chosen.append(v)
                have += sum(k for _, k in st["all"][v.id])
        return (len(chosen), 0.0, "", chosen, "all") if have >= n else None


@dataclass(frozen=True)
class PrefixPreempt:
    """The reference matcher's preemption: order every attempt that holds or wants nodes by priority
    then first submission; the prefix whose node counts fit the ready nodes may run; a running
    attempt outside it is suspended, a queued one outside it waits (no minimum run time)."""

    name: str = "prefix"

    def prepare(self, cs: CycleState, queue: list[JobView]) -> None:
        usage = dict(cs.usage)
        entries = [j for j in cs.active if j.status != JobStatus.STOPPING and j.id not in cs.stopping]
        for j in queue:
            if not cs.snap.quotas or quota_filter(j, cs.snap.quotas, usage) is None:
                _charge(j, cs.snap.quotas, usage)
                entries.append(j)
        entries.sort(key=lambda j: (-j.priority, j.rank_key, j.id))
        room = len(cs.ready)
        prefix: set[int] = set()
        for j in entries:
            if j.nodes > room:
                break
            room -= j.nodes
            prefix.add(j.id)
        first = next((j for j in entries if j.status == JobStatus.QUEUED and j.id in prefix), None)
        for j in cs.active:
            if j.status != JobStatus.STOPPING and j.id not in cs.stopping and j.id not in prefix:
                cs.stopping.add(j.id)
                cs.out.append(StopJob(j.id, StopCode.INTERRUPT, Desired.SUSPEND,
                                      _preempted_reason(first) if first else "suspended: no longer fits"))
        cs.scratch[self.name] = {"prefix": prefix}

    def preempt(self, job: JobView, cs: CycleState) -> Status | None:
        return None


@dataclass(frozen=True)
class PrefixFilter:
    """With :class:`PrefixPreempt`: a queued attempt outside the prefix that fits waits."""

    name: str = "prefix_filter"

    def filter(self, job: JobView, cs: CycleState) -> Status:
        return SUCCESS if job.id in cs.scratch.get("prefix", {}).get("prefix", ()) else Status(Code.WAIT, _needs(job.nodes,
                                                                                             cs.pool.count))


@dataclass(frozen=True)
class BackfillReserve:
    """Reservations for the first ``PolicyConfig.reservations`` blocked attempts (EASY/conservative
    backfill): the earliest time the running attempts' expected ends (start + time limit left; none:
    never) free enough nodes in a valid placement, and those nodes. A later attempt may take a reserved
    free node only if it is expected to end by then, so it delays no reserved start. Reservations do
    not share nodes; an attempt with no reservation (no known end frees room for it) holds nothing.

    [Note: unknown ends] An attempt without a time limit is expected to run ``default_time_limit``
    (7 days by default, as a partition's MaxTime in Slurm). Were its end unknown, nothing could be
    reserved for a big attempt behind it, and a stream of smaller attempts without limits could take
    every node that frees, forever. With the estimate, the big attempt's reservation holds the
    nodes it needs, and only attempts whose time limits end before its reserved start may use them:
    time limits are what let a job backfill, as in Slurm. ``default_time_limit = 0`` turns the
    estimate off (greedy service of what has no limit)."""

    name: str = "backfill"

    def _ends(self, cs: CycleState) -> list[tuple[float, int, list[str]]]:
        ends = cs.scratch.get(self.name)
        if ends is None:
            now = cs.snap.now
            ends = []
            for j in cs.active:
                e = now if j.status == JobStatus.STOPPING or j.id in cs.stopping else cs.expected_end(j)
                if e < INF:
                    ends.append((max(e, now), j.id, [(x, cs.pool.leaf_of.get(x, ""), cs.pool.zone_of.get(x, ""))
                                                     for x in j.assigned_nodes if x in cs.ready]))
            ends.sort()
            cs.scratch[self.name] = ends
            cs.scratch[self.name + ".n"] = 0
            # the most nodes a leaf (a zone, all) could ever offer: its free nodes and those of
            # attempts with a known end
            by_leaf: dict[str, int] = defaultdict(int)
            for leaf, xs in cs.pool.usable().items():
                by_leaf[leaf] += len(xs)
            for _, _, xs in ends:
                for _, leaf, _ in xs:
                    by_leaf[leaf] += 1
            by_zone: dict[str, int] = defaultdict(int)
            for leaf, k in by_leaf.items():
                by_zone[cs.pool.leaf_zone.get(leaf, "")] += k
            total = sum(by_leaf.values())
            cs.scratch[self.name + ".reach"] = {"leaf": max(by_leaf.values(), default=0),
                                                "zone": max(max(by_zone.values(), default=0),
                                                            total if cs.cfg.cross_zone_jobs > 0 else 0)}
        return ends

    def open(self, cs: CycleState) -> bool:
        """Whether a later blocked attempt may still get a reservation in this cycle."""
        return bool(self._ends(cs)) and cs.scratch[self.name + ".n"] < cs.cfg.reservations

    def reserve(self, job: JobView, cs: CycleState) -> str | None:
        ends = self._ends(cs)
        if cs.scratch[self.name + ".n"] >= cs.cfg.reservations or not ends:
            return None
        cs.scratch[self.name + ".n"] += 1
        pool, claimed = cs.pool, cs.claimed
        n = job.nodes
        reach = cs.scratch[self.name + ".reach"]
        if n > (reach["zone"] if n > pool.leaf_size else reach["leaf"]):
            return None   # no leaf (zone) ever frees enough nodes with known ends: no reservation
        avail: dict[str, list[str]] = {leaf: [x for x in xs if x not in claimed]
                                       for leaf, xs in pool.usable().items()}
        big = n > pool.leaf_size
        zone = pool.leaf_zone
        count: dict[str, int] = defaultdict(int)   # by leaf (small jobs) or zone (big ones)
        for leaf, xs in avail.items():
            count[zone.get(leaf, "") if big else leaf] += len(xs)
        total = sum(count.values())
        anywhere = n > pool.zone_size   # spans zones: any n nodes will do
        gi = 2 if big else 1
        for t, jid, xs in ends:
            hit = False
            for node in xs:   # (name, leaf, zone)
                if node[0] in claimed:
                    continue
                avail.setdefault(node[1], []).append(node[0])
                g = node[gi]
                count[g] += 1
                total += 1
                hit = hit or count[g] >= n
            if not (hit or (anywhere and total >= n)):
                continue
            chosen, _ = place_topology(n, {k: v for k, v in avail.items() if v}, zone, pool.leaf_size, True)
            if chosen is None:
                continue
            claimed.update(chosen)
            for x in chosen:
                pool.res_t[x] = min(pool.res_t.get(x, INF), t)
            return f"reserved: starts when job {jid} ends"
        return None


@dataclass(frozen=True)
class Profile:
    """One policy: a queue sort, filters (in order; the first that does not succeed decides), a score,
    and optionally a preemption and a reservation (backfill) plugin; ``demote``: ABOVE_NORMAL ages to
    NORMAL after ``PolicyConfig.demote_after`` of run time."""

    name: str
    queue_sort: QueueSortPlugin
    filters: tuple[FilterPlugin, ...]
    score: ScorePlugin
    preempt: PreemptPlugin | None = None
    reserve: ReservePlugin | None = None
    demote: bool = False


DEFAULT_PROFILE = Profile("fireflyer", PrioritySort(), (ArrayThrottle(), QuotaFilter()), TopologyScore(),
                          LeastWorkLost(), BackfillReserve(), demote=True)
REFERENCE_FIFO = Profile("reference-fifo", PrioritySort(),
                         (ArrayThrottle(), QuotaFilter(), PrefixFilter(), StrictOrder()), RandomScore(), PrefixPreempt())
#: a plain FIFO for comparison: priority then first submission, strict order, random nodes, no
#: preemption, no backfill (what "FIFO" means in the scheduling literature)
PLAIN_FIFO = Profile("fifo", PrioritySort(), (ArrayThrottle(), QuotaFilter(), StrictOrder()), RandomScore())
#: the policies by name (``[haiplatform] policy`` in the cluster file, ``hai sim --policy``)
PROFILES: dict[str, Profile] = {p.name: p for p in (DEFAULT_PROFILE, REFERENCE_FIFO, PLAIN_FIFO)}


# -- effective priority ---------------------------------------------------------------------------

def _run_s(job: JobView, now: float) -> float:
    """The chain's run time so far: earlier attempts and this one."""
    return job.chain_run_s + (now - job.started_at if job.started_at is not None and job.status in JobStatus.ACTIVE
                              else 0.0)


def auto_level(job: JobView, quotas: Iterable[QuotaView], usage: dict) -> int:
    """AUTO: the highest level at which every per-priority quota of the job's user (and group) at that
    level has room for it; NORMAL when none has (or none exists)."""
    subjects = _subjects(job.user, job.group)
    mine = [q for q in quotas if q.subject in subjects and q.priority is not None]
    for level in sorted({q.priority for q in mine}, reverse=True):
        if all(usage.get(_quota_usage_key(q), 0) + job.nodes <= q.max_nodes for q in mine if q.priority == level):
            return level
    return NORMAL


def _effective(snap: Snapshot, cfg: PolicyConfig, profile: Profile, skip: set[int]
               ) -> tuple[list[JobView], list[JobView], list[Decision], dict]:
    """The attempts holding nodes and the queued ones at their effective priority, the SetPriority
    decisions for those whose level changes, and the quota usage of the attempts holding nodes.

    An attempt's level is ``priority`` (what the applier last wrote), except: a queued AUTO attempt
    takes :func:`auto_level` (re-checked each cycle while it waits; a running one keeps its level), and
    ABOVE_NORMAL drops to NORMAL once the chain has run ``demote_after`` (when the profile ages)."""
    now = snap.now
    out: list[Decision] = []
    active: list[JobView] = []
    queued: list[JobView] = []
    usage: dict = {}
    for j in snap.jobs:
        if j.status in JobStatus.ACTIVE and j.id not in skip:
            if profile.demote and j.priority == ABOVE_NORMAL and _run_s(j, now) >= cfg.demote_after:
                out.append(SetPriority(j.id, NORMAL, f"above_normal -> normal after {hms(cfg.demote_after)} "
                                                     "of run time"))
                j = replace(j, priority=NORMAL)
            active.append(j)
            _charge(j, snap.quotas, usage)
    for j in snap.jobs:
        if j.status != JobStatus.QUEUED or j.stop_requested:
            continue
        p = auto_level(j, snap.quotas, usage) if j.submitted_priority == AUTO else j.priority
        why = "auto"
        if profile.demote and p == ABOVE_NORMAL and j.chain_run_s >= cfg.demote_after:
            p, why = NORMAL, f"above_normal -> normal after {hms(cfg.demote_after)} of run time"
        if p != j.priority:
            out.append(SetPriority(j.id, p, why))
            j = replace(j, priority=p)
        queued.append(j)
    return active, queued, out, usage


def queue_position(snap: Snapshot, cfg: PolicyConfig | None = None, profile: Profile = DEFAULT_PROFILE
                   ) -> dict[int, int]:
    """The 1-based place of each queued attempt in the order ``profile`` serves the queue (``hai list``)."""
    _, queued, _, _ = _effective(snap, cfg or PolicyConfig(), profile, set())
    waits, cancels = gate(snap)
    gone = waits.keys() | {d.job_id for d in cancels}
    return {j.id: i for i, j in enumerate(profile.queue_sort.sort(j for j in queued if j.id not in gone), 1)}


def never_fits(nodes: int, user: str, group: str | None, priority: int, node_views: Iterable[NodeView],
               quotas: Iterable[QuotaView]) -> str | None:
    """Why a submission of ``nodes`` nodes can never run (the API refuses it), or None.

    It never runs when it asks more nodes than the cluster has, or more than a quota that applies to
    it at every level it could run at (``priority``; for AUTO: the levels of its per-priority quotas
    and NORMAL)."""
    total = sum(1 for _ in node_views)
    if nodes > total:
        return f"asks {nodes} nodes, the cluster has {total}"
    subjects = _subjects(user, group)
    mine = [q for q in quotas if q.subject in subjects]
    levels = ({q.priority for q in mine if q.priority is not None} | {NORMAL}) if priority == AUTO else {priority}
    whys = []
    for level in sorted(levels, reverse=True):
        over = [q for q in mine if (q.priority is None or q.priority == level) and nodes > q.max_nodes]
        if not over:
            return None
        q = min(over, key=lambda q: q.max_nodes)
        whys.append(f"quota {q.subject}{'' if q.priority is None else f' at priority {q.priority}'} "
                    f"is {q.max_nodes}")
    return f"asks {nodes} nodes, " + "; ".join(whys)


# -- one cycle ------------------------------------------------------------------------------------

def decide(snap: Snapshot, cfg: PolicyConfig | None = None) -> list[Decision]:
    """One scheduling cycle: every phase in order, over one snapshot."""
    return plan(snap, cfg)[0]


def plan(snap: Snapshot, cfg: PolicyConfig | None = None, profile: Profile = DEFAULT_PROFILE
         ) -> tuple[list[Decision], int]:
    """:func:`decide` with ``profile``, plus how many ready nodes are left free after its decisions."""
    cfg = cfg or PolicyConfig()
    out: list[Decision] = node_health(snap, cfg)
    lost = {n.name for n in snap.nodes if n.state != NodeState.UP} | {d.node for d in out if isinstance(d, MarkNode)}
    out += reconcile(snap, cfg, lost)
    # A suspended attempt's nodes stay held until the next cycle, when its successor (inserted by this
    # cycle's writes) is in the queue with the chain's first_id and can win them back.
    finished = {d.job_id for d in out if isinstance(d, FinishJob) and not d.requeue}
    drained = {d.node for d in out if isinstance(d, DrainNode)}
    active, queued, prio, usage = _effective(snap, cfg, profile, finished)
    out += prio
    # gate: held, disabled users' and dependent attempts wait outside the queue; a failed after_ok cancels
    chain_of = {j.id: j.rank_key for j in snap.jobs}
    waits, cancels = gate(snap, {chain_of[d.job_id]: d.status for d in out if isinstance(d, FinishJob) and not d.requeue})
    out += cancels
    gone = waits.keys() | {d.job_id for d in cancels}
    for j in queued:
        if j.id in waits and waits[j.id] != j.reason:
            out.append(SetReason(j.id, waits[j.id]))
    queued = [j for j in queued if j.id not in gone]
    held: set[str] = set()
    for j in active:
        held.update(j.assigned_nodes)
    ready = {n.name for n in snap.nodes if n.state == NodeState.UP and n.name not in lost and not n.drained
             and n.name not in drained}
    pool = Pool(snap.nodes, ready - held)
    cs = CycleState(snap, pool, usage, cfg=cfg, rng=random.Random(cfg.seed), ready=ready, active=active,
                    stopping={d.job_id for d in out if isinstance(d, StopJob)})
    cs.cross_used = sum(1 for j in active if len(j.assigned_nodes) > 1 and _zones_of(j.assigned_nodes, pool.views) > 1)
    for j in active:
        if j.array_id is not None:
            cs.array_running[j.array_id] = cs.array_running.get(j.array_id, 0) + 1
    order = profile.queue_sort.sort(queued)
    if profile.preempt is not None:
        profile.preempt.prepare(cs, order)
    pre = cs.scratch.get(getattr(profile.preempt, "name", ""), {})
    pending = pre.get("pending", {})
    # [Note: waiting preemptors first] the free nodes a waiting preemptor's placement needs are
    # claimed before the queue is walked, so no attempt (even one sorted ahead) takes them.
    early: dict[int, Status] = {}
    for job in order:
        if job.id in pending:
            st, chosen = profile.score.place(job, cs)
            if st.ok and chosen is not None:
                early[job.id] = st
                _start(job, chosen, cs, out)
            else:
                early[job.id] = profile.preempt.preempt(job, cs)
                _charge(job, snap.quotas, cs.usage)   # its quota share is held while its victims stop
    reserve_open = profile.reserve is not None
    filters = profile.filters
    for job in order:
        if job.id in early:
            status = early[job.id]
            if not status.ok and status.reason != job.reason:
                out.append(SetReason(job.id, status.reason))
            continue
        status = SUCCESS
        for f in filters:
            st = f.filter(job, cs)
            if st.code is not Code.SUCCESS:
                status = st
                break
        if status is SUCCESS:
            if pool.count == 0 and not reserve_open and job.priority <= pre.get("floor", INF):
                # [Note: nothing left to try] no free node, no victim below this level, no reservation
                # left to make: this attempt only waits
                cs.blocked = True
                why = _needs(job.nodes, 0)
                if why != job.reason:
                    out.append(SetReason(job.id, why))
                continue
            else:
                status, chosen = profile.score.place(job, cs)
                if status.ok and chosen is not None:
                    _start(job, chosen, cs, out)
                    continue
                pst = profile.preempt.preempt(job, cs) if profile.preempt is not None else None
                if pst is not None:
                    status = pst
                    _charge(job, snap.quotas, cs.usage)
                elif profile.reserve is not None and reserve_open:
                    why = profile.reserve.reserve(job, cs)
                    reserve_open = profile.reserve.open(cs)
                    if why:
                        status = Status(Code.WAIT, why)
        if status.code == Code.WAIT:
            cs.blocked = True
        if status.reason != job.reason:
            out.append(SetReason(job.id, status.reason))
    return out + cs.out, pool.count


def _start(job: JobView, chosen: tuple[str, ...], cs: CycleState, out: list[Decision]) -> None:
    out.append(StartJob(job.id, chosen, rank_layout(job, chosen, cs.pool.views), job.priority))
    cs.pool.take(chosen)
    _charge(job, cs.snap.quotas, cs.usage)
    if job.array_id is not None:
        cs.array_running[job.array_id] = cs.array_running.get(job.array_id, 0) + 1
    if len(chosen) > 1 and _zones_of(chosen, cs.pool.views) > 1:
        cs.cross_used += 1
