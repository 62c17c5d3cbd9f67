"""The evaluation app's pages; each area keeps its own URL module."""

from django.urls import include, path

app_name = "eval"
urlpatterns = [
    path("", include("eval_app.urls_registry")),  # models, versions, lineage
    path("runs/", include("eval_app.urls_runs")),  # evaluation runs, canaries
    path("reviews/", include("eval_app.urls_votes")),  # blind voting, statistics
    path("promotions/", include("eval_app.urls_gate")),  # approval gate, rollback
    path("serving/", include("eval_app.urls_serving")),  # API keys, playground
]
