#!/usr/bin/env bash
# Runs the whole test suite. Creates .venv with the test-only packages (requirements-dev.txt) on first use, and,
# when run as root, installs the real peers the tests talk to from Debian's packages (proxies, curl, wrk).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.requirements-dev.sha256
want=$(sha256sum requirements-dev.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt
  echo "$want" > "$stamp"
fi

# Real servers used as peers: tinyproxy (HTTP CONNECT), dante and microsocks (SOCKS5), stunnel (TLS proxy), curl,
# wrk (benchmark), chromium + chromium-driver (dashboard). Without root they must already be installed; the tests that need a missing one say so.
need=()
command -v tinyproxy >/dev/null || need+=(tinyproxy)
command -v danted >/dev/null || need+=(dante-server)
command -v microsocks >/dev/null || need+=(microsocks)
command -v stunnel4 >/dev/null || need+=(stunnel4)
command -v curl >/dev/null || need+=(curl)
command -v wrk >/dev/null || need+=(wrk)
[ -x /usr/bin/chromium ] || need+=(chromium)  # the dashboard's browser tests (selenium drives it)
[ -x /usr/bin/chromedriver ] || need+=(chromium-driver)
if [ ${#need[@]} -gt 0 ] && [ "$(id -u)" = 0 ]; then
  echo "installing test peers: ${need[*]}"
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

# The Codex CLI (from the npm registry) for the test of the Responses API over a WebSocket.
if ! command -v codex >/dev/null && command -v npm >/dev/null && [ "$(id -u)" = 0 ]; then
  npm install -g --silent @openai/codex@0.171.0 >/dev/null 2>&1 || echo "could not install the Codex CLI; its test is skipped"
fi

# PostgreSQL on 127.0.0.1:5432 (trust auth, database test) for the tests of the PostgreSQL backend.
if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ] && ! pg_isready -q -h 127.0.0.1 2>/dev/null; then
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main start || true
fi

exec .venv/bin/python -m pytest -n 2 -q -p no:cacheprovider "$@" tests
