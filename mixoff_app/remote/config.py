"""Where the remote backend is and how to reach it: ``--backend URL``, ``--backend-key`` (or MIXOFF_BACKEND_KEY)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional
from urllib.parse import urlsplit, urlunsplit

from ..access import is_loopback
from ..config import ConfigError

ENV_KEY = "MIXOFF_BACKEND_KEY"


def api_base(url: str) -> str:
    """``--backend`` as the API's base URL, ending in /v1 (``http://gpu-box:8000`` and ``.../v1/`` alike).

    A key inside the URL (``https://user:key@host``) is refused: it would show in logs, the page and ``ps``."""
    text = (url or "").strip()
    parts = urlsplit(text if "://" in text else f"http://{text}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"--backend takes an http(s) URL such as http://gpu-box:8000/v1, not {text[:80]!r}")
    if parts.username is not None or parts.password is not None:
        raise ConfigError("--backend must not carry credentials in the URL: give the key with --backend-key, or "
                          f"better in {ENV_KEY} (it stays out of the process list)")
    if parts.query or parts.fragment:
        raise ConfigError("--backend takes the API's base URL without a query or fragment, e.g. http://gpu-box:8000/v1")
    try:
        parts.port
    except ValueError:
        raise ConfigError(f"--backend has a bad port: {text[:80]!r}") from None
    path = parts.path.rstrip("/")
    if not path.endswith("/v1"):
        path += "/v1"
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def backend_key(flag: Optional[str], environ: Mapping[str, str]) -> Optional[str]:
    """The key from ``--backend-key``, else MIXOFF_BACKEND_KEY; None without either. A blank key is refused."""
    key = flag if flag is not None else environ.get(ENV_KEY)
    if key is not None and not key.strip():
        raise ConfigError(f"the backend key is blank: give --backend-key a value (or unset {ENV_KEY})")
    return key.strip() if key is not None else None


@dataclass(frozen=True)
class BackendConfig:
    url: str                                            # the API's base, ending in /v1 (``api_base``)
    key: Optional[str] = field(default=None, repr=False)   # sent as a Bearer token to ``url`` only
    model: Optional[str] = None                         # which of the server's models (default: its first)
    connect_s: float = 5.0                              # an unreachable server is said at once, not after minutes
    read_s: float = 300.0                               # the longest wait for the next piece of an answer
    probe_s: float = 2.0                                # the panel's polls give up sooner: they repeat

    def __post_init__(self) -> None:
        if api_base(self.url) != self.url:
            raise ValueError(f"BackendConfig.url must be an API base from api_base(), not {self.url!r}")

    @property
    def where(self) -> str:
        """The URL as shown to people and logs (it never carries the key)."""
        return self.url

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    def plain_http_warning(self) -> Optional[str]:
        """What to tell the operator when the key would cross the network unencrypted."""
        if self.key and urlsplit(self.url).scheme == "http" and not is_loopback(self.host):
            return (f"warning: the backend key goes to {self.url} over plain http, readable on the way; use https "
                    f"(e.g. a TLS proxy in front of the server) or an SSH tunnel to a loopback port")
        return None
