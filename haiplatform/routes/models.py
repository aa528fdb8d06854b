"""The API's request bodies and the bounds of every value a request carries."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Path as PathParam
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..states import AUTO, PRIORITIES

__all__ = ["JobSpec", "PrioritySpec", "ActivitySpec", "TIME_MAX", "UserSpec", "QuotaSpec", "NotifySpec", "DrainSpec", "RegisterSpec", "RankReport", "ReportSpec",
           "CheckSpec", "ValidationSpec",
           "Text", "JobId", "INT32", "OFFSET_MAX", "SEQ_MAX", "NO_NUL", "CancelSpec", "GroupSpec", "parse_array",
           "check_command_size", "check_output_pattern", "COMMAND_ARGS", "COMMAND_BYTES", "USER_NAME"]

JOB_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}$"
USER_NAME = r"^[a-z_][a-z0-9_.-]{0,63}$"

# [Note: every integer is bounded] The database's INTEGER columns hold 32 bits on PostgreSQL and
# 64 on SQLite; a larger value used to reach the driver and come back as a 500. Every integer a
# request carries (path, query and body) is bounded here, in the schema, so it is a 422 naming the
# field; strings that land in a VARCHAR column are bounded to its length.
INT32 = 2**31 - 1
OFFSET_MAX = 2**53          # a log offset (bytes): well past any log, exact in every JSON parser
SEQ_MAX = 2**62             # the notification channels' sequence numbers
NO_NUL = r"^[^\x00]*$"      # PostgreSQL's text cannot hold NUL, nor can an argv, an env or a path
TIME_MAX = 1e9              # a duration (s): about 31 years
TS_MAX = 1e11               # a timestamp (s since the epoch): year 5138


def Text(max_length: int, **kw: Any) -> Any:  # noqa: N802 - reads as a type in the models
    """A string of at most ``max_length`` characters, without NUL."""
    return Annotated[str, Field(max_length=max_length, pattern=NO_NUL, **kw)]


#: a job's command: at most this many arguments, and this many bytes (UTF-8) in all
COMMAND_ARGS = 4096
COMMAND_BYTES = 64 * 1024


NODE_NAME = Text(64, min_length=1)
JobId = Annotated[int, PathParam(ge=1, le=INT32, description="a job id (any attempt of the chain)")]


# -- request bodies -------------------------------------------------------------------------------

class _Priority(BaseModel):
    """A ``priority`` field: a level's name, its number (0..50) or "auto" (stored as AUTO, -1)."""

    model_config = ConfigDict(extra="forbid")
    priority: Annotated[int, Field(ge=0, le=50)] | Text(32) = Field(
        "normal", validate_default=True,
        description="a level name, its number (0..50), or 'auto': the highest level the quotas have room for")

    @field_validator("priority", mode="before")
    @classmethod
    def _prio(cls, v: Any) -> Any:
        return parse_priority(v)

    @field_validator("priority", mode="after")
    @classmethod
    def _auto(cls, v: Any) -> int:
        return AUTO if v == "auto" else v


class JobSpec(_Priority):
    """What a user submits (``hai python ...`` and ``hai run job.yaml`` build one)."""

    name: str = Field(pattern=JOB_NAME, description="a name for the job (letters, digits, _.@-)")
    command: list[Text(COMMAND_BYTES)] = Field(
        min_length=1, description=f"argv of each rank's process (at most {COMMAND_ARGS} arguments of "
                                  f"{COMMAND_BYTES} bytes in all)")
    nodes: int = Field(1, ge=1, le=10000, description="whole nodes")
    procs_per_node: int = Field(0, ge=0, le=256, description="processes per node; 0: the node's GPUs (or 1)")
    time_limit: float = Field(0.0, ge=0, le=TIME_MAX, allow_inf_nan=False,
                              description="each attempt's run time limit in seconds (0: none), as Slurm's --time")
    grace: float = Field(0.0, ge=0, le=TIME_MAX, allow_inf_nan=False,
                         description="seconds to finish after acknowledging a suspend (0: the cluster's "
                                     "suspend_grace; at most its max_suspend_grace)")
    watchdog: float = Field(0.0, ge=0, le=TIME_MAX, allow_inf_nan=False,
                            description="stop the job as hung after this many seconds without output (0: off)")
    env: dict[Text(1024), Text(65536)] = Field(
        default_factory=dict, max_length=4096)
    workdir: Text(1000) = ""
    shared_in_group: bool = False
    # the researcher's day (#19): arrays, dependencies, holds, output files
    array: Text(1000) | None = Field(None, description="a job array, Slurm's syntax: 0-99, 0-99%8, 1,3,5-7, 0-15:4")
    after: list[Annotated[int, Field(ge=1, le=INT32)]] = Field(
        default_factory=list, max_length=1000, description="start after each of these jobs has ended (any way)")
    after_ok: list[Annotated[int, Field(ge=1, le=INT32)]] = Field(
        default_factory=list, max_length=1000, description="start after each of these jobs succeeded "
                                                           "(canceled if one ends otherwise)")
    hold: bool = Field(False, description="queued but not scheduled until released")
    output: Text(1000, min_length=1) | None = Field(
        None, description="also write each rank's output to this path on its node (%j job, %a array index, "
                          "%r rank, %n node, %x name, %% percent)")

    @field_validator("command")
    @classmethod
    def _cmd(cls, v: list[str]) -> list[str]:
        if not v[0].strip():
            raise ValueError("command[0] must name a program")
        check_command_size(v)
        return v

    @field_validator("output")
    @classmethod
    def _output(cls, v: str | None) -> str | None:
        if v is not None:
            check_output_pattern(v)
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        for k in v:
            if not k or "=" in k or not (k[0].isalpha() or k[0] == "_"):
                raise ValueError(f"bad environment variable name {k!r}")
        return v


