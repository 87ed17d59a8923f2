"""Who may use /v1. With keys: whoever sends one of them, each key a principal of its own. Without: only this
machine, and only while the server is bound to loopback with no share link (anything else reaches it from
outside)."""
from __future__ import annotations

import hashlib
import hmac
from typing import Optional

from ..access import Access, is_loopback
from .config import ENV_KEY, ApiConfig
from .errors import ApiError


def keyless_ok(config: ApiConfig) -> bool:
    return is_loopback(config.host) and not config.share


def session(config: ApiConfig, authorization: Optional[str] = None) -> str:
    """The engine session of an API answer (it keys KV reuse and whose answer details a caller may see): one per
    key, since every holder of a key is the same principal (OpenAI clients carry no session of their own);
    ``api:local`` without keys. Call it for requests that ``refusal`` let through."""
    if not config.keys:
        return "api:local"
    d = _matching(config, _token(authorization))
    return "api:" + (d.hex()[:16] if d is not None else "refused")


def stats_view(engine, config: ApiConfig, authorization: Optional[str] = None) -> dict:
    """/v1/mixoff/stats under the page's rule (``mixoff_app.access``): the operator sees everything (the latest
    answer's routing, prompt size and timings, whoever asked); anyone else sees the server's figures and their
    own key's latest answer, never another's. The API has no login, so with ``--admin`` set no API caller is
    the operator."""
    if Access(admin=config.admin).is_operator(None, config.host, config.share):
        return engine.stats().to_dict()
    return engine.stats(session=session(config, authorization)).to_dict()


def _digest(text: str) -> bytes:
    # Equal-length digests, so the comparison time says nothing about the key's length either.
    return hashlib.sha256(text.encode("utf-8")).digest()


def _token(authorization: Optional[str]) -> Optional[str]:
    scheme, _, token = (authorization or "").strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matching(config: ApiConfig, token: Optional[str]) -> Optional[bytes]:
    """The digest of the configured key ``token`` is, else None; every key is compared, matched or not, so the
    time taken says nothing about which key matched or how many there are before it."""
    if token is None:
        return None
    d, found = _digest(token), None
    for key in config.keys:
        k = _digest(key)
        if hmac.compare_digest(d, k):
            found = k
    return found


def refusal(config: ApiConfig, authorization: Optional[str]) -> Optional[ApiError]:
    """None when the request may go on, else the error to answer it with."""
    if config.keys:
        token = _token(authorization)
        if token is None:
            return ApiError(401, "This server needs an API key: send the header `Authorization: Bearer KEY` "
                                 "(a key given to --api-key).", code="missing_api_key")
        if _matching(config, token) is None:
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
    if config.keys:
        n = len(config.keys)
        return ("needs `Authorization: Bearer KEY` (the --api-key)" if n == 1 else
                f"needs `Authorization: Bearer KEY` with one of its {n} keys, each a caller of its own")
    if keyless_ok(config):
        return "open to this machine without a key (bound to loopback, no share link)"
    return f"refused: no --api-key (or {ENV_KEY}) is set and the server is reachable from outside"
