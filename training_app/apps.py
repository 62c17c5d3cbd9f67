from django.apps import AppConfig


class TrainingConfig(AppConfig):
    name = "training_app"
    verbose_name = "Training"
