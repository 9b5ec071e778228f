# syntax=docker/dockerfile:1
# candlekeep: one image for the streaming worker and the feeds (ENTRYPOINT `candlekeep`).
# It installs the package with its `stream` extra from pyproject.toml (which pulls in `store`):
# no separate requirements list. Build: docker build -t candlekeep .
# The Airflow side is Dockerfile.airflow (apache/airflow with candlekeep[store] on top).

ARG PYTHON_IMAGE=python:3.11-slim

# Wheels for candlekeep and everything it needs, built where build tools may live.
FROM ${PYTHON_IMAGE} AS wheels
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY candlekeep ./candlekeep
COPY shared ./shared
COPY stream ./stream
RUN pip wheel --wheel-dir /wheels ".[stream]"

FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN --mount=type=bind,from=wheels,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels "candlekeep[stream]" \
    && useradd --create-home --uid 10001 --user-group candlekeep
USER candlekeep
WORKDIR /home/candlekeep
# Metrics of `candlekeep stream` (CANDLEKEEP_METRICS_PORT).
EXPOSE 9108
ENTRYPOINT ["candlekeep"]
CMD ["--help"]
