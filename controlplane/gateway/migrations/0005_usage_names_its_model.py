"""Usage names its model instead of pointing at the catalog row: deleting a model from the
catalog no longer deletes the billing history of it (the FK cascaded)."""

from django.db import migrations, models
from django.db.models import OuterRef, Subquery


def copy_names(apps, schema_editor):
    Usage = apps.get_model("gateway", "Usage")
    Model = apps.get_model("agents", "Model")
    names = Model.objects.filter(pk=OuterRef("model_ref_id")).values("model_id")[:1]
    Usage.objects.order_by().update(model_name=Subquery(names))  # one statement, any size


def copy_back(apps, schema_editor):
    Usage = apps.get_model("gateway", "Usage")
    Model = apps.get_model("agents", "Model")
    pks = dict(Model.objects.values_list("model_id", "pk"))
    for usage in Usage.objects.order_by().iterator():
        if usage.model_name in pks:
            usage.model_ref_id = pks[usage.model_name]
            usage.save(update_fields=["model_ref"])
        else:  # its model is gone: the old schema cannot keep it
            usage.delete()


class Migration(migrations.Migration):
    dependencies = [
        ("agents", "0012_operator_roles"),
        ("gateway", "0004_api_key_all_models"),
    ]

    operations = [
        migrations.AddField(
            model_name="usage",
            name="model_name",
            field=models.CharField(default="", max_length=200),
            preserve_default=False,
        ),
        migrations.RemoveConstraint(model_name="usage", name="usage_one_row_per_key_model_day"),
        # The FK gets out of the way of the name's column (model_id) before it is dropped; the
        # reverse path needs it under another name to copy back into.
        migrations.RenameField(model_name="usage", old_name="model", new_name="model_ref"),
        migrations.AlterField(
            model_name="usage",
            name="model_ref",
            field=models.ForeignKey(
                null=True,
                on_delete=models.deletion.CASCADE,
                related_name="usage",
                to="agents.model",
            ),
        ),
        migrations.RunPython(copy_names, copy_back),
        migrations.RemoveField(model_name="usage", name="model_ref"),
        migrations.RenameField(model_name="usage", old_name="model_name", new_name="model_id"),
        migrations.AlterField(
            model_name="usage",
            name="model_id",
            field=models.CharField(max_length=200, verbose_name="model"),
        ),
        migrations.AlterModelOptions(
            name="usage",
            options={"ordering": ["-day", "api_key", "model_id"], "verbose_name_plural": "usage"},
        ),
        migrations.AddConstraint(
            model_name="usage",
            constraint=models.UniqueConstraint(
                fields=("api_key", "model_id", "day"), name="usage_one_row_per_key_model_day"
            ),
        ),
    ]
