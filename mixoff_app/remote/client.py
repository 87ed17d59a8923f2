"""HTTP to an OpenAI-compatible server, every failure one sentence.

The key goes in the Authorization header of requests to the configured URL only: redirects are not followed
(a redirect elsewhere would carry the header along), and no message, log line or repr carries it.
"""
from __future__ import annotations

import contextlib
import json
from typing import Any, Iterator, Optional

import httpx

from .config import ENV_KEY, BackendConfig

SNIPPET = 80              # characters of a bad body quoted in a message


class BackendError(ValueError):
    """The backend could not answer: one sentence for the person at the page. A ValueError, so the page's handlers
    show it like any refused request (the text typed stays; what was answered stays). ``unreachable``: no
    connection could be made (the panel then says so until one can)."""

    def __init__(self, message: str, unreachable: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable


def _one_line(text: Any, limit: int = 200) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[:limit - 1] + "…"


def server_message(body: bytes) -> str:
    """The server's own words from an error body: OpenAI's {"error": {"message"}}, vLLM's and SGLang's
    {"object": "error", "message"}, FastAPI's {"detail"}, else the start of the text."""
    try:
        data = json.loads(body.decode("utf-8", "replace"))
    except ValueError:
        return _one_line(body.decode("utf-8", "replace"), SNIPPET)
    if isinstance(data, dict):
        err = data.get("error")
        for v in (err.get("message") if isinstance(err, dict) else err, data.get("message"), data.get("detail")):
            if isinstance(v, str) and v.strip():
                return _one_line(v)
    return _one_line(data, SNIPPET)


class BackendClient:
    def __init__(self, config: BackendConfig) -> None:
        self.config = config
        headers = {"Authorization": f"Bearer {config.key}"} if config.key else {}
        self._http = httpx.Client(base_url=config.url, headers=headers, follow_redirects=False,
                                  timeout=httpx.Timeout(config.read_s, connect=config.connect_s))

    def close(self) -> None:
        self._http.close()

    # ---- requests -------------------------------------------------------------------------------
    def get(self, path: str, timeout: Optional[float] = None) -> Any:
        with self._errors(path):
            r = self._http.get(path, timeout=timeout or httpx.USE_CLIENT_DEFAULT)
        return self._json(r, path)

    def post(self, path: str, body: dict) -> Any:
        with self._errors(path):
            r = self._http.post(path, json=body)
        return self._json(r, path)

    @contextlib.contextmanager
    def stream(self, path: str, body: dict) -> Iterator[Iterator[dict]]:
        """A streamed answer's server-sent events as JSON objects (up to ``data: [DONE]``). Leaving the block
        closes the connection, which is how the server learns that nobody reads any more."""
        with self._errors(path):
            with self._http.stream("POST", path, json=body) as r:
                if r.status_code != 200:
                    r.read()
                    self._refusal(r, path)
                yield self._events(r)

    # ---- reading --------------------------------------------------------------------------------
    def _events(self, r: httpx.Response) -> Iterator[dict]:
        with self._errors("the answer"):
            for line in r.iter_lines():
                if not line.startswith("data:"):
                    continue          # blank separators, comments (": keep-alive"), event names
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                try:
                    event = json.loads(data)
                except ValueError:
                    raise BackendError(f"the backend at {self.config.where} sent a piece of the answer that is not "
                                       f"JSON ({_one_line(data, SNIPPET)!r}); the text so far is kept") from None
                if not isinstance(event, dict):
                    raise BackendError(f"the backend at {self.config.where} sent a piece of the answer that is not "
                                       f"a JSON object ({_one_line(data, SNIPPET)!r})")
                if event.get("error") is not None or event.get("object") == "error":
                    raise BackendError(f"the backend failed while answering: "
                                       f"{server_message(data.encode())}; the text so far is kept")
                yield event

    def _json(self, r: httpx.Response, path: str) -> Any:
        if r.status_code != 200:
            self._refusal(r, path)
        try:
            return r.json()
        except ValueError:
            kind = r.headers.get("content-type", "no content type").split(";")[0]
            raise BackendError(f"{self.config.where} answered {path} with something that is not JSON ({kind}: "
                               f"{_one_line(r.text, SNIPPET)!r}): is it an OpenAI-compatible server? Give the URL of "
                               f"its API, e.g. http://host:8000/v1") from None

    def _refusal(self, r: httpx.Response, path: str) -> None:
        where, code, said = self.config.where, r.status_code, server_message(r.content)
        if code == 401:
            how = ("it needs one: give --backend-key, or set " + ENV_KEY) if not self.config.key else \
                "check --backend-key or " + ENV_KEY
            raise BackendError(f"the backend at {where} refused the key (HTTP 401: {said}): {how}")
        if code in (301, 302, 303, 307, 308):
            raise BackendError(f"the backend at {where} redirects {path} to {r.headers.get('location', 'elsewhere')}: "
                               f"give that URL as --backend (the key is never sent on to another address)")
        if code in (404, 405) and path == "/models":
            raise BackendError(f"{where} is not an OpenAI-compatible server: GET {path} answered HTTP {code}. Give "
                               f"the URL of its API, e.g. http://host:8000/v1")
        raise BackendError(f"the backend at {where} answered {path} with HTTP {code}: {said}")

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Transport failures as one sentence each (the URL, never the key)."""
        where = self.config.where
        try:
            yield
        except httpx.ConnectTimeout:
            raise BackendError(f"the backend at {where} did not accept a connection within "
                               f"{self.config.connect_s:g} s: is the address right, and is it reachable from here?",
                               unreachable=True) from None
        except httpx.ConnectError as exc:
            raise BackendError(f"could not reach the backend at {where} ({_reason(exc)}): is its server running, "
                               f"and is the address right?", unreachable=True) from None
        except httpx.ReadTimeout:
            raise BackendError(f"the backend at {where} sent nothing for {self.config.read_s:g} s while answering "
                               f"{what}; the text so far is kept") from None
        except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
            raise BackendError(f"the backend at {where} broke off {what} ({_reason(exc)}); the text so far is kept") \
                from None
        except httpx.HTTPError as exc:
            raise BackendError(f"the backend at {where} could not be asked: {type(exc).__name__}: {_reason(exc)}") \
                from None


def _reason(exc: Exception) -> str:
    text = _one_line(exc, 120)
    low = text.lower()
    for words, say in (("refused", "connection refused"), ("name or service", "unknown host name"),
                       ("nodename nor servname", "unknown host name"), ("unreachable", "network unreachable"),
                       ("reset by peer", "connection reset")):
        if words in low:
            return say
    return text or type(exc).__name__
