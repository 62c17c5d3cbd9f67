"""Serving pages under /models/serving/: API keys and the playground (the API itself is under /v1/)."""

from django.urls import path

from . import views_serving as views

urlpatterns = [
    path("keys/", views.api_keys, name="api_keys"),
    path("keys/new/", views.api_key_create, name="api_key_create"),
    path("keys/<int:pk>/revoke/", views.api_key_revoke, name="api_key_revoke"),
    path("playground/", views.playground, name="playground"),
    path("playground/send/", views.playground_send, name="playground_send"),
]
