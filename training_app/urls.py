from django.urls import path

from . import views

app_name = "training"
urlpatterns = [
    path("base-models/", views.base_models, name="base_models"),
    path("base-models/<int:pk>/status/", views.base_model_status, name="base_model_status"),
]
