"""``python -m fastsae.kernels.check`` compiles every kernel for sm_80 and sm_90 without a GPU.

Runs the check in a subprocess with ``TRITON_INTERPRET`` removed: this test process has the
interpreter on, and its ``@triton.jit`` functions cannot be compiled. About 2 minutes on 2 cores.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fastsae.kernels import (
    csr,
    encode_topk,
    encode_topk_filtered,
    slab_topk,
    sparse_decode,
    sparse_encoder_bwd,
)


def _kernel_names() -> set[str]:
    """Every ``@triton.jit`` kernel defined in fastsae.kernels (by the naming rule ``_*_kernel``)."""
    modules = (csr, encode_topk, encode_topk_filtered, slab_topk, sparse_decode, sparse_encoder_bwd)
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


def _rows(check_output: str) -> list[list[str]]:
    """Table rows, split on whitespace: ... target dtype regs spills shared mma meta (read them
    from the right: launch labels have spaces)."""
    return [line.split() for line in check_output.splitlines() if line.startswith("_")]


def test_check_reports_registers_and_no_failures(check_output):
    data = _rows(check_output)
    assert data
    assert check_output.startswith("triton "), "the table names the Triton version"
    for row in data:
        regs, spills, shared = int(row[-5]), int(row[-4]), int(row[-3])
        assert 0 < regs <= 255 and spills >= 0 and shared >= 0, row
    assert "FAILED" not in check_output
    summary = [line for line in check_output.splitlines() if "compiled in" in line]
    done, total = summary[0].split()[0].split("/")
    assert done == total


def test_no_spills_on_sm90(check_output):
    """Acceptance of issue 13: no kernel spills on sm_90 in the launchers' configurations."""
    spilling = [row for row in _rows(check_output) if "sm_90" in row and int(row[-4]) > 0]
    assert spilling == []


def test_bf16_dots_compile_to_tensor_cores(check_output):
    """The bf16 tensor-core path, which the interpreter cannot run (it widens bf16 dots to
    fp32): every bf16 encode_topk compile must contain a bf16 MMA (wgmma for the default k=32
    tiles on sm_90; mma.sync where BLOCK_M < 64 or on sm_80); fp32 inputs use tf32 MMAs
    (tf32x3), and the gather kernels none."""
    rows = _rows(check_output)
    fused = [row for row in rows if row[0] in _FUSED]
    assert {row[0] for row in fused} == _FUSED
    for row in fused:
        operand = "bf16" if "bf16" in row else "tf32"
        assert f"mma.{operand}" in row[-2], row
        default_tile = "128x64x64" in row or "128x64x32" in row
        if "sm_90" in row and default_tile:
            assert f"wgmma.{operand}" in row[-2], row
    for row in rows:
        if row[0] not in _FUSED:
            assert row[-2] == "-", row


_FUSED = {"_encode_topk_fwd_kernel", "_encode_topk_filtered_fwd_kernel"}


def test_filtered_kernel_uses_128_wide_wgmma_and_tma_on_sm90(check_output):
    """Issue 13's restructured kernel: on sm_90 each of its 128 x 128 tiles (k <= 64) is
    covered by m64n128 wgmma instructions (the register-state kernel's 64-wide tiles allowed
    n64 at most), its "tma" configurations load by TMA (cp.async.bulk.tensor) under the Triton
    version that produced the table, and none of them spills."""
    rows = [r for r in _rows(check_output) if r[0] == "_encode_topk_filtered_fwd_kernel"]
    sm90 = [r for r in rows if "sm_90" in r]
    assert sm90 and any("sm_80" in r for r in rows)
    assert sum("+tma" in r[-2] for r in sm90) >= 4, "the TMA configurations compile to TMA"
    for row in sm90:
        operand = "bf16" if "bf16" in row else "tf32"
        if "128x128x64" in row or "128x128x32" in row:
            assert f"wgmma.{operand}:m64n128k" in row[-2], row
        assert ("+tma" in row[-2]) == ("tma" in row[2:-9]), row
        assert int(row[-4]) == 0, row


def test_both_triton_versions_are_checked_in_ci():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(root, ".ci", "run")) as f:
        ci = f.read()
    assert "scripts/compile_check_triton36.sh" in ci
    assert os.access(os.path.join(root, "scripts", "compile_check_triton36.sh"), os.X_OK)
    with open(os.path.join(root, "pyproject.toml")) as f:
        assert "triton>=3.6,<4" in f.read()
