"""The page: chat on the left, the expert cache's live panel on the right; what its events do is ``handlers.py``.

``build_ui(engine_or_slot)`` returns a ``gr.Blocks``; ``launch_kwargs()`` gives the theme and css that
Gradio 6 takes at ``launch()``. Answers run together in the engine's batch: the page lets twice ``max_batch``
of them reach the engine at once (concurrency group ``generate``; an answer that finds every slot busy says
so while it waits), others wait in Gradio's queue with their place shown. A cache re-plan runs alone. The
panel polls ``engine.stats()`` on a timer.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator, Optional, Sequence

import gradio as gr

from ..access import Access, redact_paths
from ..config import DEFAULT_MAX_BATCH, POLICIES, CacheConfig
from . import panel
from .chat import EngineSlot, refuse
from .handlers import Controls, Handlers, Refused, Viewer, experts_bound, shown_info
from .remote_panel import render_any_info, render_any_panel

ASSETS = Path(__file__).resolve().parents[2] / "assets"
PANEL_EVERY = 0.3         # seconds between panel refreshes (over 3 a second)
GENERATE = "generate"     # the concurrency group every generation shares (twice the engine's batch at once)
REPLAN = "replan"         # cache re-plans: one at a time (the engine applies it between two steps)

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


def _session(request: Optional[gr.Request]) -> str:
    return getattr(request, "session_hash", None) or "anonymous"


@contextmanager
def _refusals() -> Iterator[None]:
    """A handler's ``Refused`` as gradio's error box, with one line in the server log."""
    try:
        yield
    except Refused as r:
        raise refuse(r.where, r.message) from None


def _controls(c: Optional[Controls]) -> tuple:
    """The cache controls' updates (k, policy, prefetch, Apply, max new tokens), or skips when unchanged."""
    if c is None:
        return (gr.skip(),) * 5
    return (gr.update(value=c.k, minimum=1, maximum=c.num_experts, interactive=c.editable),
            gr.update(value=c.policy, interactive=c.editable),
            gr.update(value=c.prefetch, maximum=c.num_experts, interactive=c.editable),
            gr.update(interactive=c.editable, value="Apply" if c.editable else "Apply (operator only)"),
            gr.update(maximum=c.max_context))


def _or_skip(value: Any) -> Any:
    return gr.skip() if value is None else value


def build_ui(engine_or_slot: Any, *, examples: Optional[Sequence[str]] = None, max_new_tokens: int = 256,
             system_prompt: str = "", panel_every: float = PANEL_EVERY, access: Optional[Access] = None,
             max_batch: Optional[int] = None) -> gr.Blocks:
    """``access``: who is the operator (``access.Access``); by default, whoever reaches an app that listens
    on loopback without a share link, decided at each request from how the app was launched. ``max_batch``:
    the engine's (default: the loaded engine's, else ``DEFAULT_MAX_BATCH``). The handlers are
    ``handlers.Handlers``; this function lays out the page and wires them."""
    slot = engine_or_slot if isinstance(engine_or_slot, EngineSlot) else EngineSlot(engine_or_slot)
    if max_batch is None:
        scheduler = getattr(slot.engine, "scheduler", None)        # a remote engine has none: its server queues
        max_batch = scheduler.max_batch if scheduler is not None else DEFAULT_MAX_BATCH
    access = access or Access()
    h = Handlers(slot)
    title = title_for(slot.engine.info.model_name if slot.engine else None)
    with gr.Blocks(title=title, fill_width=True) as demo:
        page = _page(slot, title, list(load_examples() if examples is None else examples), max_new_tokens,
                     system_prompt, panel_every)

        def viewer(request: Optional[gr.Request]) -> Viewer:
            return Viewer(_session(request), access.is_operator(
                getattr(request, "username", None), getattr(demo, "server_name", None),
                bool(getattr(demo, "share", False))))

        _wire_page(page, h, viewer, 2 * max_batch)
        _wire_api(h, viewer, 2 * max_batch)
    demo.queue(default_concurrency_limit=1)
    demo.mixoff_slot = slot          # for tests and the launcher
    return demo


