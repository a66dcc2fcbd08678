#!/usr/bin/env bash
# The whole test suite: set up what is missing, then run pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
