"""OpenAI-compatible HTTP server over the engine: one engine thread, an asyncio front."""

from server.app import APIError, ServerConfig, create_app
from server.main import BackgroundServer, serve
from server.worker import EngineWorker

__all__ = ["APIError", "BackgroundServer", "EngineWorker", "ServerConfig", "create_app", "serve"]
