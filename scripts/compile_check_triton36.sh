#!/usr/bin/env bash
# The AOT compile check (python -m fastsae.kernels.check: every kernel for sm_80 and sm_90, with
# ptxas registers and spills) under Triton 3.6, the version torch 2.11 pins on the GPU machines;
# `make test` runs it under the venv's own Triton (3.9). Supported range: pyproject's triton>=3.6.
#
#   scripts/compile_check_triton36.sh [PYTHON] [check args...]
#
# Triton 3.6 goes into .cache/triton36 (pip --target, no deps: torch and the rest stay the venv's),
# which is put first on PYTHONPATH for the check only. Reused when it is already there. Fails on
# any compile error and on any spill on sm_90.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
shift || true
VERSION=3.6.0
TARGET=.cache/triton36

have() {
    PYTHONPATH="$TARGET" "$PY" -c "import sys, triton; sys.exit(triton.__version__ != '$VERSION')" \
        2>/dev/null
}
if ! have; then
    rm -rf "$TARGET"
    # The venv's pip when it has one; otherwise any pip, told which Python the wheel is for.
    PIP=("$PY" -m pip)
    "$PY" -m pip --version >/dev/null 2>&1 || PIP=(python3 -m pip)
    pyver=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')
    "${PIP[@]}" install --quiet --no-deps --only-binary=:all: --python-version "$pyver" \
        --target "$TARGET" "triton==$VERSION"
    have || { echo "compile_check_triton36: triton $VERSION did not install" >&2; exit 1; }
fi
start=$(date +%s)
env -u TRITON_INTERPRET PYTHONPATH="$TARGET${PYTHONPATH:+:$PYTHONPATH}" \
    "$PY" -m fastsae.kernels.check --no-spills-on 90 "$@"
echo "compile_check_triton36: done in $(( $(date +%s) - start )) s"
