"""POSIX permission checks of the metadata service (pure functions over inode attributes).

Root (uid 0) passes every check except execute on a file with no x bit at all. Otherwise the
owner's bits apply to the owner, the group's to a member of the file's group, the others' to
everyone else (the first class that matches decides, as in POSIX).
"""

from __future__ import annotations

import stat
from dataclasses import dataclass

from ..errors import NotPermitted, PermissionDenied

__all__ = ["User", "ROOT_USER", "NOBODY", "R", "W", "X", "allowed", "check", "check_sticky", "check_chmod",
           "check_chown", "check_times"]

R, W, X = 4, 2, 1
NOBODY_ID = 65534


@dataclass(frozen=True)
class User:
    """Who asks: a uid and the gids it holds (its primary group first)."""

    uid: int
    gids: tuple[int, ...] = ()

    @classmethod
    def of(cls, d: dict | None) -> User:
        if not d:
            return ROOT_USER
        gids = d.get("gids")
        if gids is None:
            gids = [d["gid"]] if "gid" in d else []
        return cls(int(d["uid"]), tuple(int(g) for g in gids))

    def to_dict(self) -> dict:
        return {"uid": self.uid, "gids": list(self.gids)}

    @property
    def gid(self) -> int:
        return self.gids[0] if self.gids else NOBODY_ID


ROOT_USER = User(0, (0,))
NOBODY = User(NOBODY_ID, (NOBODY_ID,))


def allowed(user: User, ftype: str, mode: int, uid: int, gid: int, want: int) -> bool:
    """Whether ``user`` has every bit of ``want`` (R|W|X) on an inode of ``ftype``/``mode``/owner."""
    if user.uid == 0:
        if want & X and ftype != "dir":
            return bool(mode & 0o111)
        return True
    if user.uid == uid:
        bits = (mode >> 6) & 7
    elif gid in user.gids:
        bits = (mode >> 3) & 7
    else:
        bits = mode & 7
    return bits & want == want


def check(user: User, row, want: int, where: str) -> None:
    """Raise EACCES unless ``user`` has ``want`` on ``row`` (an inode row: type, mode, uid, gid)."""
    if not allowed(user, row.type, row.mode, row.uid, row.gid, want):
        names = [n for n, b in (("read", R), ("write", W), ("execute/search", X)) if want & b]
        raise PermissionDenied(f"{where}: uid {user.uid} lacks {'+'.join(names)} permission "
                               f"(mode {row.mode:o}, owner {row.uid}:{row.gid})")


def check_sticky(user: User, dirrow, entry_uid: int, where: str) -> None:
    """In a sticky directory only the entry's owner, the directory's owner or root removes or
    renames an entry (EPERM)."""
    if dirrow.mode & stat.S_ISVTX and user.uid not in (0, dirrow.uid, entry_uid):
        raise NotPermitted(f"{where}: the directory is sticky (mode {dirrow.mode:o}) and uid {user.uid} owns "
                           f"neither it ({dirrow.uid}) nor the entry ({entry_uid})")


def check_chmod(user: User, row, mode: int, where: str) -> int:
    """The mode a chmod by ``user`` sets (EPERM unless owner or root); a non-root owner who is not
    in the file's group loses the setgid bit on a file, as on Linux."""
    if user.uid not in (0, row.uid):
        raise NotPermitted(f"{where}: only the owner (uid {row.uid}) or root may chmod; uid {user.uid} asked")
    mode &= 0o7777
    if user.uid != 0 and row.type != "dir" and row.gid not in user.gids:
        mode &= ~stat.S_ISGID
    return mode


def check_chown(user: User, row, uid: int | None, gid: int | None, where: str) -> tuple[int, int, int]:
    """``(uid, gid, mode)`` after a chown by ``user``: only root changes the owner; the owner may
    change the group to one of its own groups (EPERM otherwise). A file loses setuid/setgid
    when a non-root user changes its owner or group (as Linux does)."""
    new_uid = row.uid if uid is None or uid == -1 else int(uid)
    new_gid = row.gid if gid is None or gid == -1 else int(gid)
    if user.uid != 0:
        if new_uid != row.uid:
            raise NotPermitted(f"{where}: only root may change the owner (uid {row.uid} -> {new_uid}); "
                               f"uid {user.uid} asked")
        if new_gid != row.gid and (user.uid != row.uid or new_gid not in user.gids):
            raise NotPermitted(f"{where}: uid {user.uid} may not change the group to {new_gid} (only the owner, "
                               f"to a group it is in, or root)")
    mode = row.mode
    if row.type == "file" and (new_uid != row.uid or new_gid != row.gid) and user.uid != 0:
        mode &= ~(stat.S_ISUID | stat.S_ISGID)
    return new_uid, new_gid, mode


def check_times(user: User, row, explicit: bool, where: str) -> None:
    """setattr of atime/mtime: explicit times need the owner or root (EPERM); setting them to
    "now" also anyone with write permission (EACCES otherwise)."""
    if user.uid in (0, row.uid):
        return
    if explicit:
        raise NotPermitted(f"{where}: only the owner (uid {row.uid}) or root may set explicit times; "
                           f"uid {user.uid} asked")
    check(user, row, W, where)
