#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install fastsae (the distribution
# fastsae-lab; the import name is fastsae) from this checkout with its dev extras.
#
#   scripts/bootstrap.sh            # uses $FASTSAE_VENV, default .venv
#
# torch is installed *before* the project so that pip never resolves `torch>=2.4` to a fresh
# multi-GB CUDA download on its own:
#   - a torch that is already importable (in the venv, or in the Python that created it) is kept;
#   - with CUDA present (nvidia-smi works): torch==2.13.0 from the default index (a CUDA build);
#   - without CUDA: torch==2.13.0 from PyTorch's CPU index, or a local CPU wheel that pip's
#     find-links already offers (set FASTSAE_TORCH_CPU_INDEX="" to skip the CPU index).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${FASTSAE_VENV:-.venv}
PY=${PYTHON:-python3}
TORCH_VERSION=2.13.0
CPU_INDEX=${FASTSAE_TORCH_CPU_INDEX-https://download.pytorch.org/whl/cpu}
STAMP="$VENV/.fastsae-installed"

if [ ! -x "$VENV/bin/python" ]; then
    venv_flags=()
    # Reuse a torch the user already has rather than installing a second one.
    if "$PY" -c "import torch" >/dev/null 2>&1; then
        echo "bootstrap: found torch $("$PY" -c 'import torch; print(torch.__version__)') in $PY; reusing it"
        venv_flags+=(--system-site-packages)
    fi
    "$PY" -m venv "${venv_flags[@]}" "$VENV"
fi
VPY="$VENV/bin/python"

# Skip the installs when nothing that drives them changed since the last successful run.
if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ] && [ "$STAMP" -nt scripts/bootstrap.sh ]; then
    exit 0
fi

if "$VPY" -c "import torch" >/dev/null 2>&1; then
    echo "bootstrap: keeping torch $("$VPY" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "bootstrap: CUDA present, installing torch==$TORCH_VERSION"
    "$VPY" -m pip install --quiet "torch==$TORCH_VERSION"
else
    echo "bootstrap: no CUDA, installing the CPU build of torch==$TORCH_VERSION"
    idx=()
    # Only offer PyTorch's CPU index when its host resolves: an unreachable index makes pip
    # retry for minutes. Without it, pip takes a local CPU wheel from find-links if there is one.
    if [ -n "$CPU_INDEX" ] && "$VPY" - "$CPU_INDEX" <<'PYEOF' >/dev/null 2>&1
import socket, sys, urllib.parse
socket.getaddrinfo(urllib.parse.urlparse(sys.argv[1]).hostname, 443)
PYEOF
    then
        idx=(--extra-index-url "$CPU_INDEX")
    fi
    "$VPY" -m pip install --quiet "${idx[@]}" "torch==$TORCH_VERSION"
fi

"$VPY" -m pip install --quiet -e ".[dev]"
touch "$STAMP"
