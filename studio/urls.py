from django.urls import include, path

urlpatterns = [
    path("", include("studio.web_urls")),
    path("datasets/", include("datasets_app.urls")),
    path("training/", include("training_app.urls")),
    path("models/", include("eval_app.urls")),
    path("v1/", include("eval_app.api_urls")),
]
