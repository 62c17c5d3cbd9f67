"""Evaluation runs and the canary registry (mounted at /models/runs/ in the "eval" namespace)."""

from django.urls import path

from . import views_runs as views

urlpatterns = [
    path("", views.runs, name="runs"),
    path("new/", views.run_new, name="run_new"),
    path("<int:pk>/", views.run_detail, name="run"),
    path("<int:pk>/live/", views.run_live, name="run_live"),
    path("<int:pk>/cancel/", views.run_cancel, name="run_cancel"),
    path("canaries/", views.canaries, name="canaries"),
    path("canaries/<int:pk>/deactivate/", views.canary_deactivate, name="canary_deactivate"),
]