def _wire_page(page: SimpleNamespace, h: Handlers, viewer: Callable[[Any], Viewer], answers: int) -> None:
    """The page's events: Send / Enter, Retry, Stop, Clear, the panel's timer, Apply. Up to ``answers``
    generations at once (the GENERATE group), a re-plan alone; everything else answers at once."""
    def add_user(message: str, history: list, request: gr.Request):
        with _refusals():
            return h.add_user(message, history, viewer(request))

    def respond(history: list, system: str, temperature: float, top_p: float, max_new: float, turn: int,
                request: gr.Request) -> Iterator[tuple]:
        with _refusals():
            yield from h.respond(history, system, temperature, top_p, max_new, turn, viewer(request),
                                 warn=gr.Warning)

    def retry(history: list, request: gr.Request):
        with _refusals():
            return h.retry(history, viewer(request))

    def stop(request: gr.Request) -> None:
        h.stop(viewer(request))

    def clear(request: gr.Request):
        return h.clear(viewer(request))

    def end_turn(request: gr.Request) -> None:
        h.clear(viewer(request))

    def tick(seen: dict, request: gr.Request):
        """Outputs: panel, info, k, policy, prefetch, apply, max new tokens, seen. Skips what has not changed."""
        u = h.tick(seen, viewer(request))
        return (_or_skip(u.panel), _or_skip(u.info), *_controls(u.controls), _or_skip(u.seen))

    def set_cache(k: float, policy: str, prefetch: float, request: gr.Request = None) -> tuple:
        with _refusals():
            return h.set_cache(k, policy, prefetch, viewer(request))

    gen_opts = dict(concurrency_limit=answers, concurrency_id=GENERATE, api_visibility="private",
                    show_progress="minimal")
    fast = dict(concurrency_limit=None, show_progress="hidden", api_visibility="private")
    p = page
    p.timer.tick(tick, [p.seen], [p.panel, p.info, p.k, p.policy, p.prefetch, p.apply, p.max_new, p.seen],
                 concurrency_limit=None, show_progress="hidden", api_visibility="private")
    inputs = [p.chatbot, p.system, p.temperature, p.top_p, p.max_new, p.turn]
    for trigger in (p.textbox.submit, p.send.click):
        trigger(add_user, [p.textbox, p.chatbot], [p.textbox, p.chatbot, p.turn], **fast).success(
            respond, inputs, [p.chatbot, p.status], **gen_opts)
    p.retry.click(retry, [p.chatbot], [p.chatbot, p.turn], **fast).success(
        respond, inputs, [p.chatbot, p.status], **gen_opts)
    p.stop.click(stop, None, None, **fast)          # the answer ends at its next token and keeps its text
    p.clear.click(clear, None, [p.chatbot, p.status], **fast)
    p.chatbot.clear(end_turn, None, None, **fast)    # the chatbot's own trash icon
    p.apply.click(set_cache, [p.k, p.policy, p.prefetch], [p.info, p.cache_msg], api_name="apply_cache",
                  api_visibility="private", concurrency_limit=1, concurrency_id=REPLAN)


def _wire_api(h: Handlers, viewer: Callable[[Any], Viewer], answers: int) -> None:
    """The gradio API endpoints (gradio_client): their signatures and docstrings are the API's schema."""
    def set_cache(k: int, policy: str, prefetch: int = 0, request: gr.Request = None) -> tuple[str, str]:
        """Operator only: re-plan the device cache (k experts per layer, eviction policy, prefetch); returns the
        model line's HTML and a message. Values are checked here against the loaded model, not by a widget."""
        with _refusals():
            return h.set_cache(k, policy, prefetch, viewer(request))

    def chat(message: str, history: list[dict] | None = None, system_prompt: str = "",
             temperature: float = 0.0, top_p: float = 1.0, max_new_tokens: int = 128,
             request: gr.Request = None) -> Iterator[str]:
        """Stream an answer to `message` after `history` ([{"role", "content"}, ...]); yields the text so far."""
        with _refusals():
            yield from h.chat(message, history, system_prompt, temperature, top_p, max_new_tokens,
                              viewer(request))

    def stats(request: gr.Request = None) -> dict:
        """The engine's latest StatsSnapshot as a dict (cache residency, hit rates, tok/s, memory; the routing,
        prompt size and timings of the latest answer when it was yours, or for the operator)."""
        with _refusals():
            return h.stats(viewer(request))

    def info(request: gr.Request = None) -> dict:
        """Which model runs, why, on what device, quantized how, with which cache (no server paths)."""
        with _refusals():
            return h.info()

    gr.api(set_cache, api_name="set_cache", concurrency_limit=1, concurrency_id=REPLAN)
    gr.api(chat, api_name="chat", concurrency_limit=answers, concurrency_id=GENERATE)
    gr.api(stats, api_name="stats", concurrency_limit=None)
    gr.api(info, api_name="info", concurrency_limit=None)


