"""``python app.py``: command-line flags -> EngineConfig -> a page that opens at once and loads the model.

Secure by default: the server binds 127.0.0.1 unless ``--host`` says otherwise (or a Hugging Face Space
sets GRADIO_SERVER_NAME); ``--share`` only when asked; ``--auth USER:PASS`` puts a login in front.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional, Sequence

from ..config import CacheConfig, ConfigError, EngineConfig, QuantConfig, parse_bits, POLICIES

DEFAULT_PORT = 7860
FALLBACK_K = 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="app.py", description="mixoff: chat with Mixtral-8x7B whose experts are offloaded to host RAM, "
                                   "with a live view of the GPU expert cache.")
    p.add_argument("--model", default=None,
                   help="hub repo id, local folder, or 'tiny' (default: the pre-quantized Mixtral-8x7B-Instruct "
                        "when a CUDA GPU is present, else the embedded tiny model)")
    p.add_argument("--cache-size", type=int, default=None, metavar="K",
                   help="experts per layer kept on the device (default: chosen by the memory planner)")
    p.add_argument("--policy", default="lru", choices=POLICIES, help="eviction policy (default: lru)")
    p.add_argument("--prefetch", type=int, default=0, metavar="N",
                   help="experts per layer to prefetch from the next layer's router (default: 0, off)")
    p.add_argument("--attn-bits", default="4", help="attention bits: 2, 3, 4, 8 or none (default: 4)")
    p.add_argument("--expert-bits", default="2", help="expert bits: 2, 3, 4, 8 or none (default: 2)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--max-context", type=int, default=4096, help="context window in tokens (default: 4096)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="default answer length cap (default: 256)")
    p.add_argument("--host", default=None,
                   help="address to bind (default: 127.0.0.1, this machine only; e.g. 0.0.0.0 for the network)")
    p.add_argument("--port", type=int, default=None,
                   help=f"port (default: {DEFAULT_PORT}, or GRADIO_SERVER_PORT)")
    p.add_argument("--share", action="store_true", help="create a public Gradio share link (e.g. on Colab)")
    p.add_argument("--auth", default=None, metavar="USER:PASS", help="require this login")
    return p


def parse_auth(text: Optional[str]) -> Optional[tuple[str, str]]:
    if text is None:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise ConfigError("--auth takes USER:PASS, with a non-empty user and password")
    return user, password


def bind_address(host: Optional[str], environ=os.environ) -> str:
    """127.0.0.1 unless --host is given; on a Hugging Face Space (SPACE_ID set) its GRADIO_SERVER_NAME."""
    if host:
        return host
    if environ.get("SPACE_ID") and environ.get("GRADIO_SERVER_NAME"):
        return environ["GRADIO_SERVER_NAME"]
    return "127.0.0.1"


def plan_cache_size(model: str, device: Optional[str], quant: QuantConfig, max_context: int,
                    say: Callable[[str], None]) -> Optional[int]:
    """k from free VRAM and free RAM, via the memory planner when it is there; None: let the config default."""
    try:
        from .. import plan as planner        # written alongside; its absence must not stop the app
    except ImportError:
        planner = None
    fn = None
    for name in ("choose_cache_size", "plan_cache_size", "pick_cache_size", "choose_k", "plan_k"):
        fn = getattr(planner, name, None) if planner else None
        if fn:
            break
    if fn is not None:
        try:
            result = fn(model=model, device=device, quant=quant, max_context=max_context)
        except TypeError:
            result = fn(model, device)
        k = getattr(result, "k", result)
        why = getattr(result, "reason", None) or getattr(result, "explain", None)
        if callable(why):
            why = why()
        say(f"memory planner: k = {k} experts per layer on the device" + (f" ({why})" if why else ""))
        return int(k)
    say(f"memory planner not available: using k = {FALLBACK_K} experts per layer on the device "
        f"(pass --cache-size K to choose)")
    return FALLBACK_K


def engine_config(args: argparse.Namespace, say: Callable[[str], None]) -> tuple[EngineConfig, str]:
    """Flags -> (EngineConfig, why this model). Raises ConfigError with a message for the user."""
    from ..engine import default_model      # torch lives behind the engine, not in the UI

    if args.model:
        model, reason = args.model, f"--model {args.model} was given"
    else:
        model, reason = default_model()
    quant = QuantConfig.from_bits(parse_bits(args.attn_bits), parse_bits(args.expert_bits))
    if args.max_new_tokens < 1:
        raise ConfigError("--max-new-tokens must be >= 1")
    if args.cache_size is not None:
        if args.cache_size < 1:
            raise ConfigError("--cache-size must be >= 1")
        k = args.cache_size
        say(f"cache: k = {k} experts per layer on the device (--cache-size)")
    else:
        k = plan_cache_size(model, args.device, quant, args.max_context, say)
    cache = CacheConfig(size=k or FALLBACK_K, policy=args.policy, prefetch=args.prefetch)
    cfg = EngineConfig(model=model, device=args.device, quant=quant, cache=cache, max_context=args.max_context)
    return cfg, reason


def main(argv: Optional[Sequence[str]] = None) -> None:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    args = build_parser().parse_args(argv)

    def say(msg: str) -> None:
        print(f"mixoff: {msg}", file=sys.stderr, flush=True)

    try:
        auth = parse_auth(args.auth)
        cfg, reason = engine_config(args, say)
    except ConfigError as exc:
        build_parser().error(str(exc))
        return

    from ..engine import Engine
    from .chat import EngineSlot
    from .layout import build_ui, launch_kwargs

    slot = EngineSlot(echo=True)
    slot.progress(f"model: {cfg.model} — {reason}")
    slot.load_in_background(lambda progress: Engine.load(cfg, progress=progress, reason=reason))
    demo = build_ui(slot, max_new_tokens=args.max_new_tokens)

    host = bind_address(args.host)
    port = args.port or int(os.environ.get("GRADIO_SERVER_PORT", DEFAULT_PORT))
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    say(f"serving on http://{shown}:{port}" + ("" if host == "127.0.0.1" else f" (bound to {host})")
        + (" with a login" if auth else "") + "; the model loads in the background, progress on the page")
    demo.launch(server_name=host, server_port=port, share=args.share, auth=auth, show_error=True,
                footer_links=["api", "settings"], **launch_kwargs())


if __name__ == "__main__":
    main()
