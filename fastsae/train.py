"""``python -m fastsae.train``: train an SAE.

Until the activation pipeline and the full trainer land, this trains a TopK SAE on *synthetic*
activations with a known answer: every token is a sparse, non-negative mix of ``n_true`` random
unit "ground-truth features" in ``d_in`` dimensions, plus a little noise. A good SAE reconstructs
the tokens (low FVU) and recovers the features (each true feature has a decoder row with cosine
similarity near 1). It runs in well under a minute on two CPU cores and writes a SAELens v6
directory.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import fastsae
from fastsae import ops
from fastsae import reference as ref
from fastsae.cli import add_dataclass_arguments, dataclass_from_args

__all__ = ["DemoConfig", "main", "run_demo"]


@dataclass
class DemoConfig:
    """Synthetic-data TopK training demo."""

    d_in: int = 64
    """Width of the synthetic activations."""
    n_true: int = 256
    """Number of ground-truth features the data is made of."""
    true_l0: int = 6
    """Active ground-truth features per token."""
    d_sae: int = 512
    """SAE latents."""
    k: int = 8
    """Active SAE latents per token."""
    batch_size: int = 1024
    """Tokens per step."""
    steps: int = 600
    """Optimizer steps."""
    lr: float = 2e-3
    """Adam learning rate."""
    noise: float = 0.01
    """Standard deviation of Gaussian noise added to every token."""
    seed: int = 0
    """Seed for the data and the SAE."""
    backend: str = "auto"
    """fastsae.ops backend: auto, triton, torch or reference."""
    out: str = "runs/demo"
    """Directory the trained SAE is written to (SAELens v6 format)."""

    def __post_init__(self) -> None:
        for name in ("d_in", "n_true", "true_l0", "d_sae", "k", "batch_size", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.true_l0 > self.n_true:
            raise ValueError(f"true_l0={self.true_l0} must be <= n_true={self.n_true}")
        if not 1 <= self.k <= self.d_sae:
            raise ValueError(f"k={self.k} must be in [1, d_sae={self.d_sae}]")
        if self.backend not in ops.BACKENDS:
            raise ValueError(f"backend={self.backend!r}; allowed: {', '.join(ops.BACKENDS)}")


class SyntheticActivations:
    """Tokens ``x = sum_j a_j f_j + noise`` over ``true_l0`` random features ``f_j`` per token."""

    def __init__(self, cfg: DemoConfig):
        self.cfg = cfg
        self.gen = torch.Generator().manual_seed(cfg.seed)
        features = torch.randn(cfg.n_true, cfg.d_in, generator=self.gen)
        self.features = features / features.norm(dim=-1, keepdim=True)

    def batch(self) -> torch.Tensor:
        cfg = self.cfg
        idx = torch.rand(cfg.batch_size, cfg.n_true, generator=self.gen).topk(cfg.true_l0).indices
        mags = torch.rand(cfg.batch_size, cfg.true_l0, generator=self.gen) + 0.5
        x = ref.sparse_decode(mags, idx, self.features, torch.zeros(cfg.d_in))
        return x + cfg.noise * torch.randn(x.shape, generator=self.gen)


@torch.no_grad()
def _renormalise_decoder(sae: fastsae.SAE) -> None:
    sae.W_dec.div_(sae.W_dec.norm(dim=-1, keepdim=True).clamp(min=1e-8))


def run_demo(cfg: DemoConfig, log=print) -> dict:
    """Train, evaluate and save; returns the final metrics."""
    torch.manual_seed(cfg.seed)
    data = SyntheticActivations(cfg)
    sae = fastsae.TopKSAE(d_in=cfg.d_in, d_sae=cfg.d_sae, k=cfg.k, hook_name="synthetic")
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr)
    # Tokens since each latent last fired; a latent silent for 100 batches counts as dead (AuxK).
    since_fired = torch.zeros(cfg.d_sae, dtype=torch.long)
    dead_after = 100 * cfg.batch_size
    start = time.perf_counter()
    with ops.use_backend(cfg.backend) as backend:
        for step in range(cfg.steps):
            x = data.batch()
            dead = since_fired >= dead_after
            result = sae.loss(x, dead_mask=dead)
            opt.zero_grad(set_to_none=True)
            result.loss.backward()
            opt.step()
            _renormalise_decoder(sae)
            since_fired += cfg.batch_size
            since_fired[result.output.indices[result.output.values > 0]] = 0
            if step % 100 == 0 or step == cfg.steps - 1:
                with torch.no_grad():
                    f = float(ref.fvu(result.output.recon, x))
                log(f"step {step:5d}  loss {result.loss.item():.4f}  fvu {f:.4f}")
        elapsed = time.perf_counter() - start
        with torch.no_grad():
            x = data.batch()
            out = sae(x)
            cos = (data.features @ sae.W_dec.T).max(dim=-1).values
            metrics = {
                "backend": backend,
                "fvu": float(ref.fvu(out.recon, x)),
                "l0": float((out.values > 0).sum(-1).float().mean()),
                "mean_max_cosine_to_true_features": float(cos.mean()),
                "true_features_recovered_cos_gt_0.9": float((cos > 0.9).float().mean()),
                "tokens_per_second": cfg.steps * cfg.batch_size / elapsed,
            }
    out_dir = sae.save(cfg.out)
    (Path(out_dir) / "demo_metrics.json").write_text(
        json.dumps({"config": asdict(cfg), **metrics}, indent=2)
    )
    return {**metrics, "out": str(out_dir)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastsae.train",
        description=__doc__.split("\n\n")[0]
        + " (synthetic demo until the activation pipeline lands)",
    )
    add_dataclass_arguments(parser, DemoConfig)
    args = parser.parse_args(argv)
    try:
        cfg = dataclass_from_args(DemoConfig, args)
    except ValueError as e:
        parser.error(str(e))
    metrics = run_demo(cfg)
    print(f"saved SAE to {metrics.pop('out')}")
    for name, value in metrics.items():
        print(
            f"  {name}: {value:.4f}"
            if isinstance(value, float) and math.isfinite(value)
            else f"  {name}: {value}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
