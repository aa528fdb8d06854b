"""Data-path capabilities: which file's chunks a job may read or write.

[Note: capabilities] Storage servers know chunks, not files or owners, and the metadata service
is never on the data path. Without more, any holder of a client credential could read or write
any chunk by id. So the metadata service, when it lets a *client* principal (a job's derived
credential) open a file, returns a capability::

    {"i": inode, "w": 0 | 1, "e": expiry (epoch s), "m": HMAC(cap key, "i|w|e|holder")[:16]}

where the *cap key* is derived from the cluster key (every service holds it) and *holder* is the
key id of the credential the capability was minted for. A storage server checks, for every item
of a request from a client principal, that the request carries a capability for the item's inode
(chunk id >> 24), minted for this very connection's key id, not expired, and allowing writes for a
write. Services (the cluster key: the mount, the metadata service, resync) are not checked.
Checking costs one HMAC per capability per request, nothing per byte.

A capability lives as long as the credential it was minted for (a job's credential expires with
the job's ttl), like a POSIX file descriptor that keeps its access after a chmod. Inode ids are
never reused, so a capability of a deleted file reaches no one else's data.
"""

from __future__ import annotations

import hashlib
import hmac
import time

from network import Credential

from .chunkid import inode_of
from .errors import CapabilityDenied

__all__ = ["CapChecker", "CapMinter", "mint"]

_LABEL = b"fs3-capability\0"
_MAC_BYTES = 16


def _cap_keys(key: Credential) -> tuple[bytes, ...]:
    return tuple(hmac.new(s, _LABEL, hashlib.sha256).digest() for s in key.secrets)


def _mac(cap_key: bytes, ino: int, w: int, e: int, holder: str) -> bytes:
    msg = f"{ino}|{w}|{e}|{holder}".encode()
    return hmac.new(cap_key, msg, hashlib.sha256).digest()[:_MAC_BYTES]


class CapMinter:
    """What the metadata service holds to mint capabilities (the cap key, derived once)."""

    def __init__(self, key: Credential) -> None:
        self._key = _cap_keys(key)[0]  # the cluster key's first secret mints; every one verifies

    def mint(self, ino: int, write: bool, holder: str, expires: float | None) -> dict:
        """A capability on inode ``ino`` for the credential ``holder``, valid until ``expires``
        (default one day)."""
        e = int(expires if expires is not None else time.time() + 86400)
        w = 1 if write else 0
        return {"i": int(ino), "w": w, "e": e, "m": _mac(self._key, int(ino), w, e, holder)}


def mint(key: Credential, ino: int, write: bool, holder: str, expires: float | None) -> dict:
    """:meth:`CapMinter.mint` under ``key`` (the cluster key)."""
    return CapMinter(key).mint(ino, write, holder, expires)


class CapChecker:
    """What a storage server holds to check capabilities (every secret of the cluster key)."""

    def __init__(self, key: Credential) -> None:
        self._keys = _cap_keys(key)

    def granted(self, caps, holder: str, write: bool) -> set[int]:
        """The inodes the valid capabilities in ``caps`` open to ``holder`` (for writing: those
        with the write right)."""
        out: set[int] = set()
        if not caps:
            return out
        if not isinstance(caps, list) or len(caps) > 4096:
            raise CapabilityDenied(f"malformed capabilities: expected a list of at most 4096, got "
                                   f"{type(caps).__name__}")
        now = time.time()
        for c in caps:
            try:
                ino, w, e, m = int(c["i"]), int(c["w"]), int(c["e"]), bytes(c["m"])
            except (KeyError, TypeError, ValueError):
                raise CapabilityDenied(f"malformed capability {c!r:.80}") from None
            if e < now or (write and not w):
                continue
            if any(hmac.compare_digest(_mac(k, ino, w, e, holder), m) for k in self._keys):
                out.add(ino)
        return out

    def check(self, caps, holder: str, chunks, write: bool, where: str) -> None:
        """Raise :class:`CapabilityDenied` unless every chunk id in ``chunks`` is covered."""
        ok = self.granted(caps, holder, write)
        for ch in chunks:
            ino = inode_of(int(ch))
            if ino not in ok:
                raise CapabilityDenied(
                    f"{where}: {holder!r} holds no valid {'write' if write else 'read'} capability for "
                    f"inode {ino} (chunk {int(ch):016x}); open the file through the fs3 metadata service "
                    f"(fs3.open) to get one")