def check_command_size(argv: list[str]) -> None:
    """ValueError naming the sizes when ``argv`` is over :data:`COMMAND_ARGS` arguments or
    :data:`COMMAND_BYTES` bytes (a 10,000-argument command used to be stored and printed whole)."""
    if len(argv) > COMMAND_ARGS:
        raise ValueError(f"the command has {len(argv)} arguments; at most {COMMAND_ARGS} are allowed "
                         "(pass long lists in a file)")
    total = sum(len(a.encode()) for a in argv)
    if total > COMMAND_BYTES:
        raise ValueError(f"the command is {total} bytes long; at most {COMMAND_BYTES} bytes are allowed "
                         "(pass long lists in a file)")


_OUTPUT_KEYS = set("jarnx%")


def check_output_pattern(v: str) -> None:
    """ValueError when an output path uses a placeholder other than %j %a %r %n %x %%."""
    i = 0
    while i < len(v):
        if v[i] == "%":
            if i + 1 >= len(v) or v[i + 1] not in _OUTPUT_KEYS:
                raise ValueError(f"output {v!r}: unknown placeholder {v[i:i + 2]!r} "
                                 "(use %j job, %a array index, %r rank, %n node, %x name, %% percent)")
            i += 2
        else:
            i += 1


def parse_priority(v: Any) -> Any:
    """A level's name or a number (also as a string) -> the number ("auto" stays "auto"), with one clear
    message when it is neither (before the union's own checks, which would list one complaint per branch)."""
    if isinstance(v, str):
        if v.lower() == "auto":
            return "auto"
        if v.lower() in PRIORITIES:
            return PRIORITIES[v.lower()]
        if not (v.isascii() and v.lstrip("-").isdigit() and len(v) <= 8):
            raise ValueError(f"unknown priority {v[:40]!r}; use auto, one of {', '.join(PRIORITIES)} or 0..50")
        v = int(v)
    if isinstance(v, int) and not isinstance(v, bool) and not 0 <= v <= 50:
        raise ValueError(f"priority {v} is out of range 0..50")
    return v


class PrioritySpec(_Priority):
    """``POST /v1/jobs/{id}/priority``: the chain's new level (required here)."""

    priority: Annotated[int, Field(ge=0, le=50)] | Text(32) = Field(
        description="a level name, its number (0..50), or 'auto'")


class ActivitySpec(BaseModel):
    """What an agent saw of one job since its last report (timestamps; each optional)."""

    model_config = ConfigDict(extra="forbid")
    last_output: float | None = Field(None, ge=0, le=TS_MAX, allow_inf_nan=False)
    last_checkpoint: float | None = Field(None, ge=0, le=TS_MAX, allow_inf_nan=False)
    suspend_acked_at: float | None = Field(None, ge=0, le=TS_MAX, allow_inf_nan=False)


class UserSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=USER_NAME)
    role: str = Field("user", pattern="^(user|admin)$")
    group: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class QuotaSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    subject: str = Field(pattern=r"^(user|group):[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$",
                         description="user:NAME or group:NAME")
    max_nodes: int = Field(ge=0, le=INT32)
    priority: int | None = Field(None, ge=0, le=50)


class NotifySpec(BaseModel):
    nodes: list[NODE_NAME] | None = Field(None, max_length=100000)  # None: every node


class DrainSpec(BaseModel):
    reason: Text(200) = ""


class RegisterSpec(BaseModel):
    node: NODE_NAME
    epoch: Text(40)
    address: Text(64) = ""
    cpus: int = Field(0, ge=0, le=INT32)
    memory_gib: float = Field(0.0, ge=0, le=1e12, allow_inf_nan=False)
    gpus: int = Field(0, ge=0, le=INT32)
    facts: dict[str, Any] = Field(default_factory=dict)
    validating: bool = Field(False, description="the agent validates the node before it takes jobs: the "
                                                "validator drains it until the run passes")