def _page(slot: EngineSlot, title: str, examples: list[str], max_new_tokens: int, system_prompt: str,
          panel_every: float) -> SimpleNamespace:
    """The components, laid out (inside the caller's ``gr.Blocks``): chat on the left, the live panel right."""
    engine = slot.engine
    with gr.Row(elem_id="mx-header"):
        gr.Markdown(f"# {title}\n{INTRO}", elem_id="mx-title")
    p = SimpleNamespace()
    p.info = gr.HTML(render_any_info(shown_info(engine.info)) if engine else
                     '<div class="mx-info"><span class="mx-chip">loading the model…</span></div>', elem_id="mx-info")
    with gr.Row(equal_height=False):
        with gr.Column(scale=5, min_width=380):
            _chat_column(p, examples, max_new_tokens, system_prompt)
        with gr.Column(scale=6, min_width=440):
            p.panel = gr.HTML(panel.render_loading([redact_paths(x) for x in slot.lines]) if engine is None else
                              render_any_panel(engine.stats(), engine.info), elem_id="mx-panel")
            _cache_settings(p, engine)
    p.seen = gr.State({})
    p.turn = gr.State(0)                 # which question of this session an answer belongs to
    p.timer = gr.Timer(panel_every)
    return p


def _chat_column(p: SimpleNamespace, examples: list[str], max_new_tokens: int, system_prompt: str) -> None:
    p.chatbot = gr.Chatbot(height=520, elem_id="mx-chat", show_label=False,
                           placeholder="Ask something. The answer streams token by token.",
                           buttons=["copy"], feedback_options=None)
    with gr.Row():
        p.textbox = gr.Textbox(placeholder="Message", show_label=False, scale=8, lines=1, max_lines=6,
                               elem_id="mx-input", autofocus=True)
        p.send = gr.Button("Send", variant="primary", scale=1, min_width=80, elem_id="mx-send")
        p.stop = gr.Button("Stop", variant="stop", scale=1, min_width=80, elem_id="mx-stop")
    with gr.Row():
        p.retry = gr.Button("↻ Retry", size="sm", elem_id="mx-retry")
        p.clear = gr.Button("Clear", size="sm", elem_id="mx-clear")
    p.status = gr.Markdown("", elem_id="mx-status")
    if examples:
        gr.Examples(examples=[[e] for e in examples], inputs=[p.textbox], label="Examples")
    with gr.Accordion("Generation settings", open=False):
        p.system = gr.Textbox(value=system_prompt, label="System prompt", lines=2,
                              placeholder="e.g. You are a concise assistant.", elem_id="mx-system")
        with gr.Row():
            p.temperature = gr.Slider(0, 2, value=0.7, step=0.05, label="Temperature", info="0 = greedy",
                                      elem_id="mx-temperature")
            p.top_p = gr.Slider(0.05, 1, value=0.9, step=0.05, label="Top-p", elem_id="mx-top-p")
            p.max_new = gr.Slider(1, max(2048, max_new_tokens), value=max_new_tokens, step=1,
                                  label="Max new tokens", elem_id="mx-max-new")


def _cache_settings(p: SimpleNamespace, engine: Any) -> None:
    """Read-only until the first panel tick says who is looking (and the model is loaded)."""
    cache = engine.info.cache if engine else CacheConfig()
    n_exp = experts_bound(engine.info) if engine else 8
    top_k = (engine.info.top_k or 2) if engine else 2
    with gr.Accordion("Cache settings (re-plans the device cache without reloading)", open=False):
        with gr.Row():
            p.k = gr.Slider(1, n_exp, value=min(cache.sizes) if cache.sizes else top_k, step=1,
                            label="k: experts per layer on device (the smallest where the plan gives layers "
                                  "different k; Apply sets one k for all)", elem_id="mx-k", interactive=False)
            p.policy = gr.Dropdown(list(POLICIES), value=cache.policy, label="Eviction policy",
                                   elem_id="mx-policy", interactive=False)
            p.prefetch = gr.Slider(0, n_exp, value=cache.prefetch, step=1, label="Prefetch (experts guessed per layer)",
                                   elem_id="mx-prefetch", interactive=False)
        p.apply = gr.Button("Apply", size="sm", elem_id="mx-apply", interactive=False)
        p.cache_msg = gr.Markdown("")
