"""``python -m fastsae.kernels.check`` compiles every kernel for sm_80 and sm_90 without a GPU.

Runs the check in a subprocess with ``TRITON_INTERPRET`` removed: this test process has the
interpreter on, and its ``@triton.jit`` functions cannot be compiled. About 2 minutes on 2 cores.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fastsae.kernels import csr, encode_topk, slab_topk, sparse_decode, sparse_encoder_bwd


def _kernel_names() -> set[str]:
    """Every ``@triton.jit`` kernel defined in fastsae.kernels (by the naming rule ``_*_kernel``)."""
    modules = (csr, encode_topk, slab_topk, sparse_decode, sparse_encoder_bwd)
    return {
        name
        for module in modules
        for name in vars(module)
        if name.startswith("_") and name.endswith("_kernel")
    }


@pytest.fixture(scope="module")
def check_output() -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "fastsae.kernels.check"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,  # slab_topk's 1024- and 2048-key sorts add ~2 min on two cores
    )
    assert result.returncode == 0, f"check failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.mark.parametrize("target", ["sm_80", "sm_90"])
def test_every_kernel_compiles_for(target, check_output):
    rows = [line.split() for line in check_output.splitlines()]
    compiled = {row[0] for row in rows if row and target in row}
    assert {"_sparse_decode_fwd_kernel", "_segment_reduce_fwd_kernel"} <= _kernel_names()
    assert _kernel_names() <= compiled, f"missing on {target}: {_kernel_names() - compiled}"
    for launch in ("grad_W_dec", "grad_W_enc", "grad_values", "enc grad_x"):
        assert any(launch in line and target in line for line in check_output.splitlines())


def test_check_reports_registers_and_no_failures(check_output):
    data = [line.split() for line in check_output.splitlines() if line.startswith("_")]
    assert data
    for row in data:  # ... regs spills shared meta: read from the right (labels have spaces)
        regs, spills, shared = int(row[-4]), int(row[-3]), int(row[-2])
        assert 0 < regs <= 255 and spills >= 0 and shared >= 0, row
    assert "FAILED" not in check_output
    summary = [line for line in check_output.splitlines() if "compiled in" in line]
    done, total = summary[0].split()[0].split("/")
    assert done == total