class RankReport(BaseModel):
    job_id: int = Field(ge=1, le=INT32)
    rank: int = Field(ge=0, le=INT32)
    status: Text(16)
    exit_code: int | None = Field(None, ge=-INT32 - 1, le=INT32)
    pid: int | None = Field(None, ge=0, le=INT32)
    message: Text(65536) = ""
    whole_life_state: int | None = Field(None, ge=-INT32 - 1, le=INT32)


class ReportSpec(BaseModel):
    node: NODE_NAME
    epoch: Text(40)
    ranks: list[RankReport] = Field(default_factory=list, max_length=100000)
    master_ports: dict[Annotated[int, Field(ge=1, le=INT32)], Annotated[int, Field(ge=1, le=65535)]] = Field(
        default_factory=dict, max_length=100000)
    activity: dict[Annotated[int, Field(ge=1, le=INT32)], ActivitySpec] = Field(
        default_factory=dict, max_length=100000, description="job id -> its ranks' newest output, "
                                                             "checkpoint and suspend acknowledgement")


def parse_array(spec: str, max_size: int) -> tuple[list[int], int]:
    """Slurm's ``--array`` syntax -> (the task indices, sorted and unique; the throttle, 0 = none).

    ``0-99``, ``0-99%8`` (at most 8 running at once), ``1,3,5-7``, ``0-15:4`` (a step). A ValueError
    names what is wrong; at most ``max_size`` tasks (``[haiplatform] max_array_size``)."""
    s = spec.strip()
    throttle = 0
    if "%" in s:
        s, _, t = s.partition("%")
        if not t.isdigit() or int(t) < 1:
            raise ValueError(f"array {spec!r}: the throttle after % must be a positive number")
        throttle = int(t)
    if not s:
        raise ValueError(f"array {spec!r}: no index given (e.g. 0-99, 0-99%8, 1,3,5-7, 0-15:4)")
    out: set[int] = set()
    for part in s.split(","):
        rng, _, step_s = part.strip().partition(":")
        lo_s, dash, hi_s = rng.partition("-")
        if not lo_s.isdigit() or (dash and not hi_s.isdigit()) or (step_s and not step_s.isdigit()):
            raise ValueError(f"array {spec!r}: bad part {part!r} (expected N, N-M or N-M:STEP, "
                             "indices >= 0)")
        lo = int(lo_s)
        hi = int(hi_s) if dash else lo
        step = int(step_s) if step_s else 1
        if hi < lo or step < 1:
            raise ValueError(f"array {spec!r}: bad range {part!r} (the end is below the start, or step 0)")
        if hi > INT32:
            raise ValueError(f"array {spec!r}: index {hi} is too large")
        if (hi - lo) // step + 1 + len(out) > max_size:
            raise ValueError(f"array {spec!r} has more than {max_size} tasks "
                             "(haiplatform.max_array_size)")
        out.update(range(lo, hi + 1, step))
    return sorted(out), throttle


class CancelSpec(BaseModel):
    """``POST /v1/jobs/cancel``: which chains to cancel (every filter given must match; at least one)."""

    model_config = ConfigDict(extra="forbid")
    ids: list[Annotated[int, Field(ge=1, le=INT32)]] | None = Field(None, max_length=100000)
    name: Annotated[str, Field(max_length=128, pattern=NO_NUL)] | None = None
    user: Annotated[str, Field(max_length=64, pattern=NO_NUL)] | None = None
    array_id: int | None = Field(None, ge=1, le=INT32)
    status: list[Annotated[str, Field(max_length=16)]] | None = Field(None, max_length=10)


class GroupSpec(BaseModel):
    """``PUT /v1/users/{name}/group``: the user's new group (None: none)."""

    model_config = ConfigDict(extra="forbid")
    group: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class CheckSpec(BaseModel):
    """One check of a validator run (haiplatform.validate.CheckResult)."""

    name: Text(32)
    ok: bool
    value: float | None = Field(None, allow_inf_nan=False)
    unit: Text(16) = ""
    baseline: float | None = Field(None, allow_inf_nan=False)
    message: Text(1000) = ""
    skipped: bool = False


class ValidationSpec(BaseModel):
    """``POST /v1/agent/validation``: a validator run of the agent's node."""

    node: NODE_NAME
    epoch: Text(40)
    at: float = Field(ge=0, le=TS_MAX, allow_inf_nan=False)
    ok: bool
    duration: float = Field(0.0, ge=0, le=TIME_MAX, allow_inf_nan=False)
    trigger: str = Field("request", pattern="^(start|schedule|request)$")
    request: float = Field(0.0, ge=0, le=TS_MAX, allow_inf_nan=False, description="the request it answers (0: none)")
    failed: list[Text(32)] = Field(default_factory=list, max_length=64)
    summary: Text(500) = ""
    checks: list[CheckSpec] = Field(default_factory=list, max_length=64)
