"""``DistributedTrainer``: :class:`fastsae.train.Trainer` on a ``(dp, latent)`` process grid.

What changes against one process (everything else is the inherited step):

- **initialisation**: the input scale and ``b_dec`` are computed from the *global* first batch
  (gathered over the data group), so every rank starts from the values one process would get;
- **weights**: every rank draws the full seeded initialisation and keeps its slab, so the slabs
  together equal one process's SAE;
- **loss**: on a latent group of more than one rank, :func:`fastsae.parallel.latent.sharded_loss`;
- **gradients**: averaged over the data group after backward (each rank's loss is the mean over
  its ``B / dp`` tokens, so the average is the gradient of the global mean), before the decoder
  projection, clipping and Adam;
- **dead-latent statistics**: per-latent firing counts summed over the data group; a latent's
  tokens-since-fired advances by the global batch;
- **BatchTopK threshold**: the smallest kept activation is the minimum over the data group.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import Tensor

from fastsae.config import SAEConfig
from fastsae.parallel.comm import all_gather, all_reduce
from fastsae.parallel.latent import SHARDABLE, LatentShard, sharded_loss
from fastsae.parallel.mesh import Layout, latent_slab
from fastsae.sae import SAE
from fastsae.train.config import TrainConfig
from fastsae.train.memory import MemoryEstimate
from fastsae.train.trainer import Trainer, _scale_encoder

__all__ = ["DistributedTrainer", "check_parallel_config"]


def check_parallel_config(cfg: TrainConfig, layout: Layout) -> None:
    """Refuse, before any compute, what a mode cannot do."""
    if layout.latent_size > 1:
        if cfg.architecture not in SHARDABLE:
            raise ValueError(
                f"parallel={layout.mode} shards latents, which supports architecture in "
                f"{SHARDABLE}, not {cfg.architecture!r}; use parallel=dp"
            )
        if cfg.d_sae < layout.latent_size:
            raise ValueError(
                f"d_sae={cfg.d_sae} must be >= the latent group size {layout.latent_size}"
            )
    if cfg.batch_size % layout.dp_size:
        raise ValueError(
            f"batch_size={cfg.batch_size} must be a multiple of the data-parallel size "
            f"{layout.dp_size} (each rank takes batch_size / dp tokens per step)"
        )
    if layout.dp_size > 1 and cfg.optimizer_in_backward:
        raise ValueError(
            f"optimizer_in_backward=True steps Adam before gradients are all-reduced; it is "
            f"not supported with parallel={layout.mode} (data groups of {layout.dp_size})"
        )


class DistributedTrainer(Trainer):
    """A :class:`Trainer` for one rank of ``layout``. ``step(x)`` takes this rank's
    ``[batch_size / dp, d_in]`` slice of the global batch (the same slice on every rank of a
    latent group)."""

    def __init__(self, cfg: TrainConfig, layout: Layout, **kwargs):
        check_parallel_config(cfg, layout)
        self.layout = layout
        offset, count = latent_slab(cfg.d_sae, layout.latent_size, layout.latent_rank)
        self.shard = LatentShard(layout.latent_group, offset, count, cfg.d_sae)
        if layout.dp_size > 1 and cfg.optimizer_in_backward is None:
            cfg = dataclasses.replace(cfg, optimizer_in_backward=False)
        if layout.latent_size > 1 and cfg.optimizer_in_backward is None:
            # Only the slab's share of the plain estimate matters; decide on that.
            cfg = dataclasses.replace(cfg, optimizer_in_backward=False)
        if str(layout.device) != cfg.device and cfg.device == "auto":
            cfg = dataclasses.replace(cfg, device=str(layout.device))
        super().__init__(cfg, **kwargs)

    # -- construction ----------------------------------------------------------------------------

    def _plan_memory(self, d_in: int, d_out: int) -> None:
        """As one process, but the weight average is dropped on every rank if one rank must drop
        it (a partial average could be neither exported nor resumed)."""
        super()._plan_memory(d_in, d_out)
        if self.layout.world > 1 and self.cfg.ema_gamma is not None:
            dropped = torch.tensor([float(self.average_gamma is None)], device=self.layout.device)
            if all_reduce(dropped, dist.group.WORLD, "max").item():
                self.average_gamma = None

    def _estimate(self, d_in: int, d_out: int, cfg: TrainConfig) -> MemoryEstimate:
        """One rank's share (its latent slab, its ``B / dp`` rows)."""
        from fastsae.parallel.memory import estimate_parallel

        layout = self.layout
        return estimate_parallel(cfg, d_in, d_out, layout.dp_size, layout.latent_size)

    @property
    def sharded(self) -> bool:
        return self.layout.latent_size > 1

    def _build_sae(self, sae_cfg: SAEConfig) -> SAE:
        self.full_sae_cfg = sae_cfg
        # The full seeded draw on the host, then this rank's slab on the device: the slabs of all
        # ranks are exactly one process's initialisation (host memory: one full SAE, briefly).
        full = SAE.from_config(sae_cfg)
        full.reset_parameters(torch.Generator().manual_seed(self.cfg.seed))
        if not self.sharded:
            return full.to(self.device)
        # Kept until the first batch: the least-squares encoder scale needs the full SAE's
        # reconstruction (see _init_encoder_scale).
        self._full_for_init = full
        return slab_of(full, self.shard.offset, self.shard.count).to(self.device)

    @torch.no_grad()
    def _init_encoder_scale(self, x: Tensor) -> None:
        """One process's least-squares factor: fitted on the full SAE (every rank computes the
        same number from the same gathered batch), then applied to this rank's slab."""
        full = getattr(self, "_full_for_init", None)
        if full is None:
            return super()._init_encoder_scale(x)
        full.b_dec.copy_(self.scaled_sae.b_dec.cpu())
        a = self._fit_encoder_scale(full, x.cpu())
        del self._full_for_init
        if a is not None:
            _scale_encoder(self.scaled_sae, a)
            self.init_scale_used = a

    # -- the step ----------------------------------------------------------------------------------

    @torch.no_grad()
    def initialize(self, x: Tensor, y: Tensor | None = None) -> None:
        group = self.layout.dp_group
        x = torch.cat(all_gather(x.to(self.device), group))
        if y is not None:
            y = torch.cat(all_gather(y.to(self.device), group))
        super().initialize(x, y)

    def _dead_local(self) -> Tensor:
        return self.since_fired >= self.cfg.dead_after_tokens

    def _loss(self, x: Tensor, y: Tensor | None, dead_mask: Tensor | None):
        global_batch = self.cfg.architecture == "batchtopk" and self.layout.dp_size > 1
        if not self.sharded and not global_batch:
            result = super()._loss(x, y, dead_mask)
        else:
            dead = self._dead_local()
            n_dead = int(all_reduce(dead.sum().reshape(1), self.layout.latent_group).item())
            result = sharded_loss(
                self.scaled_sae,
                x,
                x if y is None else y,
                shard=self.shard,
                k=self.cfg.k,
                dead_mask=dead,
                n_dead=n_dead,
                coeffs=self._coefficients(),
                batch_group=self.layout.dp_group,
                dp_size=self.layout.dp_size,
                dp_rank=self.layout.dp_rank,
            )
        # One rank's non-finite loss must stop every rank at the same step, not leave the others
        # waiting in the gradient all-reduce.
        finite = torch.isfinite(result.loss.detach()).to(torch.float32).reshape(1)
        if not bool(all_reduce(finite, self.layout.dp_group, "min").item()):
            result.loss = result.loss + float("nan")
        return result

    @torch.no_grad()
    def _reduce_gradients(self) -> None:
        """Mean of the gradients over the data group, in place, one collective per parameter
        (no flat copy: at 2^20 latents that copy alone would be 18 GiB)."""
        group, size = self.layout.dp_group, self.layout.dp_size
        if size == 1:
            return
        for p in self.scaled_sae.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            g = p.grad
            # W_enc's gradient is the transpose view of a contiguous latent-major buffer; a sum
            # does not care about layout, so that buffer is reduced in place.
            if g.is_contiguous():
                all_reduce(g, group)
            elif g.T.is_contiguous():
                all_reduce(g.T, group)
            else:
                g.copy_(all_reduce(g.contiguous(), group))
            g.div_(size)

    @torch.no_grad()
    def _clip_gradients(self, max_norm: float) -> float:
        """The global norm: squared norms of the slab's per-latent gradients summed over the
        latent group, replicated ones (``b_dec``, ``W_skip``) counted once; then
        ``clip_grad_norm_``'s scaling, ``min(1, max_norm / (norm + 1e-6))``."""
        if not self.sharded:
            return super()._clip_gradients(max_norm)
        names = dict(self.scaled_sae.named_parameters())
        grads = {n: p.grad for n, p in names.items() if p.grad is not None}
        sliced = [g for n, g in grads.items() if n in (*LATENT_ROWS, "W_enc")]
        shared = [g for n, g in grads.items() if n not in (*LATENT_ROWS, "W_enc")]
        sq = torch.stack([g.double().pow(2).sum() for g in sliced]).sum().reshape(1)
        sq = all_reduce(sq, self.layout.latent_group)
        if shared:
            sq = sq + torch.stack([g.double().pow(2).sum() for g in shared]).sum()
        norm = float(sq.sqrt().item())
        scale = min(1.0, max_norm / (norm + 1e-6))
        if scale < 1.0:
            for g in grads.values():
                g.mul_(scale)
        return norm

    def step(self, x: Tensor, y: Tensor | None = None) -> dict[str, float]:
        metrics = super().step(x, y)
        extra = x.shape[0] * (self.layout.dp_size - 1)
        self.tokens += extra
        metrics["tokens"] = self.tokens
        dead = self._dead_local()
        stats = torch.tensor([metrics["loss"], metrics["fvu"], metrics["mse"]], dtype=torch.float64)
        stats = all_reduce(stats.to(self.device), self.layout.dp_group).cpu() / self.layout.dp_size
        metrics["loss"], metrics["fvu"], metrics["mse"] = (float(v) for v in stats)
        n_dead = all_reduce(dead.sum().reshape(1), self.layout.latent_group)
        metrics["dead_pct"] = 100.0 * float(n_dead.item()) / self.cfg.d_sae
        if "tokens_per_s" in metrics:
            metrics["tokens_per_s"] *= self.layout.dp_size
        return metrics

    @torch.no_grad()
    def _after_update(self, out) -> None:
        cfg, sae, layout = self.cfg, self.scaled_sae, self.layout
        if cfg.decoder_normalized:
            sae.W_dec.div_(sae.W_dec.norm(dim=-1, keepdim=True).clamp(min=1e-8))
        if cfg.architecture == "jumprelu":
            sae.threshold.clamp_(min=0.0)
        n_local = self.since_fired.shape[0]
        if getattr(out, "local", None) is not None:  # from sharded_loss: this slab's winners
            values, indices = out.local
            fired = indices[values > 0]
            counts = torch.bincount(fired.reshape(-1), minlength=n_local)
        elif out.values is not None:
            fired = out.indices[out.values > 0]
            counts = torch.bincount(fired.reshape(-1), minlength=n_local)
        else:  # dense codes: one process counts a latent once per batch
            counts = (out.codes > 0).any(0).long()
        counts = all_reduce(counts, layout.dp_group)
        if out.values is None:
            counts.clamp_(max=1)
        if cfg.architecture in ("batchtopk", "matryoshka_batchtopk") and sae.training:
            codes = out.values if out.values is not None else out.codes
            positive = codes[codes > 0]
            smallest = (
                positive.min().double()
                if positive.numel()
                else codes.new_tensor(float("inf"), dtype=torch.float64)
            )
            smallest = all_reduce(smallest.reshape(1), layout.dp_group, "min")[0]
            if torch.isfinite(smallest):
                sae.threshold_step(smallest, self._threshold_rate())
        B = out.recon.shape[0] * layout.dp_size
        if self.adaptive_sparsity:  # relu, gated, jumprelu: data-parallel only, full codes
            active = (out.codes > 0).sum().double().reshape(1)
            self._adapt_sparsity(float(all_reduce(active, layout.dp_group)[0]) / B)
        self.since_fired += B
        self.since_fired[counts > 0] = 0
        self.fire_counts += counts
        self.counted_tokens += B


def slab_of(full: SAE, offset: int, count: int) -> SAE:
    """A standalone SAE holding latents ``[offset, offset + count)`` of ``full``."""
    cfg = full.cfg
    k = cfg.k
    if k is not None:
        k = min(k, count) if cfg.architecture == "topk" else min(float(k), count)
    local = SAE.from_config(dataclasses.replace(cfg, d_sae=count, k=k, matryoshka_widths=[]))
    sl = slice(offset, offset + count)
    with torch.no_grad():
        for name, t in full.state_dict().items():
            local.state_dict()[name].copy_(slab_tensor(name, t, sl))
    return local


#: Per-latent tensors, sliced along dim 0 (``W_enc`` along dim 1); everything else is replicated.
LATENT_ROWS = ("b_enc", "W_dec", "threshold", "b_gate", "b_mag", "r_mag")


def slab_tensor(name: str, t: Tensor, sl: slice) -> Tensor:
    """The slab ``sl`` of state tensor ``name`` (the whole tensor if it is replicated)."""
    if name == "W_enc":
        return t[:, sl]
    if name in LATENT_ROWS:
        return t[sl]
    return t
