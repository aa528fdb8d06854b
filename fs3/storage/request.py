"""The arguments of a storage request: a malformed one is refused with ``InvalidRequest``."""

from __future__ import annotations

from contextlib import contextmanager

from ..errors import Fs3Error, InvalidRequest, StorageError

__all__ = ["item_error", "malformed"]


@contextmanager
def malformed(method: str):
    """Turn the ``KeyError`` / ``ValueError`` / ``TypeError`` / ``IndexError`` of reading a request's
    arguments (a missing field, a string where a number goes, a short item) into ``InvalidRequest``
    naming ``method``. Wrap only the reading of arguments: an error of the work itself is a bug and
    must keep its own name."""
    try:
        yield
    except Fs3Error:
        raise
    except KeyError as exc:
        raise InvalidRequest(f"{method}: the request has no field {exc}") from None
    except (ValueError, TypeError, IndexError) as exc:
        raise InvalidRequest(f"{method}: malformed request: {exc}") from None


def item_error(exc: StorageError) -> dict:
    """One item's error in a batch answer (read or write; the client turns it back into ``exc``'s class)."""
    return {"err": type(exc).__name__, "msg": str(exc), "data": exc.rpc_data or {}}
