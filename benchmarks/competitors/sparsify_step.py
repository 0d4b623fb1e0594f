"""EleutherAI sparsify (``eai-sparsify``): one optimizer step as its ``Trainer.fit`` takes it for
an autoencoder (``loss_fn="fvu"``, one micro-batch, ``optimizer="adam"``).

In order: decoder rows set to unit norm, the dead mask from tokens since each latent last fired,
``SparseCoder.forward(x, y, dead_mask=..., total_variance=...)`` (its fused encoder: dense GEMM,
``topk``, the ``index_add_`` backward), loss ``fvu + auxk_alpha * auxk_loss + multi_topk_fvu / 8``,
backward, removal of the decoder-gradient component parallel to the rows, ``torch.optim.Adam``
(what its trainer falls back to without bitsandbytes), ``zero_grad``, and the firing counts.

On a CPU its Triton decoder cannot run, so the decoder is sparsify's own eager fallback
(``embedding_bag``), the same function it picks when Triton is not installed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from benchmarks.competitors import StepProvider
from benchmarks.harness import Unavailable
from benchmarks.memory import owned_bytes

AUXK_ALPHA = 1 / 32  # fastsae's default AuxK coefficient, so both steps do the same work
DEAD_TOKENS = 10_000_000  # sparsify's default dead_feature_threshold


def make_step(x: Tensor, d_sae: int, k: int) -> StepProvider:
    try:
        import sparsify.sparse_coder as sparse_coder
        import sparsify.utils
        from sparsify import SparseCoder, SparseCoderConfig
    except ImportError as exc:
        raise Unavailable(
            f"eai-sparsify is not installed ({exc}); pip install 'eai-sparsify>=1.3'"
        ) from None
    if x.device.type != "cuda":
        sparse_coder.decoder_impl = sparsify.utils.eager_decode
    B, d_in = x.shape
    torch.manual_seed(0)
    coder = SparseCoder(
        d_in, SparseCoderConfig(num_latents=d_sae, k=k), device=x.device, dtype=torch.float32
    )
    optimizer = torch.optim.Adam(coder.parameters(), lr=2e-4 / (d_sae / 2**14) ** 0.5)
    since_fired = torch.zeros(d_sae, dtype=torch.long, device=x.device)
    did_fire = torch.zeros(d_sae, dtype=torch.bool, device=x.device)

    def step() -> None:
        coder.set_decoder_norm_to_unit_norm()
        dead_mask = since_fired > DEAD_TOKENS
        total_variance = (x - x.mean(0)).pow(2).sum()
        out = coder(x=x, y=x, dead_mask=dead_mask, total_variance=total_variance)
        did_fire[out.latent_indices.flatten()] = True
        loss = out.fvu + AUXK_ALPHA * out.auxk_loss + out.multi_topk_fvu / 8
        loss.backward()
        coder.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            since_fired.add_(B)
            since_fired[did_fire] = 0
            did_fire.zero_()

    def state_bytes() -> int:
        return owned_bytes(coder, optimizer, since_fired, did_fire)

    @torch.no_grad()
    def reconstruct(h: Tensor) -> Tensor:
        return coder(x=h, y=h).sae_out

    @torch.no_grad()
    def codes(h: Tensor) -> Tensor:
        out = coder.encode(h)
        dense = out.top_acts.new_zeros(h.shape[0], d_sae)
        return dense.scatter_(-1, out.top_indices, out.top_acts)

    return StepProvider(step, state_bytes, reconstruct, codes)
