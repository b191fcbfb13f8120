#!/usr/bin/env bash
# Headless Chromium for the HTML-render tests (tests/browser.py). Debian's chromium + chromium-driver
# come from the apt mirror, so nothing is downloaded from a browser CDN (playwright / Selenium Manager
# can't reach theirs here). Fonts are listed explicitly so text never renders as boxes.
# Idempotent: does nothing when chromium and chromedriver are already on PATH.
set -euo pipefail
PKGS="chromium chromium-driver fonts-dejavu-core fonts-liberation"
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    echo "install_browser: chromium and chromedriver already present"; exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install_browser: not root; install the Debian packages yourself: apt-get install $PKGS" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends $PKGS >/dev/null
echo "install_browser: $(chromium --version 2>/dev/null); $(chromedriver --version)"
