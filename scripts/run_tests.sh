#!/usr/bin/env bash
# Run the test suite with the venv's Python. pytest's exit code 5 ("no tests collected") is a
# failure here: a suite that silently runs nothing must not pass.
#
#   scripts/run_tests.sh [PYTHON] [pytest args...]
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
shift || true
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$PY" -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "run_tests: pytest collected no tests; treating that as a failure" >&2
    exit 1
fi
exit "$rc"
