"""Shared test setup.

- ``HF_HUB_OFFLINE=1``: a hub call would otherwise hang ~25 s before failing on this network.
- ``TRITON_INTERPRET=1`` must be set before any ``@triton.jit`` decorator runs, so it is set here,
  before fastsae is imported; Triton kernels then run on CPU tensors. Set
  ``FASTSAE_TEST_GPU=1`` (or run where CUDA is available) to compile them for real instead.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
_cuda = False
try:
    import torch

    _cuda = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    pass
if not _cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# "ci": every example count as written; "dev": fewer, for a quick local loop.
settings.register_profile("ci", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "dev", deadline=None, max_examples=10, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def seed() -> int:
    """Seed torch's global RNG; tests that draw random tensors take this fixture."""
    torch.manual_seed(0)
    return 0


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(
        reason="needs a CUDA device (CPU twin runs under TRITON_INTERPRET=1)"
    )
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
