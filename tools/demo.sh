#!/usr/bin/env bash
# Set up from scratch (tools/setup.sh) and run the main job: `python -m vitops`.
# Extra arguments go to the main job, e.g. tools/demo.sh selfcheck
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
VENV=${VITOPS_VENV:-.venv}
cd /tmp && exec "$OLDPWD/$VENV/bin/python" -m vitops "$@"
