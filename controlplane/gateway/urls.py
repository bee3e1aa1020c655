from django.urls import path, re_path

from controlplane.gateway import batchviews, errors, files, openapi, views

urlpatterns = [
    path("openapi.json", openapi.openapi, name="v1-openapi"),
    path("models", views.list_models, name="v1-models"),
    path("models/<path:model_id>", views.retrieve_model, name="v1-model"),
    path("chat/completions", views.chat_completions, name="v1-chat-completions"),
    path("completions", views.completions, name="v1-completions"),
    path("responses", views.responses, name="v1-responses"),
    path("responses/<str:response_id>", views.stored_response, name="v1-response"),
    path("responses/<str:response_id>/cancel", views.stored_response, name="v1-response-cancel"),
    path("embeddings", views.embeddings, name="v1-embeddings"),
    path("files", files.files, name="v1-files"),
    path("files/<str:file_id>", files.file, name="v1-file"),
    path("files/<str:file_id>/content", files.file_content, name="v1-file-content"),
    path("batches", batchviews.batches, name="v1-batches"),
    path("batches/<str:batch_id>", batchviews.batch, name="v1-batch"),
    path("batches/<str:batch_id>/cancel", batchviews.cancel, name="v1-batch-cancel"),
    re_path(r"^(?P<path>.*)$", errors.not_found),
]
