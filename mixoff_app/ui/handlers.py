"""What the page's buttons, timer and API endpoints do, as plain methods: values in, values out, no gradio.

``layout.build_ui`` wires these to components and turns what gradio needs from them: a ``Refused`` into the
error box (``chat.refuse``), a ``Viewer`` from each request (its session, and whether it is the operator), a
``PanelUpdate``'s unchanged parts into ``gr.skip()`` and its ``Controls`` into ``gr.update``. So each handler
is tested on the real engine without a browser or a server (tests/test_ui_handlers.py).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Optional

from ..access import OPERATOR_ONLY, choice, public_info, redact_paths, whole
from ..config import POLICIES, ConfigError
from ..limits import Busy
from ..messages import MessageError
from . import panel
from .chat import (
    Canceller,
    EngineSlot,
    api_history,
    api_text,
    sampling,
    status_line,
    stream_answer,
    strip_to_last_user,
    to_messages,
)
from .remote_panel import render_any_info, render_any_panel


def experts_bound(info: Any) -> int:
    """The largest k the controls offer: the model's expert count (a remote model's may be unknown: then what its
    routing has shown, ``remote.info.RemoteInfo.experts_bound``)."""
    return getattr(info, "experts_bound", None) or info.num_experts


class Refused(Exception):
    """A request the page refuses: where (for the server log) and the one sentence the user sees."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(message)
        self.where, self.message = where, message


@dataclass(frozen=True)
class Viewer:
    """Who sent a request: the browser session (or API caller) and whether it is the operator."""
    session: str
    operator: bool = False


@dataclass(frozen=True)
class Controls:
    """The cache controls once a model is loaded: their ranges, values, and whether this viewer may edit."""
    k: int
    num_experts: int
    policy: str
    prefetch: int
    editable: bool
    max_context: int


@dataclass(frozen=True)
class PanelUpdate:
    """One panel tick; None means unchanged (the page is not sent it again)."""
    panel: Optional[str] = None
    info: Optional[str] = None
    controls: Optional[Controls] = None
    seen: Optional[dict] = None


def shown_info(info: Any) -> Any:
    """EngineInfo as the page shows it to anyone: without server paths."""
    public = public_info(info)
    return replace(info, model=public["model"], reason=public["reason"], model_path="")


LOADING_FAILED = '<div class="mx-info"><span class="mx-chip mx-chip-error">the model could not be loaded</span></div>'


