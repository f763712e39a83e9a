#!/usr/bin/env bash
# Set up from scratch (tools/setup.sh) and run the whole test suite against the installed build.
# Extra arguments go to pytest, e.g. tools/test.sh -k rope
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
VENV=${VITOPS_VENV:-.venv}
# The sources live in python/vitops, so `import vitops` resolves to the installed build.
set +e
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
if [ $rc -eq 5 ]; then
  echo "pytest collected no tests"; exit 1
fi
exit $rc
