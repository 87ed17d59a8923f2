"""Chat plumbing: gradio history <-> engine messages (by ``messages.py``'s rule), streaming, Stop / Retry / Clear.

The conversation lives in each browser's Chatbot value (sent with every request), so one session never
sees another's. Stop works through a per-session ``threading.Event`` the engine checks at each token;
what was written stays. The handlers only ever call ``stream_chat`` and read ``TokenEvent``s.
"""
from __future__ import annotations

import math
import sys
import threading
import traceback
from typing import Any, Callable, Iterator, Optional

from ..config import ConfigError, SamplingParams
from ..messages import MessageError, Turn, to_turn

FINISH_TEXT = {
    "eos": "finished",
    "stop": "hit a stop string",
    "length": "reached max new tokens",
    "cancelled": "stopped",
    "context": "context window full",
    "oom": "out of GPU memory",
}


class EngineSlot:
    """The engine, or the story of its loading: the page opens at once and shows the progress lines."""

    def __init__(self, engine: Any = None, echo: bool = False) -> None:
        self.engine = engine
        self.lines: list[str] = []
        self.error: Optional[str] = None
        self.echo = echo
        self.ready = threading.Event()
        self.label = ""
        if engine is not None:
            self.ready.set()

    def progress(self, msg: str) -> None:
        line = str(msg).rstrip()
        self.lines.append(line)
        del self.lines[:-200]
        if self.echo:
            print(line, file=sys.stderr, flush=True)

    def load_in_background(self, loader: Callable[[Callable[[str], None]], Any]) -> threading.Thread:
        """Run ``loader(progress) -> Engine`` on a thread; errors are kept for the page and the terminal."""
        def run() -> None:
            try:
                self.engine = loader(self.progress)
            except BaseException as exc:   # noqa: BLE001 - shown to the user, the server stays up
                self.error = f"{type(exc).__name__}: {exc}"
                self.progress(f"loading failed: {self.error}")
                if self.echo:
                    traceback.print_exc()
            finally:
                self.ready.set()

        t = threading.Thread(target=run, name="mixoff-load", daemon=True)
        t.start()
        return t

    def get(self) -> Any:
        """The engine, or a clear error to show the user."""
        if self.engine is not None:
            return self.engine
        if self.error:
            raise RuntimeError(f"the model could not be loaded: {self.error}")
        raise RuntimeError("the model is still loading; the panel on the right shows its progress")


# ---- history ------------------------------------------------------------------------------------
def _get(msg: Any, key: str) -> Any:
    return msg.get(key) if isinstance(msg, dict) else getattr(msg, key, None)


def _is_notice(msg: Any) -> bool:
    """A message the page added itself (a titled notice), not part of the conversation."""
    meta = _get(msg, "metadata")
    return bool(meta and (meta.get("title") if isinstance(meta, dict) else getattr(meta, "title", None)))


def normalise_history(history: Any, where: str = "history") -> list[Turn]:
    """A Chatbot value (or the /chat API's history) -> turns by the one rule of ``messages.py`` (a non-text
    block is refused with a ``MessageError`` naming it), less the page's own notices."""
    if history is None:
        return []
    if not isinstance(history, (list, tuple)):
        raise MessageError(f"{where} must be a list of {{\"role\": ..., \"content\": ...}} messages", where)
    return [to_turn(m, f"{where}[{i}]") for i, m in enumerate(history) if not _is_notice(m)]


def to_messages(history: Any, system_prompt: str = "") -> list[dict]:
    """{role, content} messages (what the Chatbot shows and the engine takes): an optional system prompt, then
    the turns; empty assistant turns (an answer that wrote nothing) are left out."""
    turns = [t for t in normalise_history(history) if t.role != "assistant" or t.text]
    sys_text = (system_prompt or "").strip()
    return [m.message() for m in ([Turn("system", sys_text)] if sys_text else []) + turns]


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{name} must be a number, not {_short(value)}")
    try:
        x = float(value)
    except ValueError:
        raise ConfigError(f"{name} must be a number, not {_short(value)}") from None
    if not math.isfinite(x):
        raise ConfigError(f"{name} must be a finite number, not {_short(value)}")
    return x


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def sampling(temperature: Any, top_p: Any, max_new_tokens: Any) -> SamplingParams:
    """UI or API values -> SamplingParams (temperature 0 is greedy). Bad values raise ConfigError."""
    n = _number(max_new_tokens, "max new tokens")
    if not n.is_integer():
        raise ConfigError(f"max new tokens must be a whole number, not {_short(max_new_tokens)}")
    t = _number(temperature, "temperature")
    return SamplingParams(max_new_tokens=int(n), temperature=t, top_p=_number(top_p, "top_p"), greedy=t == 0)