class Handlers:
    """The page's handlers over one engine slot. ``canceller`` keeps each session's turn and Stop event."""

    def __init__(self, slot: EngineSlot, canceller: Optional[Canceller] = None) -> None:
        self.slot = slot
        self.canceller = canceller or Canceller()

    def engine(self, where: str = "request") -> Any:
        try:
            return self.slot.get()
        except RuntimeError as exc:
            raise Refused(where, redact_paths(str(exc))) from None

    def visible_stats(self, engine: Any, viewer: Viewer):
        """The operator: the latest answer's figures, whoever asked; anyone else: their own latest answer's."""
        return engine.stats() if viewer.operator else engine.stats(session=viewer.session)

    # ---- chat ---------------------------------------------------------------------------------
    def add_user(self, message: Any, history: Any, viewer: Viewer) -> tuple[str, list[dict], int]:
        """Send: (the emptied box, the chat with the question, this question's turn). A refused message stays
        in the box."""
        text = (message if isinstance(message, str) else "").strip()
        if not text:
            raise Refused("send", "Type a message first.")
        engine = self.engine("send")
        if len(text) > engine.limits.message:
            raise Refused("send", f"the message is too long: {len(text):,} characters, and this server takes at "
                                  f"most {engine.limits.message:,}; shorten it")
        shown = _messages("send", history)
        _, turn = self.canceller.begin(viewer.session)
        return "", shown + [{"role": "user", "content": text}], turn

    def respond(self, history: Any, system: Any, temperature: Any, top_p: Any, max_new: Any, turn: int,
                viewer: Viewer, warn: Callable[[str], None] = lambda text: None) -> Iterator[tuple[list, str]]:
        """Stream (chat, status line) for the question of ``turn``; stops writing once the turn is over (Clear
        or a newer question), after Clear with an empty chat. Notices go to ``warn`` and the status line."""
        engine = self.engine("answer")
        messages = _messages("answer", history, system if isinstance(system, str) else "")
        if not messages or messages[-1]["role"] != "user":
            raise Refused("answer", "There is no question to answer: type a message first.")
        try:
            params = sampling(temperature, top_p, max_new)
        except ConfigError as exc:
            raise Refused("answer", str(exc)) from None
        shown = _messages("answer", history)
        notices: list[str] = []
        waiting: list[str] = []

        def notice(text: str) -> None:
            notices.append(text)
            warn(text)

        cancel, current = self.canceller.current(viewer.session)
        if current != turn:
            return                        # cleared, or a newer question came, while this one waited
        start = None
        try:
            for text, n, reason in stream_answer(engine, messages, params, cancel, on_notice=notice,
                                                 session=viewer.session, on_wait=waiting.append):
                if self.canceller.turn(viewer.session) != turn:
                    # After Clear this stream writes the empty chat last, so no token still in flight can bring
                    # the old conversation back.
                    if self.canceller.cleared(viewer.session):
                        yield [], ""
                    return
                if n == 0 and reason is None and waiting:      # every slot is busy: say so while it waits
                    yield shown + [{"role": "assistant", "content": text}], f"waiting: {waiting[-1]}"
                    continue
                start = start or time.perf_counter()
                status = " · ".join([status_line(n, time.perf_counter() - start, reason), *notices])
                yield shown + [{"role": "assistant", "content": text}], status
        except (ValueError, ConfigError, Busy) as exc:
            raise Refused("answer", str(exc)) from None

    def retry(self, history: Any, viewer: Viewer) -> tuple[list[dict], int]:
        try:
            msgs = strip_to_last_user(history)
        except MessageError as exc:
            raise Refused("retry", str(exc)) from None
        if not msgs:
            raise Refused("retry", "Nothing to retry yet.")
        _, turn = self.canceller.begin(viewer.session)
        return msgs, turn

    def stop(self, viewer: Viewer) -> None:
        """The answer ends at its next token and keeps its text."""
        self.canceller.cancel(viewer.session)

    def clear(self, viewer: Viewer) -> tuple[list, str]:
        self.canceller.clear(viewer.session)
        return [], ""

    # ---- panel --------------------------------------------------------------------------------
    def tick(self, seen: Optional[dict], viewer: Viewer) -> PanelUpdate:
        """What changed on the panel since ``seen`` (what this page was last sent)."""
        seen = dict(seen or {})
        engine = self.slot.engine
        if engine is None:
            return self._loading_tick(seen, viewer)
        out = PanelUpdate(seen=seen)
        html = render_any_panel(self.visible_stats(engine, viewer), engine.info)
        if html != seen.get("panel"):
            out = replace(out, panel=html)
            seen["panel"] = html
        info_html = render_any_info(shown_info(engine.info))
        if info_html != seen.get("info"):
            out = replace(out, info=info_html)
            seen["info"] = info_html
        if seen.get("controls") != viewer.operator:
            # The controls take the loaded model's ranges and values once it is there, and are editable only
            # for the operator (the server checks again on Apply).
            seen["controls"] = viewer.operator
            info = engine.info
            out = replace(out, controls=Controls(k=min(info.cache.sizes), num_experts=experts_bound(info),
                                                 policy=info.cache.policy, prefetch=info.cache.prefetch,
                                                 editable=viewer.operator, max_context=info.max_context or 4096))
        return out

    def _loading_tick(self, seen: dict, viewer: Viewer) -> PanelUpdate:
        lines, error = self.slot.lines, self.slot.error
        if not viewer.operator:              # progress lines and errors name server paths
            lines = [redact_paths(x) for x in lines]
            error = redact_paths(error) if error else error
        html = panel.render_loading(lines, error)
        info_html = LOADING_FAILED if self.slot.error else seen.get("info")
        if html == seen.get("panel") and info_html == seen.get("info"):
            return PanelUpdate()
        out = PanelUpdate(panel=html, info=info_html if info_html != seen.get("info") else None, seen=seen)
        seen["panel"], seen["info"] = html, info_html
        return out

    def set_cache(self, k: Any, policy: Any, prefetch: Any, viewer: Viewer) -> tuple[str, str]:
        """Operator only: re-plan the device cache (k experts per layer, eviction policy, prefetch) without
        reloading; (the model line's HTML, a message). Values are checked against the loaded model."""
        engine = self.engine("set_cache")
        if not viewer.operator:
            raise Refused("set_cache", OPERATOR_ONLY)
        info = engine.info
        try:
            k = whole(k, "k (experts per layer on the device)", 1, experts_bound(info))
            prefetch = whole(prefetch, "prefetch", 0, experts_bound(info))
            policy = choice(policy, "the eviction policy", POLICIES)
            # keep what the UI does not set (placement, prefetch depth) as the engine has it
            engine.reconfigure_cache(replace(info.cache, sizes=(k,), policy=policy, prefetch=prefetch))
        except (ConfigError, ValueError) as exc:
            raise Refused("set_cache", str(exc)) from None
        return render_any_info(engine.info), f"Cache re-planned: k = {k}, {policy}, prefetch {prefetch}."

    # ---- API-only endpoints -------------------------------------------------------------------
    def chat(self, message: Any, history: Any, system_prompt: Any, temperature: Any, top_p: Any,
             max_new_tokens: Any, viewer: Viewer) -> Iterator[str]:
        """Stream an answer to ``message`` after ``history``; yields the text so far (an empty answer once)."""
        engine = self.engine("chat")
        try:
            text = api_text(message, "message", engine.limits.message).strip()
            if not text:
                raise ConfigError("the message is empty: type something to ask")
            system = api_text(system_prompt, "system_prompt", engine.limits.system)
            messages = to_messages(api_history(history), system) + [{"role": "user", "content": text}]
            params = sampling(temperature, top_p, max_new_tokens)
        except (ConfigError, ValueError) as exc:
            raise Refused("chat", str(exc)) from None
        cancel, _ = self.canceller.begin(viewer.session)
        last = None
        try:
            for answer, _, _ in stream_answer(engine, messages, params, cancel, session=viewer.session):
                if answer != last:          # the final event repeats the text; an empty answer still yields
                    last = answer
                    yield answer
        except (ValueError, ConfigError) as exc:
            raise Refused("chat", str(exc)) from None

    def stats(self, viewer: Viewer) -> dict:
        return self.visible_stats(self.engine("stats"), viewer).to_dict()

    def info(self) -> dict:
        return public_info(self.engine("info").info)


def _messages(where: str, history: Any, system: str = "") -> list[dict]:
    """The chat's messages by the one rule; a message it refuses (an image in the history) is refused here."""
    try:
        return to_messages(history, system)
    except MessageError as exc:
        raise Refused(where, str(exc)) from None
