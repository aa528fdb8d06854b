"""Cluster identity: keys, credentials and the mutual handshake every RPC connection starts with.

One secret key per cluster (the *cluster key*) is provisioned by the admin onto the service hosts
(mode 0600). Its holders are the services: key_id ``"cluster"``, roles ``{"service", "client"}``.
A server that holds the cluster key can *derive* a client credential for anyone (``job:42``,
``user:alice``), with an expiry, that it later verifies without any lookup: the derived secret is
``HMAC(cluster secret, key_id | expiry)``, so the credential cannot be widened or prolonged by its
holder. Derived credentials carry the role ``{"client"}`` only.

The handshake (both ways authenticated, once per connection, nothing per byte)::

    client -> server   hello  {v, kid, exp, fp, nc, enc}       fp: fingerprint of the client's key
    server -> client   {ns, enc, proof_s}                       proof_s = HMAC(K, "server" | transcript)
    client -> server   {proof_c}                                proof_c = HMAC(K, "client" | transcript)
    server -> client   {ok, roles}  or  {e: why}

``K`` is the matched cluster key, or the derived key the server recomputes from ``kid`` and
``exp``. The transcript binds the version, the key id, the expiry, both nonces and both
encryption flags, so nothing in it can be replayed or changed by someone in the middle. A fake
server (one without the key) cannot compute ``proof_s``: the client refuses it before sending
anything else. Proofs are compared with ``hmac.compare_digest``.

Key rotation: a key file may hold several secrets; the first is used to connect, every one is
accepted. Add the new key everywhere (second), then make it first everywhere, then drop the old
one (docs/security.md). Keys are named in the hello by a short fingerprint (a hash of the
secret, which reveals nothing of it).

Optional encryption (``[security] encrypt = true``): every frame after the handshake is sealed
with AES-GCM under per-direction session keys derived from the cluster key and both nonces.

    python -m network.auth new-key PATH      # a fresh cluster key (mode 0600)
    python -m network.auth derive KEY ID --ttl SECONDS --out PATH
    python -m network.auth show PATH         # key id, fingerprints, expiry (never the secret)
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import msgpack

from ..errors import AuthError, PeerClosed, ProtocolError, TransportError

if TYPE_CHECKING:  # pragma: no cover
    from ..topology import Cluster
    from ..transport import Connection

__all__ = [
    "AuthError", "Authenticator", "Credential", "Principal", "client_credential", "client_handshake",
    "cluster_key_path", "derive", "load_cluster_key", "new_cluster_key", "server_handshake", "server_settings",
    "HANDSHAKE_TIMEOUT", "CLUSTER_KEY_ID", "SERVICE", "CLIENT", "ANY",
]

PROTOCOL_VERSION = 1
CLUSTER_KEY_ID = "cluster"
SERVICE = "service"
CLIENT = "client"
ANY = (SERVICE, CLIENT)  # roles of a method every authenticated peer may call
HANDSHAKE_TIMEOUT = 5.0
KEY_BYTES = 32
NONCE_BYTES = 32
_HELLO_MAX = 1024  # bytes of any handshake frame: checked before it is buffered
_ENV = "FIREFLYER_CREDENTIAL"


# -- credentials -------------------------------------------------------------------------------

_SERVICE_ROLES = frozenset({SERVICE, CLIENT})
_CLIENT_ROLES = frozenset({CLIENT})


def _roles(key_id: str) -> frozenset[str]:
    """The roles of a key id: the cluster key's holders are services (and clients), anyone else a client."""
    return _SERVICE_ROLES if key_id == CLUSTER_KEY_ID else _CLIENT_ROLES


def fingerprint(secret: bytes) -> str:
    """A short public name of a secret (16 hex digits of a hash; reveals nothing of it)."""
    return hashlib.sha256(b"fireflyer-key-fingerprint\0" + secret).hexdigest()[:16]


