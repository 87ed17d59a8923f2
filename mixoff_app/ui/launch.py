"""``python app.py``: command-line flags -> EngineConfig -> a page that opens at once and loads the model.

Secure by default: the server binds 127.0.0.1 unless ``--host`` says otherwise (or a Hugging Face Space
sets GRADIO_SERVER_NAME); ``--share`` only when asked; ``--auth USER:PASS`` puts a login in front, and
``--admin USER:PASS`` an operator account (the only one that may change the cache settings once the app is
reachable from other machines). Logins are throttled; uploads are refused (the app takes none); serving
beyond this machine without a login prints a warning.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional, Sequence

from ..config import DEFAULT_MAX_BATCH, ConfigError, EngineConfig

DEFAULT_PORT = 7860
CPU_DEMO_K = 3          # without a GPU memory does not limit k; a small cache lets the panel show the mechanism


def build_parser() -> argparse.ArgumentParser:
    from ..cli.args import add_engine_args, positive_int  # the same engine flags as the headless CLI

    p = argparse.ArgumentParser(
        prog="app.py", description="mixoff: chat with a Mixture-of-Experts model (Mixtral-8x7B by default on a "
                                   "GPU) whose experts are offloaded to host RAM, with a live view of the expert cache.")
    add_engine_args(p, model_default=None)
    p.set_defaults(model=None)
    for action in p._actions:
        if action.dest == "model":
            action.help = ("hub repo id, local folder, or 'tiny' (default: the pre-quantized Mixtral-8x7B-Instruct "
                           "when a CUDA GPU is present, else the embedded tiny model)")
        elif action.dest == "cache_size":
            action.help = ("experts per layer kept on the device (default: the memory planner picks k from free "
                           f"VRAM and RAM; without a GPU, {CPU_DEMO_K})")
    p.add_argument("--max-new-tokens", type=positive_int, default=256,
                   help="default answer length cap in the page (default: 256)")
    p.add_argument("--host", default=None,
                   help="address to bind (default: 127.0.0.1, this machine only; e.g. 0.0.0.0 for the network)")
    p.add_argument("--port", type=positive_int, default=None,
                   help=f"port (default: {DEFAULT_PORT}, or GRADIO_SERVER_PORT)")
    p.add_argument("--share", action="store_true", help="create a public Gradio share link (e.g. on Colab)")
    p.add_argument("--auth", default=None, metavar="USER:PASS", help="require this login")
    p.add_argument("--admin", default=None, metavar="USER:PASS",
                   help="an operator login: only this account may change the cache settings and see every "
                        "session's details (puts a login in front of the app; --auth adds a user account)")
    p.add_argument("--api-key", action="append", default=None, metavar="KEY",
                   help="require `Authorization: Bearer KEY` on the OpenAI-compatible API at /v1; give it once per "
                        "caller, each key a principal of its own (default: $MIXOFF_API_KEY, keys separated by "
                        "commas; without a key /v1 is served only on loopback without --share)")
    add_backend_args(p)
    return p


def add_backend_args(p: argparse.ArgumentParser) -> None:
    from ..remote.config import ENV_KEY
    g = p.add_argument_group("remote backend", "drive an OpenAI-compatible server instead of a local engine: our "
                                               "`python -m mixoff_app serve` on a GPU box, vLLM or SGLang")
    g.add_argument("--backend", default=None, metavar="URL",
                   help="the server's API, e.g. http://gpu-box:8000/v1; nothing of a model is loaded here")
    g.add_argument("--backend-key", default=None, metavar="KEY",
                   help=f"its API key, sent to URL only (default: ${ENV_KEY}, which stays out of the process list)")
    g.add_argument("--backend-model", default=None, metavar="NAME",
                   help="which of the server's models to use (default: the first /v1/models lists)")


def backend_config(args: argparse.Namespace, environ=os.environ):
    """--backend's settings; the local engine's own flags are refused beside it, so nobody believes they apply."""
    from ..remote.config import BackendConfig, api_base, backend_key
    for flag, value in (("--model", args.model), ("--cache-size", args.cache_size), ("--max-batch", args.max_batch),
                        ("--per-client", args.per_client)):
        if value is not None:
            raise ConfigError(f"{flag} sets up a local engine and --backend uses the server's: drop one of them "
                              f"(--backend-model picks one of the server's models)")
    return BackendConfig(url=api_base(args.backend), key=backend_key(args.backend_key, environ),
                         model=args.backend_model)


def first_contact(engine, say: Callable[[str], None]) -> None:
    """Tell the terminal what the backend is, or why it cannot be used yet (the page keeps asking)."""
    from ..remote.client import BackendError
    try:
        info = engine.connect()
    except BackendError as exc:
        say(f"backend: {exc} (the page asks again every few seconds)")
        return
    say(f"backend: {info.engine_name} at {info.where} serving {info.model}"
        + ("" if info.returns_routing else "; it returns no routing, so the panel shows speed only"))


def parse_auth(text: Optional[str], flag: str = "--auth") -> Optional[tuple[str, str]]:
    from ..access import parse_account
    return parse_account(text, flag)


def accounts(auth: Optional[tuple[str, str]], admin: Optional[tuple[str, str]]) -> dict[str, str]:
    if auth and admin and auth[0] == admin[0]:
        raise ConfigError("--auth and --admin name the same user; give the operator its own name")
    return dict(a for a in (auth, admin) if a)


def exposure_warning(host: str, share: bool, has_login: bool) -> Optional[str]:
    """What to tell the operator before serving beyond this machine without a login (None: nothing)."""
    from ..access import is_loopback
    if has_login or (is_loopback(host) and not share):
        return None
    where = "a public gradio.live link" if share else f"{host}, reachable from other machines"
    return (f"warning: serving on {where} without a login: anyone who reaches it can chat and use this "
            f"machine's compute; add --auth USER:PASS (and --admin USER:PASS to change settings remotely)")


def bind_address(host: Optional[str], environ=os.environ) -> str:
    """127.0.0.1 unless --host is given; on a Hugging Face Space (SPACE_ID set) its GRADIO_SERVER_NAME."""
    if host:
        return host
    if environ.get("SPACE_ID") and environ.get("GRADIO_SERVER_NAME"):
        return environ["GRADIO_SERVER_NAME"]
    return "127.0.0.1"


def engine_config(args: argparse.Namespace, say: Callable[[str], None]) -> tuple[EngineConfig, str]:
    """Flags -> (EngineConfig, why this model). Raises ConfigError with a message for the user.

    k: --cache-size when given; on a GPU the memory planner picks it from free VRAM (pynvml) and free RAM
    (psutil) -- here before any download, from the model's shape, and again by the engine once the
    checkpoint is read; without a GPU the CPU stands in for the device and k = CPU_DEMO_K.
    """
    from ..cli.args import engine_config as cli_engine_config
    from ..engine import default_model, resolve_device  # torch lives behind the engine, not in the UI

    args = argparse.Namespace(**vars(args))
    device = resolve_device(args.device)
    if args.model:
        reason = f"--model {args.model} was given"
    else:
        args.model, reason = default_model()
        if device.type != "cuda" and args.model != "tiny":      # a GPU is there, but --device cpu was asked
            args.model, reason = "tiny", "--device cpu: running the embedded tiny model"
    budgets = getattr(args, "vram_budget", None) is not None or getattr(args, "ram_budget", None) is not None
    if args.cache_size is not None:
        say(f"cache: k = {args.cache_size} experts per layer on the device (--cache-size)")
    elif device.type == "cuda":
        say(f"memory planner: k per layer on {device} is picked from free VRAM and RAM once the model's config "
            f"is read, before its weights are (the plan shows on the page)")
    elif not budgets:
        args.cache_size = CPU_DEMO_K
        say(f"no CUDA GPU: the CPU stands in for the device, so memory does not limit k; k = {CPU_DEMO_K} "
            f"experts per layer, so the cache has work to do (--cache-size K to change)")
    return cli_engine_config(args), reason


def api_config(args: argparse.Namespace, host: str, admin: Optional[str] = None, environ=os.environ):
    """The /v1 API's settings: the key from --api-key or MIXOFF_API_KEY, where the page is reachable, and the
    --admin user (with one, the API's callers are never the operator)."""
    from ..api import ApiConfig, api_keys
    try:
        return ApiConfig(keys=api_keys(args.api_key, environ), host=host, share=bool(args.share), admin=admin,
                         default_max_tokens=args.max_new_tokens)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def api_app_kwargs(slot, config) -> dict:
    """The /v1 routes go on the very app Gradio launches: same host and port, and the share link carries them."""
    from ..api import api_routes

    def engine():
        if slot.engine is not None:
            return slot.engine
        if slot.error:
            raise RuntimeError(f"the model could not be loaded: {slot.error}")
        raise RuntimeError("the model is still loading: try again in a moment (/v1/models answers once it is ready)")
    return {"routes": api_routes(engine, config)}


def main(argv: Optional[Sequence[str]] = None) -> None:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    args = build_parser().parse_args(argv)

    def say(msg: str) -> None:
        print(f"mixoff: {msg}", file=sys.stderr, flush=True)

    host = bind_address(args.host)
    try:
        auth = parse_auth(args.auth)
        admin = parse_auth(args.admin, "--admin")
        logins = accounts(auth, admin)
        backend = backend_config(args) if args.backend else None
        api = api_config(args, host, admin[0] if admin else None)
        cfg, reason = engine_config(args, say) if backend is None else (None, "")
    except ConfigError as exc:
        build_parser().error(str(exc))
        return

    from ..access import Access, LoginThrottle
    from ..engine import Engine
    from .chat import EngineSlot
    from .layout import build_ui, examples_for, launch_kwargs

    warning = exposure_warning(host, args.share, bool(logins))
    if warning:
        say(warning)
    if backend is None:
        slot = EngineSlot(echo=True)
        slot.progress(f"model: {cfg.model} — {reason}")
        slot.load_in_background(lambda progress: Engine.load(cfg, progress=progress, reason=reason))
    else:
        slot = remote_slot(backend, args, say)
    # The page lets through twice the answers the engine runs at once; a remote server queues its own.
    demo = build_ui(slot, max_new_tokens=args.max_new_tokens, examples=examples_for(cfg.model if cfg else None),
                    access=Access(admin=admin[0] if admin else None),
                    max_batch=cfg.max_batch if cfg else DEFAULT_MAX_BATCH)

    port = args.port or int(os.environ.get("GRADIO_SERVER_PORT", DEFAULT_PORT))
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    say(f"serving on http://{shown}:{port}" + ("" if host == "127.0.0.1" else f" (bound to {host})")
        + (" with a login" if logins else "") + "; the model loads in the background, progress on the page")
    from ..api import describe
    if backend is None:
        say(f"OpenAI-compatible API at http://{shown}:{port}/v1: {describe(api)}")
    else:
        say(f"no /v1 API here: the OpenAI-compatible API is the backend's own, at {backend.where}")
    demo.launch(server_name=host, server_port=port, share=args.share,
                auth=LoginThrottle(logins, log=say) if logins else None, show_error=True,
                footer_links=["api", "settings"],
                **launch_kwargs(api_app_kwargs(slot, api) if backend is None else None, log=say))


def remote_slot(backend, args: argparse.Namespace, say: Callable[[str], None]):
    """The page's engine is a RemoteEngine: ready at once (nothing loads here); the first contact runs beside."""
    import threading

    from ..remote.engine import RemoteEngine
    from .chat import EngineSlot
    for line in (backend.plain_http_warning(),
                 "note: --backend-key shows in the process list; MIXOFF_BACKEND_KEY keeps it out" if args.backend_key
                 else None):
        if line:
            say(line)
    engine = RemoteEngine(backend, args.max_input_chars)
    threading.Thread(target=first_contact, args=(engine, say), name="mixoff-backend", daemon=True).start()
    return EngineSlot(engine, echo=True)


if __name__ == "__main__":
    main()
