"""Tags holding "|" get the tags_text that tag filters now look for (see imports.tags_text)."""

from django.db import migrations


def rewrite(apps, schema_editor):
    from datasets_app.services.imports import tags_text

    Example = apps.get_model("datasets_app", "Example")
    for pk, tags in Example.objects.filter(tags__icontains="|").values_list("pk", "tags").iterator():
        Example.objects.filter(pk=pk).update(tags_text=tags_text(tags))


class Migration(migrations.Migration):
    dependencies = [("datasets_app", "0002_example_lean_indexes")]

    operations = [migrations.RunPython(rewrite, migrations.RunPython.noop)]
