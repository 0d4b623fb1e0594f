"""The competitors' own training steps, timed beside fastsae's in the same process.

Each module builds one provider from the real package (``sae-lens``, ``eai-sparsify``, both dev
extras of fastsae) doing what that package's trainer does in one optimizer step, on the same
activations and shapes as :func:`benchmarks.steps.trainer_step`. A package that is not installed
raises :class:`benchmarks.harness.Unavailable`, so the provider is recorded as skipped.

Both packages install into fastsae's own environment without conflicts (their requirements are a
subset of what fastsae[dev] already pulls in, plus ``natsort`` and ``schedulefree``), so no
separate virtual environment and no subprocess are needed, and the competitors are interleaved
with fastsae like every other provider.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple


class StepProvider(NamedTuple):
    """A zero-argument training step and the bytes it keeps between steps; ``reconstruct``
    (``x [N, d] -> recon [N, d]``, no gradient) where the quality benchmark needs it."""

    step: Callable[[], object]
    state_bytes: Callable[[], int]
    reconstruct: Callable[[object], object] | None = None
    #: ``x [N, d] -> codes [N, d_sae]`` (dense latent activations, no gradient), where the quality
    #: benchmark needs L0 and dead latents
    codes: Callable[[object], object] | None = None
