from django.urls import path

from . import views_gate as views

urlpatterns = [
    path("", views.promotion_list, name="promotions"),
    path("<int:pk>/", views.promotion_detail, name="promotion"),
    path("<int:pk>/approve/", views.promotion_approve, name="promotion_approve"),
    path("<int:pk>/reject/", views.promotion_reject, name="promotion_reject"),
    path("<int:pk>/cancel/", views.promotion_cancel, name="promotion_cancel"),
    path("request/<int:version_pk>/", views.promotion_request, name="promotion_request"),
    path("rollback/<int:pk>/", views.alias_rollback, name="rollback"),
]
