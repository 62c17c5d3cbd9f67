from django.urls import path

from . import views

app_name = "datasets"
urlpatterns = [
    path("", views.dataset_list, name="list"),
    path("new/", views.dataset_create, name="create"),
    path("<int:pk>/", views.dataset_detail, name="detail"),
    path("<int:pk>/settings/", views.dataset_settings, name="settings"),
    path("<int:pk>/scan-status/", views.scan_status, name="scan_status"),
    path("<int:pk>/upload/", views.upload_new, name="upload_new"),
    path("<int:pk>/pii/", views.pii_review, name="pii"),
    path("<int:pk>/pii/decide/", views.pii_decide, name="pii_decide"),
    path("<int:pk>/pii/decide-type/", views.pii_decide_type, name="pii_decide_type"),
    path("<int:pk>/pii/rescan/", views.pii_rescan, name="pii_rescan"),
    path("<int:pk>/examples/", views.example_list, name="examples"),
    path("<int:pk>/duplicates/", views.duplicate_list, name="duplicates"),
    path("<int:pk>/duplicates/decide-all/", views.duplicate_decide_all, name="duplicate_decide_all"),
    path("<int:pk>/split/", views.dataset_split, name="split"),
    path("<int:pk>/freeze/", views.dataset_freeze, name="freeze"),
    path("uploads/<int:pk>/", views.upload_detail, name="upload"),
    path("uploads/<int:pk>/columns/", views.upload_mapping, name="upload_mapping"),
    path("uploads/<int:pk>/rejected-lines/", views.upload_rejects, name="upload_rejects"),
    path("examples/<int:pk>/", views.example_detail, name="example"),
    path("examples/<int:pk>/mark/", views.example_mark, name="example_mark"),
    path("examples/<int:pk>/drop/", views.example_drop, name="example_drop"),
    path("duplicates/<int:pk>/decide/", views.duplicate_decide, name="duplicate_decide"),
    path("versions/<int:pk>/", views.version_detail, name="version"),
    path("versions/<int:pk>/export.jsonl", views.version_export, name="version_export"),
    path("versions/<int:pk>/diff/<int:other>/", views.version_diff, name="version_diff"),
]