@dataclass(frozen=True)
class Credential:
    """A key id and its secret; ``expires`` (epoch seconds) for derived credentials.

    ``accepted`` are further secrets a server also accepts (key rotation: the file's later keys).
    """

    key_id: str
    secret: bytes = field(repr=False)
    expires: float | None = None
    accepted: tuple[bytes, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.key_id, str) or not self.key_id or len(self.key_id) > 200:
            raise AuthError(f"credential key_id must be a non-empty string of at most 200 characters, "
                            f"got {self.key_id!r}")
        if not isinstance(self.secret, bytes) or len(self.secret) < 16:
            raise AuthError(f"credential {self.key_id!r}: secret must be at least 16 bytes")

    @property
    def roles(self) -> frozenset[str]:
        """``{"service", "client"}`` for the cluster key, ``{"client"}`` for a derived one."""
        return _roles(self.key_id)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.secret)

    @property
    def secrets(self) -> tuple[bytes, ...]:
        """Every secret of this credential, the one used to connect first."""
        return (self.secret, *self.accepted)

    def expired(self, now: float | None = None) -> bool:
        return self.expires is not None and (time.time() if now is None else now) >= self.expires

    def to_json(self) -> str:
        return json.dumps({"key_id": self.key_id, "secrets": [s.hex() for s in self.secrets],
                           "expires": self.expires}) + "\n"

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically, mode 0600 (a temporary file in the same directory, then a rename)."""
        from ..rundir import write_private

        return write_private(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Credential:
        """Read a credential file (``AuthError`` names the path and what is wrong)."""
        p = Path(path)
        try:
            text = p.read_text()
        except FileNotFoundError:
            raise AuthError(f"credential file {p} does not exist") from None
        except PermissionError:
            raise AuthError(f"credential file {p} is not readable by this user (uid {os.getuid()})") from None
        except OSError as exc:
            raise AuthError(f"credential file {p}: cannot read: {exc.strerror or exc}") from None
        try:
            d = json.loads(text)
            keys = [bytes.fromhex(s) for s in d["secrets"]]
            if not keys:
                raise ValueError("no secrets")
            exp = d.get("expires")
            if exp is not None and not isinstance(exp, int | float):
                raise ValueError(f"expires must be a number or null, got {exp!r}")
            return cls(str(d["key_id"]), keys[0], None if exp is None else float(exp), tuple(keys[1:]))
        except AuthError as exc:
            raise AuthError(f"credential file {p}: {exc}") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise AuthError(f"credential file {p} is not a fireflyer credential ({exc}); create one with "
                            f"`python -m network.auth new-key {p}`") from None


def new_cluster_key() -> Credential:
    """A fresh random cluster key (32 bytes)."""
    return Credential(CLUSTER_KEY_ID, secrets.token_bytes(KEY_BYTES))


def _derive_secret(master: bytes, key_id: str, expires: float | None) -> bytes:
    msg = msgpack.packb(["fireflyer-derive", key_id, expires])
    return hmac.new(master, msg, hashlib.sha256).digest()


def derive(master: Credential, key_id: str, expires: float | None) -> Credential:
    """A client credential for ``key_id`` (``job:42``, ``user:alice``), valid until ``expires``.

    Any server holding ``master`` verifies it without a lookup; its holder cannot change its id
    or expiry. Derived from the first (current) secret of ``master``.
    """
    if master.key_id != CLUSTER_KEY_ID:
        raise AuthError(f"derive: the master must be the cluster key, not {master.key_id!r}")
    if key_id == CLUSTER_KEY_ID:
        raise AuthError(f"derive: key_id {CLUSTER_KEY_ID!r} is reserved for the cluster key")
    if expires is not None:
        expires = float(expires)
    return Credential(key_id, _derive_secret(master.secret, key_id, expires), expires)


# -- where keys live ---------------------------------------------------------------------------

def _launcher_key(cluster: Cluster) -> Path:
    # [Note: the local launcher's key] deploy.local resolves a description into
    # RUN_DIR/cluster.toml and keeps the key in RUN_DIR/secrets/cluster.key; RUN_DIR is
    # $FIREFLYER_RUN_DIR/<name>, else $XDG_STATE_HOME/fireflyer/clusters/<name> (the same rule
    # as deploy.local.default_run_dir, which network may not import). A description without
    # key_file (deploy/clusters/local.toml) thus finds the key of its running local cluster, so
    # `python -m network.probe --cluster deploy/clusters/local.toml` and the fs3 CLI keep working.
    base = os.environ.get("FIREFLYER_RUN_DIR")
    if base:
        run = Path(base) / cluster.name
    else:
        run = Path(os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")) / "fireflyer" \
            / "clusters" / cluster.name
    return run / "secrets" / "cluster.key"


def cluster_key_path(cluster: Cluster) -> Path:
    """``[security] key_file`` of the cluster description, relative to the file's directory;
    without one, the key of the local launcher's run directory for this cluster, if it exists."""
    sec = cluster.section("security")
    kf = sec.get("key_file")
    if not kf:
        local = _launcher_key(cluster)
        if local.exists():
            return local
        raise AuthError(f"{cluster.source}: no [security] key_file (and no local cluster key at {local}): every "
                        "RPC connection is authenticated with the cluster key; create one with "
                        "`python -m network.auth new-key PATH` and name it in [security] key_file")
    p = Path(kf).expanduser()
    if not p.is_absolute():
        base = cluster.path.parent if cluster.path is not None else Path.cwd()
        p = base / p
    return p


