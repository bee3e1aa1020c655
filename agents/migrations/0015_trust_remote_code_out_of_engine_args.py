"""A model whose engine_args said --trust-remote-code (allowed before the allow-list) keeps
running its checkpoint's code: through its trust_remote_code field now, the flag taken out."""

from django.db import migrations

FLAG = "--trust-remote-code"


def is_flag(arg: object) -> bool:
    return isinstance(arg, str) and "--" + arg[2:].replace("_", "-") == FLAG


def move_the_flag(apps, schema_editor):
    Model = apps.get_model("agents", "Model")
    for model in Model.objects.all():
        args = model.engine_args if isinstance(model.engine_args, list) else []
        if any(is_flag(arg) for arg in args):
            model.engine_args = [arg for arg in args if not is_flag(arg)]
            model.trust_remote_code = True
            model.save(update_fields=["engine_args", "trust_remote_code"])


def put_it_back(apps, schema_editor):
    Model = apps.get_model("agents", "Model")
    for model in Model.objects.filter(trust_remote_code=True):
        model.engine_args = [*model.engine_args, FLAG]
        model.save(update_fields=["engine_args"])


class Migration(migrations.Migration):
    dependencies = [("agents", "0014_credential_rotation_and_revocation_notices")]

    operations = [migrations.RunPython(move_the_flag, put_it_back)]
