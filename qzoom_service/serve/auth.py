"""Optional API-key check on the `authorization` metadata (`Bearer <key>` or the bare key)."""

from __future__ import annotations

import hmac

__all__ = ["check_api_key"]


def check_api_key(metadata, keys: frozenset[str]) -> str | None:
    """None when allowed; otherwise the reason to send with UNAUTHENTICATED. No keys = auth off."""
    if not keys:
        return None
    values = [v for k, v in (metadata or ()) if k.lower() == "authorization"]
    if not values:
        return "missing authorization metadata: send 'authorization: Bearer <api key>'"
    token = values[0].strip()
    if token.lower().startswith("bearer "):
        token = token[7:].strip()
    # Constant-time comparison against every key, so timing does not reveal a prefix match.
    if not any(hmac.compare_digest(token.encode(), k.encode()) for k in keys):
        return "invalid API key"
    return None
