"""OpenAI-compatible API under /v1/ (bearer API keys, no session, no CSRF)."""

from django.urls import path  # noqa: F401

urlpatterns: list = []
