"""The platform's states and codes, in one place and without database imports.

Each state is an :class:`enum.StrEnum`, so a member *is* the string stored in the database and
sent on the wire (``JobStatus.QUEUED == "queued"``): rows read back as plain strings compare equal
to the members, and JSON carries the same values as before. :mod:`haiplatform.db` (the columns),
:mod:`haiplatform.policy`, :mod:`haiplatform.scheduler`, :mod:`haiplatform.agent`, the API and the
CLI all compare against these.
"""

from __future__ import annotations

from enum import StrEnum, nonmember

__all__ = ["JobStatus", "RankStatus", "NodeState", "Desired", "StopCode", "PRIORITIES", "AUTO"]


class JobStatus(StrEnum):
    """An attempt's status (``jobs.status``)."""

    QUEUED = "queued"          # waiting for nodes
    SCHEDULED = "scheduled"    # nodes assigned, ranks starting
    RUNNING = "running"        # every rank has started
    STOPPING = "stopping"      # a stop or suspend was decided; ranks are being killed
    SUCCEEDED = "succeeded"    # every rank exited 0
    FAILED = "failed"          # a rank failed, or its node was lost
    STOPPED = "stopped"        # stopped by its user or an admin while it ran
    CANCELED = "canceled"      # stopped while still queued
    SUSPENDED = "suspended"    # suspended; the chain continues in a new queued attempt

    # the groups (tuples of the members, set below: an enum's body cannot name its own members)
    LIVE = nonmember(())
    ACTIVE = nonmember(())     # holding nodes
    DONE = nonmember(())
    ENDED = nonmember(())      # its chain has ended with it (every DONE but SUSPENDED)


JobStatus.LIVE = (JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.RUNNING, JobStatus.STOPPING)
JobStatus.ACTIVE = (JobStatus.SCHEDULED, JobStatus.RUNNING, JobStatus.STOPPING)
JobStatus.DONE = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED,
                  JobStatus.SUSPENDED)
JobStatus.ENDED = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED)


class RankStatus(StrEnum):
    """One process's status (``ranks.status``); it only moves forward."""

    CREATED = "created"        # decided; the agent has not started it yet
    RUNNING = "running"
    SUCCEEDED = "succeeded"    # exit code 0
    FAILED = "failed"          # non-zero exit code, or it could not start
    KILLED = "killed"          # killed on a stop / suspend
    LOST = "lost"              # its node was lost (or its agent restarted)

    LIVE = nonmember(())       # the agent runs (or is about to run) it
    DONE = nonmember(())


RankStatus.LIVE = (RankStatus.CREATED, RankStatus.RUNNING)
RankStatus.DONE = (RankStatus.SUCCEEDED, RankStatus.FAILED, RankStatus.KILLED, RankStatus.LOST)


class NodeState(StrEnum):
    """A node's state (``nodes.state``); draining is a separate flag."""

    UP = "up"                  # its agent heartbeats
    LOST = "lost"              # no heartbeat for heartbeat_timeout


class Desired(StrEnum):
    """What the scheduler wants of a rank (``ranks.desired``), which its node's agent carries out."""

    RUN = "run"
    STOP = "stop"
    SUSPEND = "suspend"        # signal the job to save and exit first, then stop it


class StopCode:
    """Why an attempt ended (bit flags, as in the reference's ``stop_code``)."""

    NONE = 0
    STOP = 1
    INTERRUPT = 16        # suspended or preempted (or its node was lost): the chain is re-queued
    TIMEOUT = 64          # the attempt's wall-clock limit (``--time``) was reached
    FAILED = 128          # a rank exited non-zero
    INIT_FAILED = 256     # a rank could not be started
    NODE_LOST = 512       # a node of the job stopped heartbeating
    MANUAL_STOP = 1024    # a user or an admin stopped it
    HUNG = 2048           # no output from any rank for its watchdog time

    NAMES = {1: "stop", 16: "interrupt", 64: "timeout", 128: "failed", 256: "init_failed", 512: "node_lost",
             1024: "manual_stop", 2048: "hung"}

    @classmethod
    def describe(cls, code: int) -> str:
        return ",".join(n for b, n in cls.NAMES.items() if code & b) or "-"


#: Priority levels (as in the reference); higher runs first.
PRIORITIES = {"extreme_high": 50, "very_high": 40, "high": 30, "above_normal": 20, "normal": 10,
              "under_normal": 8, "below_normal": 5, "low": 0}

#: A submission's priority "auto": each time the job is queued, the policy picks the highest level
#: at which its user (or group) still has quota (NORMAL when no per-priority quota applies).
AUTO = -1
