#!/usr/bin/env bash
# One idempotent set-up for a fresh Debian machine: system packages when absent, then .venv with the
# extras asked for. Usage: deploy/setup.sh [extras]   (default extras: sim,edge,cloud)
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-sim,edge,cloud}"
PYTHON="${PYTHON:-python3}"

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/usr/bin/$1" ]; }

missing=()
have mosquitto || missing+=(mosquitto mosquitto-clients)
have chromium || missing+=(chromium)  # the reports' browser tests (Playwright drives it)
have pg_ctlcluster || missing+=(postgresql)
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf ] || missing+=(fonts-dejavu-core)
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing system packages: ${missing[*]}"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "ShelfLoop needs Python >= 3.11")'
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv

# Reinstall only when pyproject.toml or the extras change.
stamp=".venv/.shelfloop-$(cat pyproject.toml <(echo "$EXTRAS") | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    echo "setup: installing shelfloop[$EXTRAS] into .venv"
    .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
    # torch and torchvision first (the train extra): the pinned pair that lies on this machine's disk.
    if [[ ",$EXTRAS," == *",train,"* ]]; then
        .venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1" 2>&1 | grep -v "is ignored" || true
    fi
    .venv/bin/python -m pip install -q -e ".[$EXTRAS]" 2>&1 | grep -v "is ignored" || true
    .venv/bin/python -c "import shelfloop" # fail loudly if the install did not happen
    rm -f .venv/.shelfloop-*
    touch "$stamp"
fi
