from django.urls import path

from . import views_registry as views

urlpatterns = [
    path("", views.model_list, name="models"),
    path("<int:pk>/", views.model_detail, name="model"),
    path("versions/<int:pk>/", views.version_detail, name="version"),
    path("versions/<int:pk>/lineage/", views.version_lineage, name="lineage"),
]
