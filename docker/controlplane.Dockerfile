# The control plane: web (uvicorn), worker and beat (Celery) are this one image with different
# commands (see docker/compose.yaml and docker/k8s/). Build from the repository root:
#   docker build -f docker/controlplane.Dockerfile -t llmfleet/controlplane .
FROM python:3.11.7-slim-bookworm AS build
WORKDIR /src
COPY requirements/ requirements/
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check \
        -r requirements/controlplane.txt -r requirements/nodeagent.txt -r requirements/demo.txt

FROM python:3.11.7-slim-bookworm
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    DJANGO_SETTINGS_MODULE=controlplane.settings \
    VAR_DIR=/var/lib/llmfleet \
    STATIC_ROOT=/app/static \
    SERVE_STATIC=true
RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin llmfleet \
    && mkdir -p /var/lib/llmfleet \
    && chown llmfleet /var/lib/llmfleet
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY manage.py ./
COPY controlplane/ controlplane/
COPY agents/ agents/
COPY nodeagent/ nodeagent/
COPY templates/ templates/
# Static files are collected into the image. Importing the settings needs a secret key; this
# throwaway one exists only during the build (no DATABASE_URL: nothing else is read).
RUN VAR_DIR=/tmp/collectstatic python manage.py collectstatic --noinput --verbosity 0 \
    && rm -rf /tmp/collectstatic
USER 10001
EXPOSE 8000
# The web process's health; docker/compose.yaml gives worker and beat checks of their own.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status != 200)"]
CMD ["python", "-m", "controlplane.web", "--host", "0.0.0.0", "--port", "8000"]
