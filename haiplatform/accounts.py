"""The Unix account a platform user's ranks run as (``[haiplatform] job_account`` and ``accounts``).

A rank never runs as the services' account (nor as root): the agent, which runs as root on a real
cluster (as slurmd does), starts each rank as the account its user maps to, with that account's
uid, gid and supplementary groups. The mapping, per cluster:

- ``accounts = {alice = "alice"}``: explicit entries, first;
- ``job_account = "hai-{user}"``: the pattern for everyone else (the default; ``"{user}"`` where
  platform users are the site's Unix users).

A missing account is an error that names it and what to do, unless ``create_accounts = true``
and the agent is root: then the agent creates it as a system account with no password, no login
shell and no home directory (``useradd --system``), as the local cluster does. Accounts are never
removed by the platform.
"""

from __future__ import annotations

import logging
import os
import pwd
import random
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass

from .config import HaiConfig
from .errors import AccountError

__all__ = ["Account", "account_name", "resolve_account"]

log = logging.getLogger(__name__)

#: what useradd accepts by default, at most 32 characters
ACCOUNT_NAME = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")

_create_lock = threading.Lock()


@dataclass(frozen=True)
class Account:
    """A Unix account a job runs as."""

    name: str
    uid: int
    gid: int
    home: str


def account_name(cfg: HaiConfig, user: str) -> str:
    """The account ``user``'s jobs run as (AccountError when the mapping gives no valid name)."""
    name = cfg.accounts.get(user) or cfg.job_account.format(user=user)
    if not ACCOUNT_NAME.match(name):
        raise AccountError(f"platform user {user!r} maps to the Unix account {name!r}, which is not a valid "
                           "account name (a lower-case letter or _, then lower-case letters, digits, _ or -; at most "
                           "32 characters): map the user to a valid name in [haiplatform] accounts")
    return name


def _lookup(name: str) -> Account | None:
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        return None
    return Account(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir)


def _create(name: str, node: str) -> Account:
    """``useradd --system`` the account; agents of several nodes on one machine may race for it."""
    useradd = shutil.which("useradd") or shutil.which("useradd", path="/usr/sbin:/sbin")
    if useradd is None:
        raise AccountError(f"cannot create the Unix account {name!r} on {node}: no useradd on this machine; "
                           "create the account yourself")
    nologin = next((p for p in ("/usr/sbin/nologin", "/sbin/nologin") if os.path.exists(p)), "/bin/false")
    deadline = time.monotonic() + 30.0
    with _create_lock:
        while True:
            acct = _lookup(name)
            if acct is not None:
                return acct
            r = subprocess.run([useradd, "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
                                "--shell", nologin, "--comment", "fireflyer job account", name],
                               capture_output=True, text=True, timeout=30)
            acct = _lookup(name)
            if acct is not None:
                if r.returncode == 0:
                    log.warning("created the Unix account %s (uid %d) for jobs on %s", name, acct.uid, node)
                return acct
            # 1 and 10: /etc/passwd or /etc/group locked by another useradd (another agent): try again
            if r.returncode in (1, 10) and time.monotonic() < deadline:
                time.sleep(random.uniform(0.05, 0.3))
                continue
            raise AccountError(f"cannot create the Unix account {name!r} on {node}: useradd exited with "
                               f"{r.returncode}: {r.stderr.strip() or r.stdout.strip()}")


def resolve_account(cfg: HaiConfig, user: str, node: str) -> Account:
    """The account ``user``'s ranks run as on ``node``, created when missing and allowed (see above)."""
    name = account_name(cfg, user)
    acct = _lookup(name)
    if acct is None:
        if not cfg.create_accounts:
            raise AccountError(f"no Unix account {name!r} on {node} for platform user {user!r}: create it "
                               f"(useradd --system --shell /usr/sbin/nologin {name}), map the user to an existing "
                               "account in [haiplatform] accounts, or set create_accounts = true")
        if os.geteuid() != 0:
            raise AccountError(f"no Unix account {name!r} on {node} for platform user {user!r}, and the agent "
                               "cannot create it (it does not run as root); create the account yourself")
        acct = _create(name, node)
    if acct.uid == 0 or acct.uid == os.geteuid() or acct.gid == 0:
        raise AccountError(f"platform user {user!r} maps to the Unix account {name!r} (uid {acct.uid}, gid "
                           f"{acct.gid}), which is root or the services' account, or has root's group: jobs never "
                           "run as it; map the user to another account in [haiplatform] accounts")
    return acct
