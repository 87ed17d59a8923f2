"""The request guard in front of Gradio: bodies bounded before they are read, login guessing slowed per address."""
from __future__ import annotations

import asyncio
import json

from mixoff_app.ui.guard import RequestGuard


class App:
    """An ASGI app that reads the whole body and answers 200 (or 400 for /login with the wrong password)."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def __call__(self, scope, receive, send):
        body = b""
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        self.bodies.append(body)
        status = 400 if scope["path"] == "/login" and body != b"right" else 200
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def call(guard, path="/x", chunks=(b"",), headers=(), client="10.0.0.1", method="POST"):
    sent = []
    todo = list(chunks)

    async def receive():
        body = todo.pop(0) if todo else b""
        return {"type": "http.request", "body": body, "more_body": bool(todo)}

    async def send(msg):
        sent.append(msg)

    scope = {"type": "http", "method": method, "path": path, "headers": list(headers), "client": (client, 5000)}
    asyncio.run(guard(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], body, start


def test_a_body_over_the_limit_is_refused_from_its_length_without_being_read():
    app = App()
    guard = RequestGuard(app, max_body_bytes=1 << 20)
    status, body, _ = call(guard, headers=[(b"content-length", str(2 << 20).encode())], chunks=[b"x" * 10])
    assert status == 413 and "larger than this server takes (1 MiB)" in json.loads(body)["detail"]
    assert app.bodies == []                                   # the app never ran
    assert call(guard, headers=[(b"content-length", b"-5")])[0] == 413      # nonsense lengths too
    assert call(guard, headers=[(b"content-length", b"3")], chunks=[b"abc"])[0] == 200
    assert app.bodies == [b"abc"]


def test_a_chunked_body_is_cut_off_once_it_passes_the_limit():
    app = App()
    guard = RequestGuard(app, max_body_bytes=1000)
    status, body, _ = call(guard, chunks=[b"x" * 600, b"x" * 600, b"x" * 600])
    assert status == 413 and app.bodies == []                 # the app saw a disconnect, not the body
    assert call(guard, chunks=[b"x" * 600, b"x" * 300])[0] == 200 and app.bodies == [b"x" * 900]


def test_wrong_logins_from_one_address_are_slowed_and_others_are_not():
    now = [0.0]
    app = App()
    said = []
    guard = RequestGuard(app, max_failures=3, window_s=60, clock=lambda: now[0], log=said.append)
    assert [call(guard, "/login", [b"guess"])[0] for _ in range(3)] == [400, 400, 400]
    status, body, start = call(guard, "/login", [b"right"])
    assert status == 429 and "too many wrong logins from your address" in json.loads(body)["detail"]
    assert (b"retry-after", b"60") in start["headers"] and "10.0.0.1" in said[-1]
    assert call(guard, "/login", [b"right"], client="10.0.0.2")[0] == 200     # another address
    assert call(guard, "/other", [b"guess"])[0] == 200                      # other routes pass
    now[0] = 61
    assert call(guard, "/login", [b"right"])[0] == 200                      # the window has passed
