#!/usr/bin/env bash
# Install the Debian packages the test suite needs, when one of their commands is missing.
# Usage: scripts/ensure-packages.sh [command=package ...]  (default: what `make test` needs)
# The tests start their own servers on free loopback ports; nothing here starts a service.
set -euo pipefail
wanted=("$@")
if [ ${#wanted[@]} -eq 0 ]; then
  wanted=(redis-server=redis-server redis-cli=redis-tools openssl=openssl chromium=chromium
    faketime=faketime nginx=nginx promtool=prometheus tinyproxy=tinyproxy)
fi
missing=()
for pair in "${wanted[@]}"; do
  command -v "${pair%%=*}" >/dev/null 2>&1 || missing+=("${pair#*=}")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "installing with apt-get: ${missing[*]}" >&2
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO=sudo; else
    echo "not root and no sudo: install them yourself (apt-get install ${missing[*]})" >&2
    exit 1
  fi
else
  SUDO=
fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
for pair in "${wanted[@]}"; do
  command -v "${pair%%=*}" >/dev/null || { echo "still missing: ${pair%%=*}" >&2; exit 1; }
done
