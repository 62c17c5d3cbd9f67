from django.apps import AppConfig
from django.db.backends.signals import connection_created


class DatasetsConfig(AppConfig):
    name = "datasets_app"
    verbose_name = "Datasets"

    def ready(self) -> None:
        from .search import register_sqlite_function

        connection_created.connect(register_sqlite_function, dispatch_uid="datasets_app.search")
