#!/usr/bin/env bash
# Installs what meso-jax needs: the pinned Python packages (requirements.txt), the BlazeFace face
# detector's wheel without its declared full-TensorFlow dependency (requirements-nodeps.txt), and with
# --tests Debian's Chromium for the report's browser test where apt-get can install it (elsewhere that
# test skips and says why).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -r requirements.txt
python3 -m pip install -q --no-deps -r requirements-nodeps.txt
if [[ "${1:-}" == "--tests" ]] && ! command -v chromium >/dev/null; then
  if command -v apt-get >/dev/null && [[ "$(id -u)" == 0 ]]; then
    { apt-get install -y -qq chromium || { apt-get update -qq && apt-get install -y -qq chromium; }; } >/dev/null 2>&1 \
      || echo "install.sh: could not install chromium; the browser test will skip" >&2
  else
    echo "install.sh: chromium is not installed (needs root and apt-get); the browser test will skip" >&2
  fi
fi
