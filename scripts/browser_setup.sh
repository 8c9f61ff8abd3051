#!/usr/bin/env bash
# The browser tier's set-up (`make test` runs it; tests/browser): Debian's chromium, which Playwright
# drives through executable_path (never `playwright install`: no browser build is downloaded).
# Installs it with apt-get when it is missing and we are root; otherwise says why the tier will skip.
set -uo pipefail
CHROMIUM="${LOWVRAM_FT_CHROMIUM:-/usr/bin/chromium}"
if [ -x "$CHROMIUM" ]; then
    exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "[browser setup] $CHROMIUM missing: apt-get install chromium"
    if apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; then
        exit 0
    fi
    echo "[browser setup] apt-get install chromium failed: the browser tests will be skipped"
else
    echo "[browser setup] $CHROMIUM missing and no root apt-get here: the browser tests will be skipped" \
         "(install Debian's chromium to run them)"
fi
exit 0
