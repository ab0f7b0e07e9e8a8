"""API keys. With CAPE_API_KEYS set, a request needs ``Authorization: Bearer <key>``; jobs belong to the key that
created them, and a key sees and cancels only its own (others' are 404: not even their existence leaks).
Unset, the API is open and every job belongs to the empty owner."""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, HTTPException
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.settings import get_settings

bearer = HTTPBearer(auto_error=False, description="one of the server's CAPE_API_KEYS")


def key_id(key: str) -> str:
    """What the database keeps of a key: enough to tell keys apart, useless to an attacker."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


async def current_owner(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> str:
    # async: a few comparisons, no I/O: running it on the event loop saves a thread hop per request.
    keys = get_settings().api_key_list
    if not keys:
        return ""
    token = credentials.credentials.encode() if credentials else b""
    matched = None
    for key in keys:  # every key compared, each in constant time: the timing says nothing about which one is close
        if hmac.compare_digest(token, key.encode()):
            matched = key
    if matched is None:
        raise HTTPException(
            status_code=401,
            detail="missing or invalid API key: send 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return key_id(matched)


OwnerDep = Annotated[str, Depends(current_owner)]
