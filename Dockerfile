# syntax=docker/dockerfile:1
#
# One image for every process:
#   docker run -p 8000:8000 IMAGE              # API (default CMD)
#   docker run IMAGE worker                    # background worker
#   docker run IMAGE migrate                   # database migrations

########## builder: install atrium and its dependencies into /opt/venv ##########
FROM python:3.11-slim AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --upgrade pip

WORKDIR /src

# Dependencies first, read from pyproject.toml, so editing the code reuses this layer.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && /opt/venv/bin/pip install -r /tmp/requirements.txt

# Then the project itself (a regular, non-editable install; .dockerignore keeps tests out).
COPY . .
RUN /opt/venv/bin/pip install --no-deps . \
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
