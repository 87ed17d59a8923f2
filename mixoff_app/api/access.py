"""Who may use /v1. With a key: whoever sends it. Without one: only this machine, and only while the server
is bound to loopback with no share link (anything else reaches it from outside)."""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
from typing import Optional

from .config import ENV_KEY, ApiConfig
from .errors import ApiError


def is_loopback(host: str) -> bool:
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False           # a hostname: it may resolve beyond this machine


def keyless_ok(config: ApiConfig) -> bool:
    return is_loopback(config.host) and not config.share


def _digest(text: str) -> bytes:
    # Equal-length digests, so the comparison time says nothing about the key's length either.
    return hashlib.sha256(text.encode("utf-8")).digest()


def refusal(config: ApiConfig, authorization: Optional[str]) -> Optional[ApiError]:
    """None when the request may go on, else the error to answer it with."""
    if config.key:
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return ApiError(401, "This server needs an API key: send the header `Authorization: Bearer KEY` "
                                 "(the key given to --api-key).", code="missing_api_key")
        if not hmac.compare_digest(_digest(token.strip()), _digest(config.key)):
            return ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
        return None
    if keyless_ok(config):
        return None
    where = "a share link points at it" if config.share else f"it is bound to {config.host}, beyond this machine"
    return ApiError(403, f"The OpenAI-compatible API is off because {where} and no key is set: start the server "
                         f"with --api-key KEY (or set {ENV_KEY}) and send `Authorization: Bearer KEY`.",
                    code="api_key_required")


def describe(config: ApiConfig) -> str:
    """One line for the terminal at start-up."""
    if config.key:
        return "needs `Authorization: Bearer KEY` (the --api-key)"
    if keyless_ok(config):
        return "open to this machine without a key (bound to loopback, no share link)"
    return f"refused: no --api-key (or {ENV_KEY}) is set and the server is reachable from outside"
