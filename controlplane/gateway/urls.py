from django.urls import path, re_path

from controlplane.gateway import errors, views

urlpatterns = [
    path("models", views.list_models, name="v1-models"),
    re_path(r"^(?P<path>.*)$", errors.not_found),
]
