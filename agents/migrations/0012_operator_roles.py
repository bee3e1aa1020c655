"""The two operator roles as groups (README, "Operator roles"): a user is given one of them,
and what it lets them do is the permissions here. Both are kept in step by later migrations
that add permissions; an operator may copy one to make a role of their own."""

from django.contrib.auth.management import create_permissions
from django.db import migrations

VIEWER = "Fleet viewer"
OPERATOR = "Fleet operator"

# Besides every view_ permission of the fleet's apps. Not in it: letting a checkpoint run its
# code (agents.trust_remote_code), deleting API keys (revoking keeps their usage), and the
# history (load events and usage are written by the fleet alone).
OPERATOR_PERMISSIONS = [
    ("agents", "change_agent"),
    ("agents", "manage_agent_credentials"),
    ("agents", "add_model"),
    ("agents", "change_model"),
    ("agents", "delete_model"),
    ("agents", "add_placement"),
    ("agents", "change_placement"),
    ("gateway", "add_apikey"),
    ("gateway", "change_apikey"),
]


def create_roles(apps, schema_editor):
    # Permissions are made after migrations (post_migrate): on a fresh database none exist yet.
    for app_config in apps.get_app_configs():
        app_config.models_module = True
        create_permissions(app_config, apps=apps, verbosity=0)
        app_config.models_module = None
    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")
    views = Permission.objects.filter(
        content_type__app_label__in=["agents", "gateway"], codename__startswith="view_"
    )
    viewer, _ = Group.objects.get_or_create(name=VIEWER)
    viewer.permissions.add(*views)
    operator, _ = Group.objects.get_or_create(name=OPERATOR)
    operator.permissions.add(*views)
    for app_label, codename in OPERATOR_PERMISSIONS:
        operator.permissions.add(
            Permission.objects.get(content_type__app_label=app_label, codename=codename)
        )


def remove_roles(apps, schema_editor):
    apps.get_model("auth", "Group").objects.filter(name__in=[VIEWER, OPERATOR]).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("agents", "0011_permissions_and_remote_code"),
        ("gateway", "0004_api_key_all_models"),
        ("auth", "0012_alter_user_first_name_max_length"),
        ("contenttypes", "0002_remove_content_type_name"),
    ]

    operations = [migrations.RunPython(create_roles, remove_roles)]
