"""Sealed connections: every frame encrypted and authenticated with AES-GCM (``[security] encrypt``).

After the handshake (:mod:`network.auth`) both ends derive two session keys, one per direction,
from the connection's key and both nonces; each frame's header and payload are sealed as two
AES-GCM messages whose nonces are a per-direction frame counter, so a frame cannot be replayed,
dropped or reordered without the receiver noticing. On the wire a sealed frame is an ordinary
frame whose header and payload are the ciphertexts (each 16 bytes longer, the tag).

[Note: sealing costs copies] The plain path lands payloads straight in the caller's buffers; a
sealed payload is received into a scratch buffer and decrypted into the caller's, and a file
region is read into memory before it is sealed. Encryption is off by default (the cluster
fabric is trusted, as 3FS and Lustre assume); authentication alone costs nothing per byte.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import ProtocolError
from .transport import MAX_HEADER, Connection, FileRegion, as_bytes

__all__ = ["SealedConnection", "seal"]

_TAG = 16
_NONCE = struct.Struct("!4xQ")


def _session_key(key: bytes, label: bytes, nc: bytes, ns: bytes) -> bytes:
    return hmac.new(key, b"fireflyer-seal-v1\0" + label + b"\0" + nc + ns, hashlib.sha256).digest()


class SealedConnection(Connection):
    """A :class:`Connection` whose frames are sealed with AES-GCM (same API)."""

    _tx: AESGCM
    _rx: AESGCM
    _tx_n: int
    _rx_n: int

    def _next(self, send: bool) -> bytes:
        if send:
            n, self._tx_n = self._tx_n, self._tx_n + 1
        else:
            n, self._rx_n = self._rx_n, self._rx_n + 1
        return _NONCE.pack(n)

    def send(self, header: bytes = b"", *payload, timeout=...) -> int:
        parts = []
        for p in payload:
            if isinstance(p, FileRegion):
                data = os.pread(p.fd, p.length, p.offset)
                if len(data) != p.length:
                    self.close()
                    raise ProtocolError(f"send to {self.peer}: file ended {p.length - len(data)} bytes short "
                                        f"of a {p.length}-byte region at offset {p.offset}", self.peer)
                parts.append(data)
            else:
                parts.append(as_bytes(p))
        plain = b"".join(parts)
        h = self._tx.encrypt(self._next(True), bytes(header), None)
        body = self._tx.encrypt(self._next(True), plain, None) if plain else b""
        super().send(h, *([body] if body else []), timeout=timeout)
        return len(plain)

    def recv_header(self, timeout=..., max_header: int = MAX_HEADER) -> tuple[bytes, int]:
        h, plen = super().recv_header(timeout, max_header=max_header + _TAG)
        try:
            header = self._rx.decrypt(self._next(False), h, None)
        except InvalidTag:
            self.close()
            raise ProtocolError(f"receive from {self.peer}: a sealed frame failed its check (tampered, "
                                "replayed or not from our peer)", self.peer) from None
        if plen and plen < _TAG:
            self.close()
            raise ProtocolError(f"receive from {self.peer}: sealed payload shorter than its tag", self.peer)
        return header, (plen - _TAG if plen else 0)

    def recv_payload_into(self, buf, nbytes: int, timeout=...) -> None:
        if not nbytes:
            return
        views = [as_bytes(b) for b in buf] if isinstance(buf, list | tuple) else [as_bytes(buf)]
        if any(v.readonly for v in views):
            raise TypeError("recv_payload_into needs a writable buffer")
        room = sum(v.nbytes for v in views)
        scratch = bytearray(nbytes + _TAG)
        super().recv_payload_into(scratch, nbytes + _TAG, timeout)
        try:
            plain = memoryview(self._rx.decrypt(self._next(False), scratch, None))  # no copies: slices below
        except InvalidTag:
            self.close()
            raise ProtocolError(f"receive from {self.peer}: a sealed payload failed its check", self.peer) from None
        if room < nbytes:
            raise ProtocolError(f"receive from {self.peer}: payload of {nbytes} bytes does not fit a "
                                f"{room}-byte buffer (mismatched sizes between peers?)", self.peer)
        pos = 0
        for v in views:
            k = min(v.nbytes, nbytes - pos)
            v[:k] = plain[pos:pos + k]
            pos += k
            if pos == nbytes:
                break

    def skip_payload(self, nbytes: int, timeout=...) -> None:
        """Read and drop a sealed payload of ``nbytes`` plain bytes (its ciphertext, unchecked)."""
        if not nbytes:
            return
        left = nbytes + _TAG
        scratch = bytearray(min(left, 1 << 20))
        while left:
            n = min(left, len(scratch))
            Connection.recv_payload_into(self, scratch, n, timeout)
            left -= n
        self._rx_n += 1


def seal(conn: Connection, key: bytes, nc: bytes, ns: bytes, *, client: bool) -> SealedConnection:
    """The sealed form of a just-authenticated connection (it takes over the socket)."""
    sealed = SealedConnection.__new__(SealedConnection)
    sealed.__dict__.update(conn.__dict__)
    c2s = AESGCM(_session_key(key, b"client->server", nc, ns))
    s2c = AESGCM(_session_key(key, b"server->client", nc, ns))
    sealed._tx, sealed._rx = (c2s, s2c) if client else (s2c, c2s)
    sealed._tx_n = sealed._rx_n = 0
    return sealed
