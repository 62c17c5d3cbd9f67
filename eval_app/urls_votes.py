from django.urls import path

from . import views_votes as views

urlpatterns = [
    path("", views.reviews, name="reviews"),
    path("next/", views.review_next, name="review_next"),
    path("<int:pk>/", views.review, name="review"),
    path("<int:pk>/skip/", views.review_skip, name="review_skip"),
    path("<int:pk>/done/", views.review_done, name="review_done"),
    path("stats/<int:pk>/", views.run_stats, name="run_stats"),
]
