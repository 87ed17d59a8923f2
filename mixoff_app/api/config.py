"""How the OpenAI-compatible API is served: who may use it, and the defaults it fills in."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

ENV_KEY = "MIXOFF_API_KEY"


def api_keys(flags: Optional[Sequence[str]], environ: Mapping[str, str]) -> tuple[str, ...]:
    """The keys from ``--api-key`` (each use one key), else from MIXOFF_API_KEY (one key, or several separated
    by commas); none when neither is given. Blank keys are left for ApiConfig to refuse."""
    if flags is not None:
        return tuple(flags)
    env = environ.get(ENV_KEY) or ""
    return tuple(k.strip() for k in env.split(",")) if env else ()


@dataclass(frozen=True)
class ApiConfig:
    # Each key is required as `Authorization: Bearer KEY` and is a principal of its own: the answers made with
    # one key reuse its own KV cache, and only its holders see those answers' details. No keys: keyless rules.
    keys: tuple[str, ...] = ()
    host: str = "127.0.0.1"          # the address the server is bound to (decides whether /v1 may run keyless)
    share: bool = False              # a public share link points at this server
    admin: Optional[str] = None      # the page's --admin user: with one, no API caller counts as the operator
    default_max_tokens: int = 256    # an answer's length when the request names no max_tokens
    max_body_bytes: int = 8 << 20    # a larger request body is refused before it is read
    return_routed_experts: bool = False   # every answer carries its routing, asked for or not (vLLM's flag)

    def __post_init__(self) -> None:
        if isinstance(self.keys, str):
            raise TypeError("ApiConfig.keys is a tuple of keys, not one string")
        if any(not k.strip() for k in self.keys):
            raise ValueError(f"an API key is blank: give --api-key a non-empty value (or unset {ENV_KEY})")
        if len(set(self.keys)) != len(self.keys):
            raise ValueError("the same API key is given twice: each key names one principal")
        if self.default_max_tokens < 1:
            raise ValueError(f"default_max_tokens must be at least 1, not {self.default_max_tokens}")
