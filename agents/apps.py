from django.apps import AppConfig


class AgentsConfig(AppConfig):
    name = "agents"
    verbose_name = "Fleet"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Settings are final here, so DRF reads REST_FRAMEWORK as it imports its views.
        import django_stubs_ext
        from rest_framework import fields, generics, mixins, relations, serializers, viewsets

        # Lets the code write `ModelSerializer[Agent]` for mypy at run time.
        django_stubs_ext.monkeypatch(
            extra_classes=[
                fields.Field,
                relations.RelatedField,
                serializers.BaseSerializer,
                generics.GenericAPIView,
                mixins.ListModelMixin,
                mixins.RetrieveModelMixin,
                viewsets.GenericViewSet,
                viewsets.ReadOnlyModelViewSet,
                viewsets.ModelViewSet,
            ]
        )
