#!/usr/bin/env bash
# Docker cannot build here, so run the Dockerfile's own steps in a clean venv:
# copy what the Dockerfile COPYs, `pip install .` it, validate the baked rules
# file, start the server with it and run the HEALTHCHECK command against it.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
pid=""
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

mkdir -p "$work/app" "$work/etc"
cp pyproject.toml README.md "$work/app/"
cp -r proxy "$work/app/proxy"
find "$work/app/proxy" -name __pycache__ -prune -exec rm -rf {} +
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q "$work/app"
"$work/venv/bin/sluice" check deploy/docker/rules.yaml >/dev/null

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
admin=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
sed -e "s/0.0.0.0:8000/127.0.0.1:$port/" -e "s/0.0.0.0:8001/127.0.0.1:$admin/" \
    -e "s#/var/lib/sluice#$work/data#" deploy/docker/rules.yaml > "$work/etc/rules.yaml"
(cd "$work" && exec "$work/venv/bin/sluice" serve -c "$work/etc/rules.yaml") &
pid=$!
healthcheck=$(sed -n 's/^ *CMD python -c "\(.*\)"$/\1/p' Dockerfile | sed "s/8001/$admin/")
for _ in $(seq 1 50); do
  if "$work/venv/bin/python" -c "$healthcheck" 2>/dev/null; then
    echo "docker steps: install, check and HEALTHCHECK all pass"
    exit 0
  fi
  sleep 0.2
done
echo "docker steps: HEALTHCHECK never passed" >&2
exit 1
