# The node agent for NVIDIA GPU hosts: vLLM's official image (CUDA, the `vllm` package) as the
# engine's environment, and the agent in a virtual environment of its own on top, so vLLM's
# pins never meet the agent's. Same vLLM release as requirements/engine-cpu.txt. From the root:
#   docker build -f docker/nodeagent.Dockerfile -t llmfleet/nodeagent:cuda .
FROM vllm/vllm-openai:v0.32.0 AS base

FROM base AS build
WORKDIR /src
COPY requirements/nodeagent.txt requirements/stores.txt requirements/
RUN python3 -m venv /opt/agent \
    && /opt/agent/bin/pip install --no-cache-dir --disable-pip-version-check \
        -r requirements/nodeagent.txt

FROM base
ENV PATH=/opt/agent/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    AGENT_HOST=0.0.0.0 \
    AGENT_PORT=8100 \
    AGENT_ENGINE=vllm \
    AGENT_ENGINE_PYTHON=/usr/bin/python3 \
    AGENT_CACHE_DIR=/var/cache/llmfleet
RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin llmfleet \
    && mkdir -p /var/cache/llmfleet \
    && chown llmfleet /var/cache/llmfleet
COPY --from=build /opt/agent /opt/agent
WORKDIR /app
COPY nodeagent/ nodeagent/
USER 10001
EXPOSE 8100
VOLUME ["/var/cache/llmfleet"]
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8100/healthz', timeout=4).status != 200)"]
# The base image's entry point is vLLM's own server; the agent starts that itself, per model.
ENTRYPOINT ["python", "-m", "nodeagent"]
