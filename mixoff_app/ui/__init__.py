"""Gradio front end: the chat column, the live expert-cache panel, and the launcher.

Only gradio and the engine's public contract (``stream_chat``, ``stats``, ``info``,
``reconfigure_cache``) are used here; nothing in this package touches torch.
"""
from .chat import EngineSlot
from .layout import build_ui, launch_kwargs

__all__ = ["EngineSlot", "build_ui", "launch_kwargs"]
