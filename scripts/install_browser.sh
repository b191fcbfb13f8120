#!/usr/bin/env bash
# Headless Chromium for the HTML-render tests (tests/browser.py). Debian's chromium + chromium-driver
# come from the apt mirror, so nothing is downloaded from a browser CDN (playwright / Selenium Manager
# can't reach theirs here). Fonts are listed explicitly so text never renders as boxes: Noto covers the
# scripts a vocabulary holds (Thai, Sinhala, Tibetan, Devanagari, ... in fonts-noto-core; Chinese,
# Japanese, Korean in fonts-noto-cjk).
# Idempotent: does nothing when chromium, chromedriver and the Noto fonts are already installed.
set -euo pipefail
PKGS="chromium chromium-driver fonts-dejavu-core fonts-liberation fonts-noto-core fonts-noto-cjk"
if command -v chromium >/dev/null && command -v chromedriver >/dev/null \
        && dpkg -s fonts-noto-core fonts-noto-cjk >/dev/null 2>&1; then
    echo "install_browser: chromium, chromedriver and the Noto fonts already present"; exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install_browser: not root; install the Debian packages yourself: apt-get install $PKGS" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends $PKGS >/dev/null
echo "install_browser: $(chromium --version 2>/dev/null); $(chromedriver --version)"
