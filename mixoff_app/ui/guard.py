"""An ASGI guard in front of the Gradio app: request bodies are bounded before anything reads them, and login
guessing is slowed per client address.

Gradio reads and parses a whole request body before our handlers see it, so the chat's own limits (by
characters, ``limits.py``) cannot stop a gigabyte-sized POST from being read into memory. The guard refuses a
body larger than ``max_body_bytes`` from its Content-Length, at once, and stops reading a chunked one as soon
as it passes the limit.

Gradio's login route hands our ``LoginThrottle`` only a name and a password, so that one counts per name and
for the server as a whole. The guard sees the address: after ``max_failures`` wrong logins from one address
within ``window_s`` it answers that address's logins with 429 until the window has passed. (Behind a share
link every request arrives from the tunnel's local end, so there this is one more server-wide limit.)
"""
from __future__ import annotations

import json
import time
from typing import Awaitable, Callable

from ..access import FailureWindow

Scope = dict
Message = dict
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MAX_BODY_BYTES = 32 << 20    # above the longest message the chat takes (10 MiB is refused by length, in words)


async def _answer(send: Send, status: int, detail: str, headers: tuple = ()) -> None:
    body = json.dumps({"detail": detail}).encode()       # Gradio's own errors use "detail" too
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *headers]})
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    """Pure ASGI middleware (``app_kwargs={"middleware": [Middleware(RequestGuard)]}`` on Gradio's app)."""

    def __init__(self, app, max_body_bytes: int = MAX_BODY_BYTES, max_failures: int = 20, window_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic, log: Callable[[str], None] = lambda msg: None) -> None:
        self.app, self.max_body_bytes, self.max_failures, self.log = app, max_body_bytes, max_failures, log
        self.failures = FailureWindow(window_s, clock)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.max_body_bytes
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await _answer(send, 413, f"the request is larger than this server takes ({limit >> 20} MiB)")
        is_login = scope["method"] == "POST" and scope["path"].rstrip("/").endswith("/login")
        address = (scope.get("client") or ("?",))[0]
        if is_login and self.failures.count(address) >= self.max_failures:
            self.log(f"login refused for {address}: too many wrong tries from there")
            wait = f"{self.failures.window_s:.0f}"
            return await _answer(send, 429, f"too many wrong logins from your address: wait {wait} s and try again",
                                 ((b"retry-after", wait.encode()),))
        state = {"read": 0, "refused": False, "started": False}

        async def bounded_receive() -> Message:
            msg = await receive()
            if msg["type"] == "http.request":
                state["read"] += len(msg.get("body", b""))
                if state["read"] > limit:          # a chunked body without a Content-Length
                    if not state["started"]:
                        state["refused"] = True
                        await _answer(send, 413, f"the request is larger than this server takes ({limit >> 20} MiB)")
                    return {"type": "http.disconnect"}
            return msg

        async def watched_send(msg: Message) -> None:
            if state["refused"]:
                return                              # the guard has answered; the app's reply goes nowhere
            if msg["type"] == "http.response.start":
                state["started"] = True
                if is_login and msg["status"] == 400:      # Gradio's "Incorrect credentials"
                    self.failures.add(address)
            await send(msg)

        await self.app(scope, bounded_receive, watched_send)
