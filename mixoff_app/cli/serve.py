"""``serve``: the OpenAI-compatible API at /v1 without the page (uvicorn), for servers and scripts."""
from __future__ import annotations

import os
import socket
import sys

from .args import add_engine_args, engine_config, positive_int

DEFAULT_PORT = 8000


def _port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def run(args) -> int:
    from ..api import ENV_KEY, ApiConfig, api_keys, describe, keyless_ok, model_id, serve
    from ..config import ConfigError

    try:
        api = ApiConfig(keys=api_keys(args.api_key, os.environ), host=args.host,
                        default_max_tokens=args.max_new_tokens, return_routed_experts=args.return_routed_experts)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if not api.keys and not keyless_ok(api):       # every request would be refused: say so before loading anything
        raise ConfigError(f"--host {args.host} reaches beyond this machine, so the API needs a key: add "
                          f"--api-key KEY (or set {ENV_KEY})")
    if not _port_free(args.host, args.port):
        raise ConfigError(f"port {args.port} on {args.host} is in use: pick another with --port")
    from ..engine import Engine
    engine = Engine.load(engine_config(args), progress=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"mixoff: serving {model_id(engine.info)} at http://{args.host}:{args.port}/v1 ({describe(api)}); "
          f"Ctrl-C stops", file=sys.stderr, flush=True)
    serve(engine, api, args.port)
    return 0


def add_parser(subparsers) -> None:
    s = subparsers.add_parser("serve", help="serve the OpenAI-compatible API (/v1) without the page")
    add_engine_args(s)
    s.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: 127.0.0.1, this machine only; anything wider needs --api-key)")
    s.add_argument("--port", type=positive_int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    s.add_argument("--api-key", action="append", default=None, metavar="KEY",
                   help="require `Authorization: Bearer KEY`; once per caller, each key a principal of its own "
                        "(default: $MIXOFF_API_KEY, keys separated by commas; none: loopback only)")
    s.add_argument("--max-new-tokens", type=positive_int, default=256,
                   help="an answer's length when a request gives no max_tokens (default: 256)")
    s.add_argument("--return-routed-experts", action="store_true",
                   help="every answer carries its routing (prompt_routed_experts, routed_experts: vLLM's fields), "
                        "asked for or not; without it a request asks with \"return_routed_experts\": true")
    s.set_defaults(func=run)
