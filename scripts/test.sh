#!/usr/bin/env bash
# Set up (package, test extras, headless Chromium), then run the whole test suite offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test  # the package and its test extras
bash scripts/install_browser.sh  # headless Chromium for the report rendering test
HF_HUB_OFFLINE=1 LAYERSCOPE_REQUIRE_BROWSER=1 LAYERSCOPE_REQUIRE_DEPS=1 .venv/bin/python -m pytest -q "$@"
