"""A job's own token for the HTTP API: ``job.<chain id>.<MAC>``, given to its ranks as $HAI_JOB_TOKEN.

The MAC is an HMAC-SHA256 of the chain id under the cluster secret, so the agent that starts the
rank makes the token and the API checks it without storing anything; its holder cannot change the
chain it names. The API lets a job token read its own job's status and logs and nothing else, and
only while the job has not finished (``haiplatform.api``). User tokens never contain a dot, so
the two kinds cannot be confused.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

__all__ = ["PREFIX", "job_token", "chain_of"]

PREFIX = "job."


def job_token(secret: str, chain_id: int) -> str:
    """The token of the job whose chain is ``chain_id``, under the cluster secret ``secret``."""
    mac = hmac.new(secret.encode(), f"fireflyer-job-token\0{int(chain_id)}".encode(), hashlib.sha256).digest()
    return f"{PREFIX}{int(chain_id)}.{base64.urlsafe_b64encode(mac[:24]).decode()}"


def chain_of(secret: str, token: str) -> int | None:
    """The chain id a job token names, or None when it is not a valid job token under ``secret``."""
    parts = token.split(".")
    if len(parts) != 3 or parts[0] + "." != PREFIX or not parts[1].isdigit() or len(parts[1]) > 18:
        return None
    chain = int(parts[1])
    return chain if hmac.compare_digest(job_token(secret, chain), token) else None
