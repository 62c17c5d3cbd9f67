"""URLs of the studio shell, mounted at the site root by studio/urls.py (no namespace)."""

from django.contrib.auth.views import LogoutView
from django.urls import path

from . import views

urlpatterns = [
    path("", views.home, name="home"),
    path("login/", views.StudioLoginView.as_view(), name="login"),
    path("logout/", LogoutView.as_view(), name="logout"),
    path("users/", views.users, name="users"),
    path("users/new/", views.user_create, name="user_create"),
    path("users/<int:pk>/", views.user_edit, name="user_edit"),
    path("users/<int:pk>/active/", views.user_set_active, name="user_set_active"),
    path("users/<int:pk>/password/", views.user_password, name="user_password"),
    path("audit/", views.audit, name="audit"),
    path("audit/<int:pk>/", views.audit_event, name="audit_event"),
    path("audit/<int:pk>.json", views.audit_event_json, name="audit_event_json"),
]
