#!/bin/sh
# Headless Chromium and its WebDriver for the report's browser test (tests/test_report.py).
# Does nothing when both are installed. Never fails: where they cannot be installed (no
# apt-get, not root and no password-less sudo, no network), it says so and the browser test
# skips with the same reason.
has() { command -v "$1" >/dev/null 2>&1; }
if has chromedriver && { has chromium || has chromium-browser || has google-chrome; }; then
  exit 0
fi
if ! has apt-get; then
  echo "install-browser: no apt-get here; install chromium and its chromedriver yourself," \
       "or the browser test skips" >&2
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  if has sudo && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  else
    echo "install-browser: apt-get needs root; run: sudo apt-get install chromium" \
         "chromium-driver (the browser test skips until then)" >&2
    exit 0
  fi
fi
export DEBIAN_FRONTEND=noninteractive
echo "install-browser: apt-get install chromium chromium-driver" >&2
$SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null 2>&1 \
  || { $SUDO apt-get update -q >/dev/null 2>&1 \
       && $SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver \
          >/dev/null 2>&1; } \
  || echo "install-browser: apt-get could not install chromium chromium-driver; the browser" \
          "test skips" >&2
exit 0
