from django.urls import path

from . import views

app_name = "training"
urlpatterns = [
    path("base-models/", views.base_models, name="base_models"),
    path("base-models/add/", views.base_model_add, name="base_model_add"),
    path("base-models/<int:pk>/status/", views.base_model_status, name="base_model_status"),
    path("jobs/", views.jobs, name="jobs"),
    path("jobs/new/", views.job_new, name="job_new"),
    path("jobs/estimate/", views.job_estimate, name="job_estimate"),
    path("jobs/<int:pk>/", views.job_detail, name="job"),
    path("jobs/<int:pk>/live/", views.job_live, name="job_live"),
    path("jobs/<int:pk>/cancel/", views.job_cancel, name="job_cancel"),
    path("jobs/<int:pk>/resume/", views.job_resume, name="job_resume"),
    path("jobs/<int:pk>/priority/", views.job_priority, name="job_priority"),
    path("jobs/<int:pk>/merge/", views.job_merge, name="job_merge"),
    path("jobs/<int:pk>/artifacts/<path:name>", views.job_artifact, name="job_artifact"),
]
