"""Serving: an OpenAI-compatible HTTP API with dynamic batching, streaming and a live web playground
(`illada serve`)."""
from illada.serving.app import ServerSettings, create_app, serve_in_thread
from illada.serving.batcher import Batcher
from illada.serving.protocol import ApiError, Limits

__all__ = ["create_app", "serve_in_thread", "ServerSettings", "Limits", "Batcher", "ApiError"]
