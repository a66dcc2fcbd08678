#!/usr/bin/env bash
# The main job: set up what is missing, run the lab2 study on MNIST, print the report's path.
# studies/lab2.toml runs seeds until resolved (at most 8 per variant, about 15 minutes on 2 cores).
# Extra arguments go to `cnnlab study` (e.g. ./run.sh --max-seeds 12 --workers 2).
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh run
exec .venv/bin/cnnlab study studies/lab2.toml --out studies-out/lab2 "$@"
