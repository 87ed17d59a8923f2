"""The page: chat on the left, the expert cache's live panel on the right.

``build_ui(engine_or_slot)`` returns a ``gr.Blocks``; ``launch_kwargs()`` gives the theme and css that
Gradio 6 takes at ``launch()``. Generation runs one at a time (concurrency group ``generate``); others
wait in Gradio's queue with their place shown. The panel polls ``engine.stats()`` on a timer.
"""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import gradio as gr

from ..access import OPERATOR_ONLY, Access, choice, public_info, redact_paths, user_snapshot, whole
from ..config import POLICIES, CacheConfig, ConfigError
from . import panel
from .chat import (
    Canceller,
    EngineSlot,
    api_history,
    api_text,
    refuse,
    sampling,
    status_line,
    stream_answer,
    strip_to_last_user,
    to_messages,
)
from .remote_panel import render_any_info, render_any_panel

ASSETS = Path(__file__).resolve().parents[2] / "assets"
PANEL_EVERY = 0.3         # seconds between panel refreshes (over 3 a second)
GENERATE = "generate"     # the one concurrency group every generation (and cache re-plan) shares

TITLE = "mixoff · Mixture-of-Experts chat with expert offloading"


def title_for(model_name: Optional[str]) -> str:
    """The page's title names the model that runs (Mixtral, Qwen3-MoE, ...) once it is known."""
    return f"mixoff · {model_name} with expert offloading" if model_name else TITLE
INTRO = ("Chat with a Mixture-of-Experts model whose experts live in host RAM; only *k* per layer sit in "
         "the device cache. The panel shows, token by token, which experts are cached, hit, loaded "
         "and evicted.")


def examples_for(model: Optional[str]) -> list[str]:
    """The example prompts for the model that runs: the demo model's own (what it was trained to answer),
    else the general ones."""
    folder = ASSETS / "tiny-chat" if model == "tiny" else Path(model) if model else None
    own = folder / "examples.json" if folder is not None else None
    return load_examples(own if own is not None and own.is_file() else None)


def load_examples(path: Optional[Path] = None) -> list[str]:
    path = path or ASSETS / "examples.json"
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [str(x) for x in data if str(x).strip()]


def launch_kwargs(app_kwargs: Optional[dict] = None, log: Callable[[str], None] = lambda msg: None) -> dict:
    """What Gradio 6 takes at ``launch()`` rather than ``Blocks()``; ``app_kwargs`` go to its FastAPI app (the
    /v1 routes), which always gets the request guard (bounded bodies, per-address login throttling)."""
    from starlette.middleware import Middleware

    from .guard import RequestGuard
    css_path = ASSETS / "style.css"
    theme = gr.themes.Soft(primary_hue="indigo", secondary_hue="slate",
                           font=["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "sans-serif"],
                           font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "monospace"])
    # max_file_size 0: the app takes no uploads, so gradio's upload route refuses every file (HTTP 413).
    js_path = ASSETS / "panel.js"       # the many-expert panel's hover (one listener, no per-cell elements)
    head = f"<script>{js_path.read_text(encoding='utf-8')}</script>" if js_path.exists() else None
    app_kwargs = dict(app_kwargs or {})
    app_kwargs["middleware"] = [*app_kwargs.get("middleware", ()), Middleware(RequestGuard, log=log)]
    return {"theme": theme, "css": css_path.read_text(encoding="utf-8") if css_path.exists() else None,
            "head": head, "max_file_size": 0, "app_kwargs": app_kwargs}


def _shown_info(info: Any) -> Any:
    """EngineInfo as the page shows it to anyone: without server paths."""
    return replace(info, model=public_info(info)["model"], reason=public_info(info)["reason"], model_path="")


def _session(request: Optional[gr.Request]) -> str:
    return getattr(request, "session_hash", None) or "anonymous"


