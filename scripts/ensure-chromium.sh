#!/usr/bin/env bash
# Make sure Debian's chromium is installed: tests/test_browser.py opens the HTML reports in
# headless Chromium (in CI, CI=true, that test fails rather than skips without it).
set -euo pipefail
if command -v chromium >/dev/null; then
  exit 0
fi
cmd="apt-get update && apt-get install -y chromium"
if [ "$(id -u)" = 0 ]; then
  echo "chromium not found; installing it: $cmd"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq chromium >/dev/null
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
  echo "chromium not found; installing it with sudo: $cmd"
  sudo -n sh -c "DEBIAN_FRONTEND=noninteractive $cmd" >/dev/null
else
  echo "warning: chromium is not installed and this user cannot install it; the browser" >&2
  echo "test will be skipped (it fails under CI=true). Run as root:  $cmd" >&2
  exit 0
fi
command -v chromium >/dev/null || { echo "error: installing chromium did not provide the chromium command" >&2; exit 1; }
