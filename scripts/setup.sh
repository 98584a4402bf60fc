#!/usr/bin/env bash
# Installs what qywx-ray needs on a fresh Debian machine (as root), idempotently:
# Debian packages (redis-server, redis-sentinel, Java, Maven, promtool, wrk), the Python
# package with its dev extras, and Apache Kafka's jars from Maven Central (cached in
# ~/.cache/qywx-ray). Each step is skipped when already satisfied.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
CACHE=${QYWX_CACHE_DIR:-$HOME/.cache/qywx-ray}
mkdir -p "$CACHE"

need_apt=()
command -v redis-server   >/dev/null || need_apt+=(redis-server)
command -v redis-sentinel >/dev/null || need_apt+=(redis-sentinel)
command -v java           >/dev/null || need_apt+=(openjdk-17-jre-headless)
# javac: the peer benchmark compiles bench/peer/PeerBench.java (make bench only).
command -v javac          >/dev/null || need_apt+=(openjdk-17-jdk-headless)
command -v mvn            >/dev/null || need_apt+=(maven)
command -v promtool       >/dev/null || need_apt+=(prometheus)
command -v wrk            >/dev/null || need_apt+=(wrk)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: apt-get install ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  # The Debian packages start system-wide daemons; our tests and demo run their own.
  for svc in redis-server redis-sentinel prometheus prometheus-node-exporter; do
    (systemctl stop "$svc" || service "$svc" stop) >/dev/null 2>&1 || true
  done
fi

stamp="$CACHE/pip-$(sha256sum pyproject.toml | cut -c1-16)"
# The stamp follows pyproject.toml; the imports catch a dev tool removed by hand.
if [ ! -f "$stamp" ] || ! $PY -c "import qywx_ray, mkdocs" 2>/dev/null; then
  echo "setup: pip install -e .[dev]"
  $PY -m pip install -q --disable-pip-version-check -e '.[dev]'
  touch "$stamp"
fi

$PY -c "from qywx_ray.devstack.kafka import ensure_kafka_jars; print('setup: kafka jars in', ensure_kafka_jars())"
