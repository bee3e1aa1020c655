from django.urls import path, re_path

from controlplane.gateway import errors, openapi, views

urlpatterns = [
    path("openapi.json", openapi.openapi, name="v1-openapi"),
    path("models", views.list_models, name="v1-models"),
    path("models/<path:model_id>", views.retrieve_model, name="v1-model"),
    path("chat/completions", views.chat_completions, name="v1-chat-completions"),
    path("completions", views.completions, name="v1-completions"),
    re_path(r"^(?P<path>.*)$", errors.not_found),
]
