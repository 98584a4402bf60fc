# qywx-ray image: Ray head/worker nodes and the Serve deployer in docker-compose.yml.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends tini curl procps \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# Dependencies first (cached layer), then the code.
COPY pyproject.toml README.md ./
COPY qywx_ray ./qywx_ray
COPY serve ./serve
RUN pip install .
COPY config ./config

RUN useradd --create-home --uid 1000 qywx \
    && mkdir -p /var/lib/qywx-ray /var/log/qywx \
    && chown -R qywx:qywx /var/lib/qywx-ray /var/log/qywx /app
USER qywx

# The package is installed into site-packages, so name the config file explicitly.
ENV QYWX_PROFILE=production \
    QYWX_CONFIG=/app/config/production.yaml \
    QYWX_DATA_DIR=/var/lib/qywx-ray

# 6379 Ray GCS, 8000 Serve (WeCom callback + admin), 8080 metrics, 8265 dashboard / jobs
EXPOSE 6379 8000 8080 8265
ENTRYPOINT ["tini", "--"]
CMD ["qywx-ray", "--help"]