def api_text(value: Any, name: str, limit: int) -> str:
    """A text argument of an API call: a string (None: empty) within ``limit`` characters."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be text, not {type(value).__name__}")
    if len(value) > limit:
        raise ConfigError(f"the {name.replace('_', ' ')} is too long: {len(value):,} characters, and this server "
                          f"takes at most {limit:,}")
    return value


def api_history(value: Any) -> list:
    """The history argument of an API call: a list of {role, content} messages (None: empty)."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise ConfigError("history must be a list of {\"role\": ..., \"content\": ...} messages")
    return value


def refuse(where: str, message: str) -> Exception:
    """The gradio error a user sees for a refused request, with one line (no traceback) in the server log."""
    import gradio as gr  # the handlers' module imports gradio anyway; keep this one testable

    print(f"mixoff: refused {where}: {message}", file=sys.stderr, flush=True)
    return gr.Error(message, print_exception=False)


def strip_to_last_user(history: Any) -> list[dict]:
    """Retry: drop the answer (and notices) after the last user turn."""
    msgs = to_messages(history)
    while msgs and msgs[-1]["role"] != "user":
        msgs.pop()
    return msgs


# ---- streaming ----------------------------------------------------------------------------------
class Canceller:
    """Per browser session: the cancel event of its current answer, and a turn counter.

    A new question (or Retry) stops the session's running answer and starts a new turn; Clear does the
    same; Stop only sets the event, so the stopped answer keeps what it wrote. An answer whose turn is
    over stops writing into the chat, so a late token never brings back a cleared conversation.
    """

    def __init__(self) -> None:
        self._events: dict[str, threading.Event] = {}
        self._turns: dict[str, int] = {}
        self._cleared: dict[str, bool] = {}     # the current turn was started by Clear
        self._lock = threading.Lock()

    def begin(self, session: str) -> tuple[threading.Event, int]:
        with self._lock:
            old = self._events.get(session)
            if old is not None:
                old.set()
            ev = self._events[session] = threading.Event()
            turn = self._turns[session] = self._turns.get(session, 0) + 1
            self._cleared[session] = False
            return ev, turn

    def current(self, session: str) -> tuple[threading.Event, int]:
        with self._lock:
            return self._events.setdefault(session, threading.Event()), self._turns.get(session, 0)

    def turn(self, session: str) -> int:
        with self._lock:
            return self._turns.get(session, 0)

    def cancel(self, session: str) -> bool:
        with self._lock:
            ev = self._events.get(session)
        if ev is None:
            return False
        ev.set()
        return True

    def clear(self, session: str) -> None:
        with self._lock:
            ev = self._events.get(session)
            if ev is not None:
                ev.set()
            self._turns[session] = self._turns.get(session, 0) + 1
            self._cleared[session] = True

    def cleared(self, session: str) -> bool:
        """Whether the session's latest turn was started by Clear (its chat should stay empty)."""
        with self._lock:
            return self._cleared.get(session, False)


def stream_answer(engine: Any, messages: list[dict], params: SamplingParams, cancel: threading.Event,
                  on_notice: Callable[[str], None] = lambda text: None, session: Optional[str] = None
                  ) -> Iterator[tuple[str, int, Optional[str]]]:
    """Yield (answer so far, tokens so far, finish_reason or None) as tokens arrive; closes the engine
    stream on exit so the engine's lock is released even when the client goes away mid-answer.
    ``session`` keys the engine's KV reuse to this browser session."""
    text, n = "", 0
    it = engine.stream_chat(messages, params, cancel=cancel, session=session)
    try:
        for ev in it:
            if ev.kind == "token":
                n += 1
                if ev.text:
                    text += ev.text
                    yield text, n, None
            elif ev.kind == "notice":
                on_notice(ev.text)
            elif ev.kind == "done":
                yield text, n, ev.finish_reason or "eos"
                return
        yield text, n, "eos"
    finally:
        cancel.set()
        close = getattr(it, "close", None)
        if close is not None:
            close()


def status_line(tokens: int, elapsed: float, reason: Optional[str]) -> str:
    rate = f" · {tokens / elapsed:.1f} tok/s" if elapsed > 0 and tokens > 1 else ""
    if reason is None:
        return f"generating… {tokens} tokens{rate}"
    return f"{FINISH_TEXT.get(reason, reason)} · {tokens} tokens in {elapsed:.1f} s{rate}"
