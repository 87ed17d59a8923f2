"""An OpenAI-compatible API over the engine (``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``,
``/v1/mixoff/stats``). No gradio here: the routes mount on the app Gradio launches, or run on their own."""
from .access import describe, keyless_ok, refusal
from .config import ENV_KEY, ApiConfig, api_keys
from .routes import api_routes, model_id
from .server import create_app, serve

__all__ = ["ENV_KEY", "ApiConfig", "api_keys", "api_routes", "create_app", "describe", "keyless_ok", "model_id", "refusal",
           "serve"]