def load_cluster_key(cluster: Cluster) -> Credential:
    """The cluster key (services): ``AuthError`` when not configured or not readable."""
    cred = Credential.load(cluster_key_path(cluster))
    if cred.key_id != CLUSTER_KEY_ID:
        raise AuthError(f"{cluster_key_path(cluster)} holds a {cred.key_id!r} credential, not the cluster key")
    return cred


class _NoAuth:
    """Authentication switched off: benchmarks comparing with and without it, nothing else."""

    key_id = "insecure"

    @property
    def key(self) -> _NoAuth:  # what a service that holds it uses as its client credential
        return self

    def __repr__(self) -> str:
        return "NO_AUTH"


# [Note: the benchmark switch] bench/fs3_chunks.py measures fs3 with and without authentication
# in one run, so the services must be able to run without it. Only the environment variable
# INSECURE_ENV=1 (set by the bench for its second cluster) does it, never a cluster file; every
# service started that way logs a warning. Its peers then accept any connection, as before
# issue #14: never set it on a cluster anyone else can reach.
NO_AUTH = _NoAuth()
INSECURE_ENV = "FIREFLYER_INSECURE_NO_AUTH"


def insecure() -> bool:
    """True when $FIREFLYER_INSECURE_NO_AUTH is "1" (benchmarks only; see the note above)."""
    return os.environ.get(INSECURE_ENV) == "1"


def server_settings(cluster: Cluster) -> dict:
    """Keyword arguments for an ``RpcServer`` of a service of ``cluster``: its authenticator (the
    cluster key, ``[security] encrypt``) and the ``[security]`` limits that are set."""
    sec = cluster.section("security")
    if insecure():
        logging.getLogger(__name__).warning("%s=1: authentication is OFF (benchmarks only)", INSECURE_ENV)
        out: dict = {"auth": NO_AUTH}
    else:
        out = {"auth": Authenticator(load_cluster_key(cluster), encrypt=bool(sec.get("encrypt", False)),
                                     timeout=float(sec.get("handshake_timeout", HANDSHAKE_TIMEOUT)))}
    for k in ("idle_timeout", "max_connections", "max_connections_per_host"):
        if k in sec:
            out[k] = sec[k]
    return out


def client_credential(cluster: Cluster | None = None) -> Credential:
    """The credential a client uses: the file named by $FIREFLYER_CREDENTIAL (a job's own), else
    the cluster key when this user can read it, else an ``AuthError`` naming both."""
    if insecure():
        return NO_AUTH  # type: ignore[return-value] - see the note on NO_AUTH
    env = os.environ.get(_ENV)
    if env:
        return Credential.load(env)
    if cluster is None:
        raise AuthError(f"no credential: ${_ENV} is not set and no cluster description was given")
    try:
        return load_cluster_key(cluster)
    except AuthError as exc:
        raise AuthError(f"no credential: ${_ENV} is not set, and the cluster key is not usable ({exc})") from None


# -- the handshake -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Principal:
    """Who is at the other end of an authenticated connection."""

    key_id: str
    roles: frozenset[str]
    expires: float | None = None


SERVICE_PRINCIPAL = Principal(CLUSTER_KEY_ID, _SERVICE_ROLES)


class Authenticator:
    """What a server holds to verify peers: the cluster key (every secret in it is accepted)."""

    def __init__(self, key: Credential, *, encrypt: bool = False, timeout: float = HANDSHAKE_TIMEOUT) -> None:
        if key.key_id != CLUSTER_KEY_ID:
            raise AuthError(f"a server needs the cluster key, not a {key.key_id!r} credential")
        self.key = key
        self.encrypt = encrypt
        self.timeout = timeout
        self._by_fp = {fingerprint(s): s for s in key.secrets}

    @classmethod
    def of(cls, auth: Authenticator | Credential | None, **kw) -> Authenticator:
        if isinstance(auth, Authenticator) or auth is NO_AUTH:
            return auth
        if isinstance(auth, Credential):
            return cls(auth, **kw)
        raise AuthError("no cluster key configured: a server never runs unauthenticated. Pass "
                        "auth=load_cluster_key(cluster) (services), or auth=new_cluster_key() in tests")

    def key_for(self, key_id: str, expires: float | None, fp: str) -> bytes | None:
        """The secret a peer with this hello must hold, or None when no key of ours matches."""
        if key_id == CLUSTER_KEY_ID:
            return self._by_fp.get(fp) if expires is None else None
        for master in self.key.secrets:
            k = _derive_secret(master, key_id, expires)
            if hmac.compare_digest(fingerprint(k), fp):
                return k
        return None