def build_ui(engine_or_slot: Any, *, examples: Optional[Sequence[str]] = None, max_new_tokens: int = 256,
             system_prompt: str = "", panel_every: float = PANEL_EVERY, access: Optional[Access] = None
             ) -> gr.Blocks:
    """``access``: who is the operator (``access.Access``); by default, whoever reaches an app that listens
    on loopback without a share link, decided at each request from how the app was launched."""
    slot = engine_or_slot if isinstance(engine_or_slot, EngineSlot) else EngineSlot(engine_or_slot)
    access = access or Access()
    canceller = Canceller()
    examples = list(load_examples() if examples is None else examples)

    def engine_or_error(where: str = "request"):
        try:
            return slot.get()
        except RuntimeError as exc:
            raise refuse(where, redact_paths(str(exc))) from None

    def operator(request: Optional[gr.Request]) -> bool:
        return access.is_operator(getattr(request, "username", None), getattr(demo, "server_name", None),
                                  bool(getattr(demo, "share", False)))

    def visible_stats(engine, request: Optional[gr.Request]):
        snap = engine.stats()
        if operator(request):
            return snap
        return user_snapshot(snap, own_answer=engine.answer_session == _session(request))

    # ---- chat ---------------------------------------------------------------------------------
    def add_user(message: str, history: list, request: gr.Request):
        text = (message if isinstance(message, str) else "").strip()
        if not text:
            raise refuse("send", "Type a message first.")
        engine = engine_or_error("send")  # while loading, the message stays in the box
        if len(text) > engine.limits.message:     # refused before it reaches the chat (it stays in the box)
            raise refuse("send", f"the message is too long: {len(text):,} characters, and this server takes at "
                                 f"most {engine.limits.message:,}; shorten it")
        _, turn = canceller.begin(_session(request))
        return "", to_messages(history) + [{"role": "user", "content": text}], turn

    def respond(history: list, system: str, temperature: float, top_p: float, max_new: float, turn: int,
                request: gr.Request) -> Iterator[tuple]:
        engine = engine_or_error("answer")
        messages = to_messages(history, system if isinstance(system, str) else "")
        if not messages or messages[-1]["role"] != "user":
            raise refuse("answer", "There is no question to answer: type a message first.")
        try:
            params = sampling(temperature, top_p, max_new)
        except ConfigError as exc:
            raise refuse("answer", str(exc)) from None
        shown = to_messages(history)
        notices: list[str] = []

        def notice(text: str) -> None:
            notices.append(text)
            gr.Warning(text)

        session = _session(request)
        cancel, current = canceller.current(session)
        if current != turn:
            return                        # cleared, or a newer question came, while this one waited
        start = None
        try:
            for text, n, reason in stream_answer(engine, messages, params, cancel, on_notice=notice,
                                                 session=session):
                if canceller.turn(session) != turn:
                    # Clear or a new question ended this turn. After Clear this stream writes the empty chat
                    # last, so no token still in flight can bring the old conversation back.
                    if canceller.cleared(session):
                        yield [], ""
                    return
                start = start or time.perf_counter()
                status = status_line(n, time.perf_counter() - start, reason)
                if notices:
                    status += " · " + " · ".join(notices)
                yield shown + [{"role": "assistant", "content": text}], status
        except (ValueError, ConfigError) as exc:
            raise refuse("answer", str(exc)) from None

    def retry(history: list, request: gr.Request):
        msgs = strip_to_last_user(history)
        if not msgs:
            raise refuse("retry", "Nothing to retry yet.")
        _, turn = canceller.begin(_session(request))
        return msgs, turn

    def stop(request: gr.Request) -> None:
        canceller.cancel(_session(request))

    def end_turn(request: gr.Request) -> None:
        canceller.clear(_session(request))

    def clear(request: gr.Request):
        canceller.clear(_session(request))
        return [], ""

    # ---- panel --------------------------------------------------------------------------------
    def tick(seen: dict, request: gr.Request):
        """Outputs: panel, info, k, policy, prefetch, apply, max new tokens, seen. Skips what has not changed."""
        seen = dict(seen or {})
        engine = slot.engine
        if engine is None:
            lines, error = slot.lines, slot.error
            if not operator(request):        # progress lines and errors name server paths
                lines = [redact_paths(x) for x in lines]
                error = redact_paths(error) if error else error
            html = panel.render_loading(lines, error)
            info_html = ('<div class="mx-info"><span class="mx-chip mx-chip-error">the model could not be loaded'
                         '</span></div>' if slot.error else seen.get("info"))
            if html == seen.get("panel") and info_html == seen.get("info"):
                return (gr.skip(),) * 8
            out_info = info_html if info_html != seen.get("info") else gr.skip()
            seen["panel"], seen["info"] = html, info_html
            return (html, out_info, *(gr.skip(),) * 5, seen)
        html = render_any_panel(visible_stats(engine, request), engine.info)
        out = [gr.skip()] * 7
        if html != seen.get("panel"):
            out[0] = seen["panel"] = html
        info = engine.info
        info_html = render_any_info(_shown_info(info))
        if info_html != seen.get("info"):
            out[1] = seen["info"] = info_html
        may = operator(request)
        if seen.get("controls") != may:
            # The controls take the loaded model's ranges and values once it is there, and are editable
            # only for the operator (the server checks again on Apply).
            seen["controls"] = may
            experts = getattr(info, "experts_bound", None) or info.num_experts    # a remote model's may be unknown
            out[2] = gr.update(value=info.cache.sizes[0], minimum=1, maximum=experts, interactive=may)
            out[3] = gr.update(value=info.cache.policy, interactive=may)
            out[4] = gr.update(value=info.cache.prefetch, maximum=experts, interactive=may)
            out[5] = gr.update(interactive=may, value="Apply" if may else "Apply (operator only)")
            out[6] = gr.update(maximum=info.max_context or max_new_tokens)
        return (*out, seen)

    def set_cache(k: float, policy: str, prefetch: float, request: gr.Request = None) -> tuple:
        """Re-plan the device cache (k experts per layer, eviction policy, prefetch) without reloading.
        Operator only."""
        engine = engine_or_error("set_cache")
        if not operator(request):
            raise refuse("set_cache", OPERATOR_ONLY)
        info = engine.info
        experts = getattr(info, "experts_bound", None) or info.num_experts
        try:
            k = whole(k, "k (experts per layer on the device)", 1, experts)
            prefetch = whole(prefetch, "prefetch", 0, experts)
            policy = choice(policy, "the eviction policy", POLICIES)
            # keep what the UI does not set (placement, prefetch depth) as the engine has it
            cfg = replace(info.cache, sizes=(k,), policy=policy, prefetch=prefetch)
            engine.reconfigure_cache(cfg)
        except (ConfigError, ValueError) as exc:
            raise refuse("set_cache", str(exc)) from None
        return render_any_info(engine.info), f"Cache re-planned: k = {k}, {policy}, prefetch {prefetch}."

    # ---- API-only endpoints ------------------------------------------------------------------
    def set_cache_api(k: int, policy: str, prefetch: int = 0, request: gr.Request = None) -> tuple[str, str]:
        """Operator only: re-plan the device cache (k experts per layer, eviction policy, prefetch); returns the
        model line's HTML and a message. Values are checked here against the loaded model, not by a widget."""
        return set_cache(k, policy, prefetch, request)

    def chat(message: str, history: list[dict] | None = None, system_prompt: str = "",
             temperature: float = 0.0, top_p: float = 1.0, max_new_tokens: int = 128,
             request: gr.Request = None) -> Iterator[str]:
        """Stream an answer to `message` after `history` ([{"role", "content"}, ...]); yields the text so far."""
        engine = engine_or_error("chat")
        try:
            text = api_text(message, "message", engine.limits.message).strip()
            if not text:
                raise ConfigError("the message is empty: type something to ask")
            system = api_text(system_prompt, "system_prompt", engine.limits.system)
            messages = to_messages(api_history(history), system) + [{"role": "user", "content": text}]
            params = sampling(temperature, top_p, max_new_tokens)
        except (ConfigError, ValueError) as exc:
            raise refuse("chat", str(exc)) from None
        session = _session(request)
        cancel, _ = canceller.begin(session)
        last = None
        try:
            for answer, _, _ in stream_answer(engine, messages, params, cancel, session=session):
                if answer != last:          # the final event repeats the text; an empty answer still yields
                    last = answer
                    yield answer
        except (ValueError, ConfigError) as exc:
            raise refuse("chat", str(exc)) from None

    def stats(request: gr.Request = None) -> dict:
        """The engine's latest StatsSnapshot as a dict (cache residency, hit rates, tok/s, memory; the routing,
        prompt size and timings of the latest answer when it was yours, or for the operator)."""
        engine = engine_or_error("stats")
        return visible_stats(engine, request).to_dict()

    def info(request: gr.Request = None) -> dict:
        """Which model runs, why, on what device, quantized how, with which cache (no server paths)."""
        return public_info(engine_or_error("info").info)

    # ---- page ---------------------------------------------------------------------------------
    title = title_for(slot.engine.info.model_name if slot.engine else None)
    with gr.Blocks(title=title, fill_width=True) as demo:
        with gr.Row(elem_id="mx-header"):
            gr.Markdown(f"# {title}\n{INTRO}", elem_id="mx-title")
        info_html = gr.HTML(render_any_info(_shown_info(slot.engine.info)) if slot.engine else
                            '<div class="mx-info"><span class="mx-chip">loading the model…</span></div>',
                            elem_id="mx-info")
        with gr.Row(equal_height=False):
            with gr.Column(scale=5, min_width=380):
                chatbot = gr.Chatbot(height=520, elem_id="mx-chat", show_label=False,
                                     placeholder="Ask something. The answer streams token by token.",
                                     buttons=["copy"], feedback_options=None)
                with gr.Row():
                    textbox = gr.Textbox(placeholder="Message", show_label=False, scale=8, lines=1,
                                         max_lines=6, elem_id="mx-input", autofocus=True)
                    send_btn = gr.Button("Send", variant="primary", scale=1, min_width=80, elem_id="mx-send")
                    stop_btn = gr.Button("Stop", variant="stop", scale=1, min_width=80, elem_id="mx-stop")
                with gr.Row():
                    retry_btn = gr.Button("↻ Retry", size="sm", elem_id="mx-retry")
                    clear_btn = gr.Button("Clear", size="sm", elem_id="mx-clear")
                status = gr.Markdown("", elem_id="mx-status")
                if examples:
                    gr.Examples(examples=[[e] for e in examples], inputs=[textbox], label="Examples")
                with gr.Accordion("Generation settings", open=False):
                    system = gr.Textbox(value=system_prompt, label="System prompt", lines=2,
                                        placeholder="e.g. You are a concise assistant.", elem_id="mx-system")
                    with gr.Row():
                        temperature = gr.Slider(0, 2, value=0.7, step=0.05, label="Temperature",
                                                info="0 = greedy", elem_id="mx-temperature")
                        top_p = gr.Slider(0.05, 1, value=0.9, step=0.05, label="Top-p", elem_id="mx-top-p")
                        max_new = gr.Slider(1, max(2048, max_new_tokens), value=max_new_tokens, step=1,
                                            label="Max new tokens", elem_id="mx-max-new")
            with gr.Column(scale=6, min_width=440):
                panel_html = gr.HTML(panel.render_loading([redact_paths(x) for x in slot.lines])
                                     if slot.engine is None else
                                     render_any_panel(slot.engine.stats(), slot.engine.info),
                                     elem_id="mx-panel")
                with gr.Accordion("Cache settings (re-plans the device cache without reloading)", open=False):
                    with gr.Row():
                        cache = slot.engine.info.cache if slot.engine else CacheConfig()
                        n_exp = (getattr(slot.engine.info, "experts_bound", None) or slot.engine.info.num_experts
                                 if slot.engine else 8)
                        # Read-only until the first panel tick says who is looking (and the model is loaded).
                        top_k = (slot.engine.info.top_k or 2) if slot.engine else 2
                        k_slider = gr.Slider(1, n_exp, value=cache.sizes[0] if cache.sizes else top_k, step=1,
                                             label="k: experts per layer on device", elem_id="mx-k", interactive=False)
                        policy = gr.Dropdown(list(POLICIES), value=cache.policy, label="Eviction policy",
                                             elem_id="mx-policy", interactive=False)
                        prefetch = gr.Slider(0, n_exp, value=cache.prefetch, step=1,
                                             label="Prefetch (experts guessed per layer)", elem_id="mx-prefetch",
                                             interactive=False)
                    apply_btn = gr.Button("Apply", size="sm", elem_id="mx-apply", interactive=False)
                    cache_msg = gr.Markdown("")
        seen = gr.State({})
        turn = gr.State(0)                 # which question of this session an answer belongs to
        timer = gr.Timer(panel_every)

        timer.tick(tick, [seen], [panel_html, info_html, k_slider, policy, prefetch, apply_btn, max_new, seen],
                   concurrency_limit=None, show_progress="hidden", api_visibility="private")

        gen_opts = dict(concurrency_limit=1, concurrency_id=GENERATE, api_visibility="private",
                        show_progress="minimal")
        fast = dict(concurrency_limit=None, show_progress="hidden", api_visibility="private")
        inputs = [chatbot, system, temperature, top_p, max_new, turn]
        for trigger in (textbox.submit, send_btn.click):
            trigger(add_user, [textbox, chatbot], [textbox, chatbot, turn], **fast).success(
                respond, inputs, [chatbot, status], **gen_opts)
        retry_btn.click(retry, [chatbot], [chatbot, turn], **fast).success(
            respond, inputs, [chatbot, status], **gen_opts)
        stop_btn.click(stop, None, None, **fast)          # the answer ends at its next token and keeps its text
        clear_btn.click(clear, None, [chatbot, status], **fast)
        chatbot.clear(end_turn, None, None, **fast)      # the chatbot's own trash icon
        apply_btn.click(set_cache, [k_slider, policy, prefetch], [info_html, cache_msg], api_name="apply_cache",
                        api_visibility="private",
                        concurrency_limit=1, concurrency_id=GENERATE)

        gr.api(set_cache_api, api_name="set_cache", concurrency_limit=1, concurrency_id=GENERATE)
        gr.api(chat, api_name="chat", concurrency_limit=1, concurrency_id=GENERATE)
        gr.api(stats, api_name="stats", concurrency_limit=None)
        gr.api(info, api_name="info", concurrency_limit=None)

    demo.queue(default_concurrency_limit=1)
    demo.mixoff_slot = slot          # for tests and the launcher
    return demo
