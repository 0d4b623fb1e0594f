"""One table of comparison tolerances by dtype, shared by every test that compares to an oracle.

Oracles run in float64; a result computed in a lower precision is compared after casting the
oracle down. Any loosened tolerance says why.
"""

from __future__ import annotations

import torch

TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    # (rtol, atol)
    # float64 against float64: only summation order differs.
    torch.float64: (1e-9, 1e-10),
    # float32: sums of up to a few hundred products lose ~1e-6 relative each.
    torch.float32: (1e-4, 1e-5),
    # bfloat16 keeps 8 mantissa bits (~4e-3 relative per rounding); outputs are rounded once
    # after an fp32 accumulation, plus the inputs themselves were rounded.
    torch.bfloat16: (2e-2, 2e-2),
    # float16 keeps 11 mantissa bits (~5e-4 relative per rounding), same reasoning.
    torch.float16: (5e-3, 5e-3),
}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """``(rtol, atol)`` for results of ``dtype``."""
    return TOLERANCES[dtype]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, msg: str | None = None) -> None:
    """``torch.testing.assert_close`` with the table's tolerance for ``actual.dtype``.

    ``expected`` (usually a float64 oracle) is cast to ``actual``'s dtype first.
    """
    actual = torch.as_tensor(actual)
    expected = torch.as_tensor(expected).to(actual.dtype)
    rtol, atol = tolerance(actual.dtype)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=msg)
