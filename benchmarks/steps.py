"""The full training step: fastsae's ``Trainer.step`` against the dense reference, the real SAELens
and sparsify steps, and the physical floor, all on the same activations in one process."""

from __future__ import annotations

import torch

from benchmarks.competitors import StepProvider, sae_lens_step, sparsify_step
from benchmarks.harness import Case, Unavailable
from benchmarks.memory import owned_bytes


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _fastsae_trainer(
    x: torch.Tensor, n: int, k: int, backend: str, autocast: str = "fp32"
) -> StepProvider:
    from fastsae.train import TrainConfig, Trainer

    B, d = x.shape
    cfg = TrainConfig(
        d_in=d,
        d_sae=n,
        k=k,
        batch_size=B,
        buffer_tokens=2 * B,
        total_tokens=10**12,
        backend=backend,
        autocast=autocast,
        device=str(x.device),
        warmup_steps=0,
        progress=False,
    )
    trainer = Trainer(cfg)

    def state_bytes() -> int:
        return owned_bytes(
            trainer.scaled_sae,
            trainer.optimizers,
            trainer.since_fired,
            trainer.fire_counts,
            trainer.averaged,  # the weight average (ema_gamma), one more copy of the weights
            # the reused pre-activation slab (CPU): held between steps instead of re-faulted
            trainer.scratch_pool.tensors() if trainer.scratch_pool is not None else [],
        )

    return StepProvider(lambda: trainer.step(x), state_bytes)


def _floor(x: torch.Tensor, n: int, k: int, reuse: bool = False) -> StepProvider:
    """One encoder ``addmm``, one ``torch.topk`` and one fused Adam step over the parameters of
    an SAE: what any exact TopK step must at least do.

    ``reuse``: the ``addmm`` writes into one ``[B, n]`` buffer kept between calls, as the
    trainer's scratch pool does on CPU (:mod:`fastsae.ops._scratch`), instead of a fresh matrix
    whose pages fault on first write: the stricter floor."""
    B, d = x.shape
    g = torch.Generator(device="cpu").manual_seed(3)
    W_enc = (torch.randn(d, n, generator=g) / d**0.5).to(x.device)
    b_enc = torch.zeros(n, device=x.device)
    params = [
        torch.nn.Parameter(t.to(x.device))
        for t in (W_enc, b_enc, torch.randn(n, d, generator=g), torch.zeros(d))
    ]
    for p in params:
        p.grad = torch.randn_like(p)
    adam = torch.optim.Adam(params, lr=1e-9, fused=True)

    out = torch.empty(B, n, device=x.device) if reuse else None

    def floor() -> None:
        pre = torch.addmm(b_enc, x, W_enc, out=out)
        torch.topk(pre, k, dim=-1)
        del pre
        adam.step()

    return StepProvider(floor, lambda: owned_bytes(W_enc, b_enc, params, adam, out))


def trainer_step(B: int, d: int, n: int, k: int) -> Case:
    """One full training step (forward, AuxK bookkeeping, backward, decoder projection, Adam,
    renormalisation) on random activations.

    Providers: fastsae's ``Trainer.step`` per backend in fp32 (``autocast="fp32"``, whatever
    ``auto`` would pick), and on the torch backend in bf16 (``fastsae-torch-bf16``: bf16 GEMM with
    an exact top-k, an fp32 sparse backward, fp32 master weights and Adam); the same Trainer on the ``reference``
    backend (dense oracles: the dense-SAE baseline); SAELens's and sparsify's own steps
    (:mod:`benchmarks.competitors`); and the floor of an exact TopK step: one encoder ``addmm``,
    one ``torch.topk`` and one Adam step over the same parameters (the baseline), and the same
    floor with its ``addmm`` into a reused buffer (``floor(reused buffer)``: no page faults on a
    fresh ``[B, n]`` matrix on CPU, as fastsae's scratch pool).
    """
    device = _device()
    g = torch.Generator(device="cpu").manual_seed(3)
    x = torch.randn(B, d, generator=g).to(device)
    builders = {
        "fastsae-triton": lambda: _fastsae_trainer(x, n, k, "triton"),
        "fastsae-torch": lambda: _fastsae_trainer(x, n, k, "torch"),
        "fastsae-torch-bf16": lambda: _fastsae_trainer(x, n, k, "torch", "bf16"),
        "dense-reference": lambda: _fastsae_trainer(x, n, k, "reference"),
        "sae_lens": lambda: sae_lens_step.make_step(x, n, k),
        "sparsify": lambda: sparsify_step.make_step(x, n, k),
        "floor(addmm+topk+adam)": lambda: _floor(x, n, k),
        "floor(reused buffer)": lambda: _floor(x, n, k, reuse=True),
    }
    providers, state, skipped = {}, {}, {}
    for name, build in builders.items():
        if name == "fastsae-triton" and device != "cuda":
            skipped[name] = "no CUDA device: the Triton kernels run on GPUs only"
            continue
        try:
            made = build()
        except Unavailable as exc:
            skipped[name] = str(exc)
            continue
        providers[name], state[name] = made.step, made.state_bytes
    return Case(
        name="trainer_step",
        mode="step",
        shapes={"B": B, "d": d, "n": n, "k": k},
        providers=providers,
        skipped=skipped,
        state=state,
        # TopK step cost model (PRIOR-ART): 2*B*d*n for the encoder + 8*B*k*d for the sparse rest
        flops=2 * B * d * n + 8 * B * k * d,
        # W_enc read by the GEMM, Adam's ~28 bytes per parameter (fp32 param, grad, 2 moments)
        bytes=4 * d * n + 28 * (2 * d * n + n + d),
        baseline="floor(addmm+topk+adam)",
        items=B,
        # the dense reference and SAELens take seconds per step at the full shapes
        repeats=5 if n >= 16384 else None,
        notes=(
            "fp32 except fastsae-torch-bf16, Adam, no dead latents yet (AuxK inactive in every provider); sae_lens: its "
            "SAETrainer.step on a TopKTrainingSAE; sparsify: its Trainer's step with "
            "torch.optim.Adam"
            + (
                "; sparsify decodes with its eager embedding_bag fallback on CPU"
                if device == "cpu"
                else ""
            )
        ),
    )
