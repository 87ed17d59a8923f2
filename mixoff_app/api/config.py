"""How the OpenAI-compatible API is served: who may use it, and the defaults it fills in."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

ENV_KEY = "MIXOFF_API_KEY"


@dataclass(frozen=True)
class ApiConfig:
    key: Optional[str] = None        # required as `Authorization: Bearer KEY` when set
    host: str = "127.0.0.1"          # the address the server is bound to (decides whether /v1 may run keyless)
    share: bool = False              # a public share link points at this server
    admin: Optional[str] = None      # the page's --admin user: with one, no API caller counts as the operator
    default_max_tokens: int = 256    # an answer's length when the request names no max_tokens
    max_body_bytes: int = 8 << 20    # a larger request body is refused before it is read

    def __post_init__(self) -> None:
        if self.key is not None and not self.key.strip():
            raise ValueError(f"the API key is blank: give --api-key a non-empty value (or unset {ENV_KEY})")
        if self.default_max_tokens < 1:
            raise ValueError(f"default_max_tokens must be at least 1, not {self.default_max_tokens}")
