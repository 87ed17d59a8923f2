"""Who may use /v1. With a key: whoever sends it. Without one: only this machine, and only while the server
is bound to loopback with no share link (anything else reaches it from outside)."""
from __future__ import annotations

import hashlib
import hmac
from typing import Optional

from ..access import Access, is_loopback, user_snapshot
from .config import ENV_KEY, ApiConfig
from .errors import ApiError


def keyless_ok(config: ApiConfig) -> bool:
    return is_loopback(config.host) and not config.share


def session(config: ApiConfig) -> str:
    """The engine session of API answers (it keys KV reuse and whose answer details a caller may see): one per
    key, since every holder of the key is the same principal; OpenAI clients carry no session of their own."""
    return "api:" + (_digest(config.key).hex()[:16] if config.key else "local")


def stats_view(engine, config: ApiConfig) -> dict:
    """/v1/mixoff/stats under the page's rule (``mixoff_app.access``): the operator sees everything; anyone else
    sees the server's figures, and the latest answer's routing, prompt size and timings only when it was the
    API's. The API has no login, so with ``--admin`` set no API caller is the operator."""
    snap = engine.stats()
    if not Access(admin=config.admin).is_operator(None, config.host, config.share):
        snap = user_snapshot(snap, own_answer=engine.answer_session == session(config))
    return snap.to_dict()


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
