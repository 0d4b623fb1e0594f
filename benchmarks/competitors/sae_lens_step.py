"""SAELens 6.x: one step of its own ``SAETrainer`` on a ``TopKTrainingSAE``.

``SAETrainer.step`` is the seam its ``fit()`` loop calls per batch: the training forward pass
(dense encode, TopK scattered into a dense ``[B, d_sae]`` code, dense decode, MSE + AuxK), the
firing statistics, backward, gradient-norm clipping, Adam and the schedulers. We call exactly that,
then advance ``n_training_steps`` as ``fit()`` does. Everything else is SAELens's default for a
TopK SAE (``rescale_acts_by_decoder_norm=True``, ``use_sparse_activations=False``, fp32, no
autocast).
"""

from __future__ import annotations

import torch
from torch import Tensor

from benchmarks.competitors import StepProvider
from benchmarks.harness import Unavailable
from benchmarks.memory import owned_bytes


def make_step(x: Tensor, d_sae: int, k: int) -> StepProvider:
    try:
        from sae_lens.config import SAETrainerConfig
        from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
        from sae_lens.training.sae_trainer import SAETrainer
    except ImportError as exc:
        raise Unavailable(
            f"sae-lens is not installed ({exc}); pip install 'sae-lens>=6,<7'"
        ) from None
    B, d_in = x.shape
    device = str(x.device)
    torch.manual_seed(0)
    sae = TopKTrainingSAE(
        TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k, dtype="float32", device=device)
    )
    lr = 4e-4 / (d_sae / 2**14) ** 0.5
    trainer = SAETrainer(
        SAETrainerConfig(
            total_training_samples=10**12,
            train_batch_size_samples=B,
            lr=lr,
            lr_end=lr,  # a constant schedule (the runner config fills this in post-init)
            device=device,
        ),
        sae,
        data_provider=iter(()),  # unused: we hand batches to step() ourselves
    )

    def step() -> None:
        trainer.step(x)
        trainer.n_training_steps += 1

    def state_bytes() -> int:
        return owned_bytes(
            sae, trainer.optimizer, trainer.act_freq_scores, trainer.n_forward_passes_since_fired
        )

    @torch.no_grad()
    def reconstruct(h: Tensor) -> Tensor:
        return sae(h)

    @torch.no_grad()
    def codes(h: Tensor) -> Tensor:
        return sae.encode(h)

    return StepProvider(step, state_bytes, reconstruct, codes)
