"""kernels/_launch.py: the launch helper every kernel module goes through."""

from __future__ import annotations

import pathlib
import re

import pytest
import torch

from fastsae.kernels import _launch

KERNELS_DIR = pathlib.Path(_launch.__file__).parent


def test_launches_go_to_the_tensors_device(monkeypatch):
    """Triton launches on torch.cuda.current_device(); a tensor on cuda:1 while cuda:0 is current
    must launch under torch.cuda.device(cuda:1)."""
    entered = []

    class Recorder:
        def __init__(self, device):
            entered.append(device)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", Recorder)
    with _launch.device_context(torch.device("cuda", 1)):
        pass
    assert entered == [torch.device("cuda", 1)]
    with _launch.device_context(torch.device("cpu")):
        pass
    assert len(entered) == 1

    calls = []

    class FakeKernel:
        def __getitem__(self, grid):
            return lambda **kwargs: calls.append((grid, kwargs))

    x = torch.empty(3, device="meta")
    _launch.launch((FakeKernel(), (2, 1), {"x_ptr": x, "n": 3}))
    assert len(entered) == 1  # not a CUDA tensor: no device guard
    assert calls == [((2, 1), {"x_ptr": x, "n": 3})]


def test_grid_limits_and_empty_grids():
    calls = []

    class FakeKernel:
        def __getitem__(self, grid):
            return lambda **kwargs: calls.append(grid)

    x = torch.empty(1)
    _launch.launch((FakeKernel(), (0, 4), {"x": x}))
    assert calls == []
    with pytest.raises(ValueError, match="65535"):
        _launch.launch((FakeKernel(), (1, 65536), {"x": x}))
    _launch.launch((FakeKernel(), (2**20, 65535), {"x": x}))
    assert calls == [(2**20, 65535)]


def test_no_kernel_module_launches_directly():
    """Every ``kernel[grid](...)`` call lives in _launch.launch, so the device guard and the grid
    check cannot be skipped by one launcher (they were copied into three before)."""
    direct = re.compile(r"\]\(\*\*")
    offenders = [
        path.name
        for path in KERNELS_DIR.glob("*.py")
        # check.py only compiles (its docstring names the call it mirrors).
        if path.name not in ("_launch.py", "check.py") and direct.search(path.read_text())
    ]
    assert offenders == []
