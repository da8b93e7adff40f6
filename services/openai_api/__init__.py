"""The OpenAI-compatible HTTP API (docs/11_openai_api.md), served beside gRPC on the same engine."""

from services.openai_api.app import PLAN_HEADER, create_app
from services.openai_api.server import HttpServer

__all__ = ["PLAN_HEADER", "HttpServer", "create_app"]
