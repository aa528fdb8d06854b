"""The launcher's restart policy: what to do when a service exits that nobody asked to stop.

Modelled on systemd's ``Restart=on-failure``: a service that exits with a nonzero status or is
killed by a signal is started again after a back-off; a clean exit (status 0) is left alone, and
so is a service the launcher (or a test, or an admin) stopped on purpose (the caller never asks
the policy about those). The back-off starts at ``backoff`` seconds (``RestartSec``) and doubles
with each consecutive crash up to ``backoff_max`` (``RestartMaxDelaySec``); a service that stayed
up ``reset_after`` seconds starts again from ``backoff``. After ``burst`` crashes within
``interval`` seconds (``StartLimitBurst`` / ``StartLimitIntervalSec``) the service is left
"failed" and reported, not restarted forever; an admin's ``hai cluster restart`` starts it again.

:func:`decide` is pure (a function of the policy, the exit and the instance's history), so the
policy is tested without processes; :class:`deploy.local.LocalCluster` carries it out.

A ``[[service]]`` entry of the cluster description may override the launcher's policy:
``restart = "on-failure" | "no"``, ``restart_sec``, ``restart_max_sec``, ``restart_reset_sec``,
``start_limit_burst``, ``start_limit_interval_sec``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

__all__ = ["RestartPolicy", "History", "Decision", "decide", "policy_from_options", "OPTION_KEYS"]

# [[service]] option -> RestartPolicy field
OPTION_KEYS = {"restart": "restart", "restart_sec": "backoff", "restart_max_sec": "backoff_max",
               "restart_reset_sec": "reset_after", "start_limit_burst": "burst",
               "start_limit_interval_sec": "interval"}


@dataclass(frozen=True)
class RestartPolicy:
    """When and how soon a crashed service is started again (see the module docstring)."""

    restart: Literal["on-failure", "no"] = "on-failure"
    backoff: float = 0.5
    backoff_max: float = 30.0
    reset_after: float = 60.0
    burst: int = 5
    interval: float = 120.0

    def __post_init__(self) -> None:
        if self.restart not in ("on-failure", "no"):
            raise ValueError(f"restart: expected 'on-failure' or 'no', got {self.restart!r}")
        for name in ("backoff", "backoff_max", "reset_after", "interval"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{name}: expected a positive number of seconds, got {v!r}")
        if self.backoff_max < self.backoff:
            raise ValueError(f"backoff_max: {self.backoff_max} s is below the first back-off ({self.backoff} s)")
        if isinstance(self.burst, bool) or not isinstance(self.burst, int) or self.burst < 1:
            raise ValueError(f"burst: expected an integer >= 1, got {self.burst!r}")


@dataclass(frozen=True)
class History:
    """What the policy remembers of one instance: consecutive crashes and recent crash times."""

    streak: int = 0  # crashes in a row, each after a short life (the back-off exponent)
    crashes: tuple[float, ...] = field(default=())  # monotonic times of crashes within the interval


@dataclass(frozen=True)
class Decision:
    action: Literal["restart", "fail", "leave"]
    delay: float  # seconds to wait before starting again (restart only)
    reason: str


def decide(policy: RestartPolicy, returncode: int, up_for: float, history: History, now: float
           ) -> tuple[Decision, History]:
    """What to do about an instance that exited on its own with ``returncode`` after running
    ``up_for`` seconds, at monotonic time ``now``; returns the decision and the new history."""
    if returncode == 0:
        return Decision("leave", 0.0, "exited cleanly (status 0)"), history
    what = f"killed by signal {-returncode}" if returncode < 0 else f"exited with status {returncode}"
    if policy.restart == "no":
        return Decision("leave", 0.0, f"{what}; restart is off"), history
    streak = 1 if up_for >= policy.reset_after else history.streak + 1
    crashes = tuple(t for t in history.crashes if now - t < policy.interval) + (now,)
    new = History(streak, crashes)
    if len(crashes) >= policy.burst:
        return Decision("fail", 0.0, f"{what}; {len(crashes)} crashes within {policy.interval:g} s "
                                     f"(start limit {policy.burst})"), new
    delay = min(policy.backoff * 2 ** (streak - 1), policy.backoff_max)
    return Decision("restart", delay, f"{what}; restarting in {delay:g} s"), new


def policy_from_options(options: dict, default: RestartPolicy, where: str) -> RestartPolicy:
    """``default`` with the restart keys of a ``[[service]]`` entry applied; a bad value is a
    ValueError that names ``where`` and the key."""
    changes = {}
    for key, attr in OPTION_KEYS.items():
        if key in options:
            changes[attr] = options[key]
    if not changes:
        return default
    try:
        return replace(default, **changes)
    except ValueError as exc:
        attr = str(exc).split(":", 1)[0]
        key = next((k for k, a in OPTION_KEYS.items() if a == attr), attr)
        raise ValueError(f"{where}: {key}: {str(exc).split(': ', 1)[-1]}") from None