def _proof(key: bytes, label: bytes, transcript: bytes) -> bytes:
    return hmac.new(key, b"fireflyer-auth-v1\0" + label + b"\0" + transcript, hashlib.sha256).digest()


def _transcript(kid: str, exp, fp: str, nc: bytes, ns: bytes, cenc: bool, senc: bool) -> bytes:
    return msgpack.packb([PROTOCOL_VERSION, kid, exp, fp, nc, ns, cenc, senc], use_bin_type=True)


def _send(conn: Connection, obj: dict, timeout: float) -> None:
    conn.send(msgpack.packb(obj, use_bin_type=True), timeout=timeout)


def _recv(conn: Connection, timeout: float, what: str) -> dict:
    header, plen = conn.recv_header(timeout=timeout, max_header=_HELLO_MAX)
    if plen:
        raise ProtocolError(f"{what} from {conn.peer}: unexpected {plen}-byte payload", conn.peer)
    try:
        d = msgpack.unpackb(header, raw=False)
    except Exception as exc:
        raise ProtocolError(f"{what} from {conn.peer}: not a handshake message ({exc})", conn.peer) from None
    if not isinstance(d, dict):
        raise ProtocolError(f"{what} from {conn.peer}: not a handshake message", conn.peer)
    return d


def _refuse(conn: Connection, why: str, timeout: float) -> AuthError:
    try:
        _send(conn, {"e": why}, min(timeout, 1.0))
    except TransportError:
        pass
    return AuthError(f"refused {conn.peer}: {why}")


def client_handshake(conn: Connection, cred: Credential, *, encrypt: bool = False,
                     timeout: float = HANDSHAKE_TIMEOUT) -> Connection:
    """Authenticate ``conn`` (just connected) with ``cred`` and check the server's proof.

    Returns the connection to use (a sealed one when either side asked for encryption); raises
    :class:`AuthError` (the server refused us, or failed to prove it holds the key).
    """
    if cred.expired():
        raise AuthError(f"credential {cred.key_id!r} expired at {time.ctime(cred.expires)}; ask for a new one")
    nc = secrets.token_bytes(NONCE_BYTES)
    fp = cred.fingerprint
    try:
        _send(conn, {"v": PROTOCOL_VERSION, "kid": cred.key_id, "exp": cred.expires, "fp": fp, "nc": nc,
                     "enc": bool(encrypt)}, timeout)
        d = _recv(conn, timeout, "handshake")
        if "e" in d:
            raise AuthError(f"{conn.peer} refused credential {cred.key_id!r}: {d['e']}")
        ns, senc, proof = d.get("ns"), d.get("enc"), d.get("proof")
        if not (isinstance(ns, bytes) and len(ns) == NONCE_BYTES and isinstance(proof, bytes)
                and isinstance(senc, bool)):
            raise AuthError(f"{conn.peer}: malformed handshake answer (not a fireflyer server?)")
        tr = _transcript(cred.key_id, cred.expires, fp, nc, ns, bool(encrypt), senc)
        if not hmac.compare_digest(proof, _proof(cred.secret, b"server", tr)):
            raise AuthError(f"{conn.peer} failed to prove it holds the cluster key: not our server "
                            "(or another cluster's); refusing to talk to it")
        _send(conn, {"proof": _proof(cred.secret, b"client", tr)}, timeout)
        d = _recv(conn, timeout, "handshake")
        if "e" in d:
            raise AuthError(f"{conn.peer} refused credential {cred.key_id!r}: {d['e']}")
        if d.get("ok") is not True:
            raise AuthError(f"{conn.peer}: malformed handshake answer")
    except PeerClosed as exc:
        conn.close()
        raise AuthError(f"{conn.peer} closed the connection during the handshake ({exc}); is it a "
                        "fireflyer server of this cluster?") from exc
    except BaseException:
        conn.close()
        raise
    if encrypt or senc:
        from ..seal import seal
        return seal(conn, cred.secret, nc, ns, client=True)
    return conn


