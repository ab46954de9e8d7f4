#!/usr/bin/env bash
# Make sure the services the test suite talks to are installed and running:
# a Redis on 127.0.0.1:6379, Chromium, and a way to build images. Installs Debian's
# packages when missing.
set -euo pipefail

redis_up() {
  python3 - <<'PY'
import socket, sys
try:
    s = socket.create_connection(("127.0.0.1", 6379), timeout=1)
    s.sendall(b"PING\r\n")
    sys.exit(0 if s.recv(16).startswith(b"+PONG") else 1)
except OSError:
    sys.exit(1)
PY
}

apt_install() {
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}

if ! command -v redis-server >/dev/null 2>&1; then
  apt_install redis-server
fi

# The report tests open the HTML reports in a headless Chromium.
if ! command -v chromium >/dev/null 2>&1; then
  apt_install chromium
fi

# tests/deploy/test_image.py builds the worker image: with Docker where an engine
# answers, otherwise with buildah, and mmdebstrap for the base when no registry answers.
if ! docker info >/dev/null 2>&1; then
  command -v buildah >/dev/null 2>&1 || apt_install buildah
  command -v mmdebstrap >/dev/null 2>&1 || apt_install mmdebstrap
fi

if ! redis_up; then
  mkdir -p /tmp/actviz-redis
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" \
    --appendonly no --dir /tmp/actviz-redis --logfile /tmp/actviz-redis/redis.log
  for _ in $(seq 50); do redis_up && break; sleep 0.1; done
  redis_up || { echo "redis-server did not start" >&2; exit 1; }
fi
echo "redis: 127.0.0.1:6379 up"
