"""The dashboard's sessions: a random id in an HttpOnly cookie, mapped here to the user's token.

[Note: what the cookie holds] The cookie carries a random session id (256 bits) and nothing else;
the server keeps, per session, the token the user logged in with, a CSRF token and an expiry.
Keeping the token (not just the user's name) lets every page authenticate it again through the
API's own :func:`haiplatform.routes.deps.authenticate`, so a disabled user or a reset token locks
the dashboard out exactly as it locks the API out (within the API's 2 s token cache). The map is
keyed by the id's SHA-256, so a memory dump of the map alone does not give out live cookies.
Sessions live in the API process's memory: a restarted API asks everyone to log in again, which
costs a user one form and keeps tokens out of the database.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from dataclasses import dataclass

__all__ = ["Session", "Sessions", "COOKIE", "LOGIN_COOKIE"]

#: the session cookie's name, and the name of the short-lived cookie that guards the login form
COOKIE = "hai_session"
LOGIN_COOKIE = "hai_login"


@dataclass(frozen=True)
class Session:
    token: str        # the user's API token (never sent back to the browser)
    csrf: str         # what every POST form of this session must carry
    user: str
    expires: float    # time.monotonic() deadline


def _key(sid: str) -> str:
    return hashlib.sha256(sid.encode()).hexdigest()


class Sessions:
    """Live sessions, at most ``max_sessions`` (the oldest go first), each for ``ttl`` seconds."""

    def __init__(self, ttl: float = 8 * 3600, max_sessions: int = 10000) -> None:
        if ttl <= 0 or max_sessions < 1:
            raise ValueError(f"sessions need ttl > 0 and max_sessions >= 1 (got {ttl}, {max_sessions})")
        self.ttl, self.max_sessions = ttl, max_sessions
        self._by_key: dict[str, Session] = {}  # insertion order = age: the first is the oldest
        self._lock = threading.Lock()

    def create(self, token: str, user: str) -> tuple[str, Session]:
        """A new session for ``user``: (the id for the cookie, the session)."""
        sid = secrets.token_urlsafe(32)
        s = Session(token=token, csrf=secrets.token_urlsafe(32), user=user, expires=time.monotonic() + self.ttl)
        with self._lock:
            self._expire(time.monotonic())
            while len(self._by_key) >= self.max_sessions:
                del self._by_key[next(iter(self._by_key))]
            self._by_key[_key(sid)] = s
        return sid, s

    def get(self, sid: str | None) -> Session | None:
        """The live session of cookie value ``sid`` (None: no such session, or it expired)."""
        if not sid or len(sid) > 128:
            return None
        k = _key(sid)
        with self._lock:
            s = self._by_key.get(k)
            if s is not None and s.expires <= time.monotonic():
                del self._by_key[k]
                return None
            return s

    def drop(self, sid: str | None) -> None:
        """Log out: the session is gone whoever holds a copy of its cookie."""
        if sid:
            with self._lock:
                self._by_key.pop(_key(sid), None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_key)

    def _expire(self, now: float) -> None:
        dead = [k for k, s in self._by_key.items() if s.expires <= now]
        for k in dead:
            del self._by_key[k]
