# syntax=docker/dockerfile:1
# Build stage: resolve the locked dependencies into a virtual environment.
FROM python:3.11-slim AS build
ENV UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_PYTHON_DOWNLOADS=never
RUN pip install --no-cache-dir 'uv==0.13.9'
WORKDIR /app
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --locked --no-dev --no-install-project --extra brokers
COPY relay ./relay
COPY migrations ./migrations
RUN uv sync --locked --no-dev --no-editable --extra brokers

# Runtime stage: the venv only, as an unprivileged user.
FROM python:3.11-slim
RUN groupadd --system --gid 10001 relay && useradd --system --uid 10001 --gid relay --no-create-home relay
COPY --from=build --chown=10001:10001 /app/.venv /app/.venv
ENV PATH=/app/.venv/bin:$PATH HOST=0.0.0.0 PORT=8000 RELAY_LOG_FORMAT=json PYTHONUNBUFFERED=1
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('PORT', '8000')}/healthz\", timeout=2)"]
CMD ["relay", "run"]
