# syntax=docker/dockerfile:1
#
# One image for every process:
#   docker run -p 8000:8000 IMAGE              # API (default CMD)
#   docker run IMAGE worker                    # background worker
#   docker run IMAGE migrate                   # database migrations

########## builder: install atrium and its locked dependencies into /opt/venv ##########
# The Python here must be one uv.lock resolves for (requires-python >= 3.11 in pyproject.toml).
FROM python:3.11-slim AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    UV_NO_CACHE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/opt/venv

WORKDIR /src

# uv, at the release pyproject.toml's [tool.uv] required-version pins, in a venv of its own
# that stays in the builder.
COPY pyproject.toml uv.lock ./
RUN python -m venv /opt/uv \
    && /opt/uv/bin/pip install "uv$(python -c "import tomllib; print(tomllib.load(open('pyproject.toml', 'rb'))['tool']['uv']['required-version'])")"

# Dependencies first, exactly as uv.lock pins them (hashes checked; no dev extra), so editing
# the code reuses this layer. --locked fails the build when uv.lock is stale.
RUN python -m venv /opt/venv \
    && /opt/uv/bin/uv sync --locked --no-install-project

# Then the project itself (a regular, non-editable install; .dockerignore keeps tests out).
COPY . .
RUN /opt/uv/bin/uv sync --locked --no-editable \
    && /opt/venv/bin/python -c "import main, containers, config, core, modules, migrations"

########## runtime: the venv only, as a non-root user ##########
FROM python:3.11-slim AS runtime

RUN groupadd --system --gid 10001 atrium \
    && useradd --system --uid 10001 --gid atrium --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin atrium

# Same path as in the builder, so the venv's scripts keep their interpreter path.
COPY --from=builder /opt/venv /opt/venv

WORKDIR /app
RUN chown atrium:atrium /app

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    ATRIUM_ENV=production

USER 10001:10001

EXPOSE 8000

# Probes the API's liveness endpoint. A worker container serves no HTTP: run it with
# --no-healthcheck (or override healthcheck in compose / use another probe).
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health/live', timeout=3).status == 200 else 1)"]

ENTRYPOINT ["atrium"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
