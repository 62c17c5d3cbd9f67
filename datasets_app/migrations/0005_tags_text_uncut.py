"""tags_text holds every tag: it was cut at 1,000 characters, so a filter for a tag past the cut found
nothing. Rows that were cut get their text rebuilt from their tags."""

from django.db import migrations, models
from django.db.models.functions import Length

TAG_BAR = "\x1f"  # as datasets_app.services.imports.TAG_BAR at the time of this migration


def rebuild_cut_tags_text(apps, schema_editor):
    Example = apps.get_model("datasets_app", "Example")
    cut = Example.objects.annotate(n=Length("tags_text")).filter(n__gte=1000).only("pk", "tags")
    for example in cut.iterator(chunk_size=1000):
        text = "|" + "|".join(t.replace("|", TAG_BAR) for t in example.tags) + "|"
        Example.objects.filter(pk=example.pk).update(tags_text=text)


class Migration(migrations.Migration):
    dependencies = [
        ("datasets_app", "0004_upload_sealed_reasons"),
    ]

    operations = [
        migrations.AlterField(
            model_name="example",
            name="tags_text",
            field=models.TextField(blank=True),
        ),
        migrations.RunPython(rebuild_cut_tags_text, migrations.RunPython.noop),
    ]
