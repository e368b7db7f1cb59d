from django.db import migrations


def seed(apps, schema_editor):
    MeshIndex = apps.get_model("registry", "MeshIndex")
    MeshIndex.objects.get_or_create(id=1, defaults={"value": 1})


class Migration(migrations.Migration):
    dependencies = [("registry", "0001_initial")]
    operations = [migrations.RunPython(seed, migrations.RunPython.noop)]
