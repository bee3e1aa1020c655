"""The operator roles (agents/migrations/0012_operator_roles) see the new models: files and
batches are the fleet's, and both roles have every view_ permission of the fleet's apps."""

from django.contrib.auth.management import create_permissions
from django.db import migrations

ROLES = ("Fleet viewer", "Fleet operator")
VIEWS = ("view_storedfile", "view_batch", "view_batchoutcome")


def add_views(apps, schema_editor):
    # Permissions are made after migrations (post_migrate): make this app's now.
    config = apps.get_app_config("gateway")
    config.models_module = True
    create_permissions(config, apps=apps, verbosity=0)
    config.models_module = None
    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")
    views = Permission.objects.filter(content_type__app_label="gateway", codename__in=VIEWS)
    for group in Group.objects.filter(name__in=ROLES):
        group.permissions.add(*views)


class Migration(migrations.Migration):
    dependencies = [
        ("gateway", "0008_files_and_batches"),
        ("agents", "0012_operator_roles"),
    ]

    operations = [migrations.RunPython(add_views, migrations.RunPython.noop)]
