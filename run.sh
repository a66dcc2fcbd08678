#!/usr/bin/env bash
# The main job: set up what is missing, run the lab2 study on MNIST, print the report's path.
# Extra arguments go to `cnnlab study` (e.g. ./run.sh --seeds 5 --workers 2).
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh
exec .venv/bin/cnnlab study studies/lab2.toml --out studies-out/lab2 "$@"
