#!/usr/bin/env bash
# Idempotent set-up shared by ./run.sh and ./test.sh.
#   - Debian packages: graphviz (model graphs), chromium (report rendering test),
#     dataset-fashion-mnist (offline Fashion-MNIST), gcc (cnnlab's native CPU kernels;
#     without it training falls back to torch's slower kernels). Installed only when missing,
#     and only when we can (root or passwordless sudo); otherwise a warning.
#   - .venv with cnnlab installed editable, re-installed only when pyproject.toml changes.
#   - MNIST in the cache ($CNNLAB_DATA, default ~/.cache/cnnlab), fetched only when missing.
#   - cnnlab's native CPU kernels, built once (cnnlab/native; cached in ~/.cache/cnnlab/native).
# Extra pip extras can be asked for with CNNLAB_EXTRAS (e.g. CNNLAB_EXTRAS=test,ray).
# `setup.sh run` (./run.sh) sets up only what the main job needs: no chromium, no
# Fashion-MNIST, no test extra; `setup.sh` (./test.sh) sets up everything the tests need.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
MODE=${1:-test}
if [ "$MODE" = run ]; then EXTRAS=${CNNLAB_EXTRAS:-}; else EXTRAS=${CNNLAB_EXTRAS:-test}; fi

need_apt=()
command -v dot >/dev/null 2>&1 || need_apt+=(graphviz)
command -v cc >/dev/null 2>&1 || need_apt+=(gcc libc6-dev)
if [ "$MODE" != run ]; then
    command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
    [ -d /usr/share/datasets/fashion-mnist ] || need_apt+=(dataset-fashion-mnist)
fi
if [ ${#need_apt[@]} -gt 0 ] && command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then
        if sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO=""; fi
    fi
    if [ "$(id -u)" = 0 ] || [ -n "$SUDO" ]; then
        echo "setup: installing Debian packages: ${need_apt[*]}"
        $SUDO apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
    else
        echo "setup: warning: missing Debian packages (${need_apt[*]}); install them for graphs and browser tests" >&2
    fi
fi

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    "$PY" -m venv .venv
fi
hash=$(cat pyproject.toml | sha256sum | cut -c1-16)
stamp=".venv/.cnnlab-setup-$hash-${EXTRAS//,/_}"
# a venv set up for the tests (a superset) serves the main job as it is
if [ ! -f "$stamp" ] && ! { [ "$MODE" = run ] && ls .venv/.cnnlab-setup-"$hash"-* >/dev/null 2>&1; }; then
    echo "setup: installing cnnlab${EXTRAS:+[$EXTRAS]} into .venv"
    .venv/bin/pip install -q --disable-pip-version-check -e ".${EXTRAS:+[$EXTRAS]}"
    rm -f .venv/.cnnlab-setup-*
    touch "$stamp"
fi

# Data: a no-op when the verified files are already in the cache.
.venv/bin/cnnlab data fetch mnist --quiet
# cnnlab's native CPU kernels: compiled once per machine (about a second), cached.
.venv/bin/python -c "from cnnlab import native; print('setup: CPU kernels:', native.describe())"