def server_handshake(conn: Connection, auth: Authenticator) -> tuple[Connection, Principal]:
    """Authenticate the peer of a just-accepted ``conn``; returns the connection to serve (sealed
    when either side asked for encryption) and the peer's principal. Raises :class:`AuthError`
    (after telling the peer why) or a transport error; the caller closes the connection."""
    t = auth.timeout
    d = _recv(conn, t, "hello")
    v, kid, exp, fp, nc, cenc = (d.get(k) for k in ("v", "kid", "exp", "fp", "nc", "enc"))
    if v != PROTOCOL_VERSION:
        raise _refuse(conn, f"protocol version {v!r} not supported (this server speaks {PROTOCOL_VERSION})", t)
    if not (isinstance(kid, str) and isinstance(fp, str) and isinstance(nc, bytes) and len(nc) == NONCE_BYTES
            and isinstance(cenc, bool) and (exp is None or isinstance(exp, int | float))):
        raise _refuse(conn, "malformed hello", t)
    if exp is not None and time.time() >= exp:
        raise _refuse(conn, f"credential {kid!r} expired at {time.ctime(exp)}", t)
    key = auth.key_for(kid, exp, fp)
    if key is None:
        raise _refuse(conn, f"credential {kid!r} (key {fp}) was not issued by this cluster's key", t)
    ns = secrets.token_bytes(NONCE_BYTES)
    tr = _transcript(kid, exp, fp, nc, ns, cenc, auth.encrypt)
    _send(conn, {"ns": ns, "enc": auth.encrypt, "proof": _proof(key, b"server", tr)}, t)
    d = _recv(conn, t, "handshake")
    proof = d.get("proof")
    if not isinstance(proof, bytes) or not hmac.compare_digest(proof, _proof(key, b"client", tr)):
        raise _refuse(conn, f"wrong proof for credential {kid!r}", t)
    roles = _roles(kid)
    _send(conn, {"ok": True, "roles": sorted(roles)}, t)
    if cenc or auth.encrypt:
        from ..seal import seal
        conn = seal(conn, key, nc, ns, client=False)
    return conn, Principal(kid, roles, exp)


# -- command line ------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m network.auth", description="fireflyer cluster keys")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("new-key", help="write a fresh cluster key (mode 0600)")
    p.add_argument("path")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p = sub.add_parser("add-key", help="rotation step 1: append a fresh key (accepted, not yet used)")
    p.add_argument("path")
    p = sub.add_parser("promote", help="rotation step 2: make the newest key the one used to connect")
    p.add_argument("path")
    p = sub.add_parser("drop-old", help="rotation step 3: keep only the key used to connect")
    p.add_argument("path")
    p = sub.add_parser("derive", help="write a client credential derived from a cluster key")
    p.add_argument("key")
    p.add_argument("key_id")
    p.add_argument("--ttl", type=float, default=86400.0, help="seconds of validity (default a day)")
    p.add_argument("--out", required=True)
    p = sub.add_parser("show", help="key id, fingerprints and expiry (never the secret)")
    p.add_argument("path")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "new-key":
            if Path(a.path).exists() and not a.force:
                ap.exit(2, f"{a.path} exists (use --force to replace it; see docs/security.md on rotation)\n")
            new_cluster_key().save(a.path)
        elif a.cmd == "add-key":
            c = Credential.load(a.path)
            Credential(c.key_id, c.secret, c.expires, (*c.accepted, secrets.token_bytes(KEY_BYTES))).save(a.path)
        elif a.cmd == "promote":
            c = Credential.load(a.path)
            if not c.accepted:
                ap.exit(2, f"{a.path} holds one key only; add one first (add-key)\n")
            ks = c.secrets
            Credential(c.key_id, ks[-1], c.expires, ks[:-1]).save(a.path)
        elif a.cmd == "drop-old":
            c = Credential.load(a.path)
            Credential(c.key_id, c.secret, c.expires).save(a.path)
        elif a.cmd == "derive":
            derive(Credential.load(a.key), a.key_id, time.time() + a.ttl).save(a.out)
        c = Credential.load(a.path if a.cmd != "derive" else a.out)
        print(f"{c.key_id}: keys {', '.join(fingerprint(s) for s in c.secrets)} (first is used to connect)"
              + (f", expires {time.ctime(c.expires)}" if c.expires else ""))
    except AuthError as exc:
        ap.exit(1, f"error: {exc}\n")
    return 0
