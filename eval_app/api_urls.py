"""OpenAI-compatible API under /v1/ (bearer API keys, no session, no CSRF)."""

from django.urls import path, re_path

from . import api

urlpatterns = [
    path("models", api.models, name="api_models"),
    path("models/<path:name>", api.model_detail, name="api_model"),
    path("chat/completions", api.chat_completions, name="api_chat_completions"),
    re_path(r"^(?P<rest>.*)$", api.not_found),
]
