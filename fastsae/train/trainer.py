"""``Trainer``: one optimizer step at a time on activations you bring, or the whole run.

Drop-in use::

    from fastsae.train import Trainer, TrainConfig

    trainer = Trainer(TrainConfig(d_in=768, d_sae=16384, k=32))
    metrics = trainer.step(x)          # x: [B, 768]; one optimizer step; returns floats
    trainer.save_sae("my_sae")         # input scaling folded in; SAELens v6 files

What a step does (in order): data-dependent initialisation on the first batch (input-norm scale,
``b_dec`` at the geometric median), the loss with AuxK on latents dead for ``dead_tokens``,
backward through the sparse kernels, removal of the decoder-gradient component parallel to each
(unit-norm) decoder row, optional clipping, Adam, decoder renormalisation, the BatchTopK threshold
EMA / JumpReLU threshold clamp, and the firing statistics.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from pathlib import Path
from typing import Any

import nvtx
import torch
from torch import Tensor

from fastsae import ops
from fastsae import reference as ref
from fastsae.config import TOPK_FAMILY, SAEConfig
from fastsae.sae import SAE
from fastsae.train.config import TrainConfig

__all__ = ["NonFiniteLossError", "Trainer", "geometric_median", "resolve_device"]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the weights were not updated by that step."""

    def __init__(self, step: int, loss: float):
        super().__init__(
            f"loss is {loss} at step {step}; stopping (weights are from step {step - 1})"
        )
        self.step = step


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available; allowed here: cpu, auto")
    return device


@torch.no_grad()
def geometric_median(points: Tensor, iterations: int = 100, tol: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances to ``points [N, d]``."""
    points = points.double()
    median = points.mean(0)
    for _ in range(iterations):
        dist = (points - median).norm(dim=-1).clamp(min=1e-12)
        weights = 1.0 / dist
        new = (weights[:, None] * points).sum(0) / weights.sum()
        if (new - median).norm() <= tol * max(1.0, float(median.norm())):
            median = new
            break
        median = new
    return median


class Trainer:
    """Owns the SAE, its Adam optimizer and the training statistics. See the module docstring."""

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        d_in: int | None = None,
        d_out: int | None = None,
        hook_name: str | None = None,
        hook_name_out: str | None = None,
        model_name: str | None = None,
    ):
        self.cfg = cfg
        d_in = d_in or cfg.d_in
        if d_in is None:
            raise ValueError(
                "d_in is unknown: set TrainConfig.d_in, or train from a model or cache"
            )
        if cfg.d_in is not None and d_in != cfg.d_in:
            raise ValueError(f"d_in={cfg.d_in} does not match the activations' width {d_in}")
        d_out = d_out or cfg.d_out or d_in
        self.device = resolve_device(cfg.device)
        k = cfg.k if cfg.architecture in TOPK_FAMILY else None
        if cfg.architecture == "topk":
            k = int(k)
        sae_cfg = SAEConfig(
            architecture=cfg.architecture,
            d_in=d_in,
            d_sae=cfg.d_sae,
            d_out=d_out,
            k=k,
            skip_connection=cfg.skip_connection,
            dtype=cfg.dtype,
            jumprelu_bandwidth=cfg.jumprelu_bandwidth,
            jumprelu_init_threshold=cfg.jumprelu_init_threshold,
            matryoshka_widths=list(cfg.matryoshka_widths),
            hook_name=hook_name,
            hook_name_out=hook_name_out,
            model_name=model_name,
        )
        self.sae: SAE = SAE.from_config(sae_cfg)
        self.sae.reset_parameters(torch.Generator().manual_seed(cfg.seed))
        self.sae.to(self.device)
        self.optimizer_in_backward = bool(cfg.optimizer_in_backward)
        if cfg.optimizer_in_backward is None:
            from fastsae.train.memory import available_bytes, estimate

            need = estimate(cfg, d_in, d_out).device_total
            self.optimizer_in_backward = cfg.grad_clip is None and need > 0.85 * available_bytes(
                self.device
            )
        self._build_optimizers()
        self.step_count = 0
        self.tokens = 0
        self.initialized = False
        self.in_scale = torch.ones((), dtype=torch.float64)
        self.out_scale = torch.ones((), dtype=torch.float64)
        self.since_fired = torch.zeros(cfg.d_sae, dtype=torch.long, device=self.device)
        self.fire_counts = torch.zeros(cfg.d_sae, dtype=torch.long, device=self.device)
        self.counted_tokens = 0
        self._last_time: float | None = None

    def _build_optimizers(self) -> None:
        """One fused Adam over every parameter, or one per parameter stepped from a
        post-accumulate-grad hook (``optimizer_in_backward``)."""
        cfg = self.cfg
        kwargs = {
            "lr": cfg.learning_rate,
            "betas": (cfg.beta1, cfg.beta2),
            **_adam_impl(self.device),
        }
        params = list(self.sae.parameters())
        if not self.optimizer_in_backward:
            self.optimizers = [torch.optim.Adam(params, **kwargs)]
            self.optimizer_of = {p: self.optimizers[0] for p in params}
            return
        self.optimizers = [torch.optim.Adam([p], **kwargs) for p in params]
        self.optimizer_of = dict(zip(params, self.optimizers, strict=True))
        for p in params:
            p.register_post_accumulate_grad_hook(self._step_in_backward)

    @torch.no_grad()
    def _step_in_backward(self, p: Tensor) -> None:
        if p is self.sae.W_dec and self.cfg.decoder_normalized:
            _remove_parallel_decoder_grad(self.sae)
        self.optimizer_of[p].step()
        p.grad = None

    # -- initialisation ------------------------------------------------------------------------

    @torch.no_grad()
    def initialize(self, x: Tensor, y: Tensor | None = None) -> None:
        """Data-dependent initialisation from a sample: input-norm scales and ``b_dec``."""
        cfg, sae = self.cfg, self.sae
        x = x.to(self.device, torch.float64)
        y = x if y is None else y.to(self.device, torch.float64)
        if cfg.normalize_activations:
            # SAELens's expected_average_only_in: E||x|| = sqrt(d) after scaling.
            self.in_scale = torch.tensor(
                math.sqrt(sae.d_in) / float(x.norm(dim=-1).mean().clamp(min=1e-12))
            )
            self.out_scale = torch.tensor(
                math.sqrt(sae.d_out) / float(y.norm(dim=-1).mean().clamp(min=1e-12))
            )
        target = y * self.out_scale.to(y.device)
        if cfg.init_b_dec == "geometric_median":
            sae.b_dec.copy_(geometric_median(target[:4096]).to(sae.dtype))
        elif cfg.init_b_dec == "mean":
            sae.b_dec.copy_(target.mean(0).to(sae.dtype))
        self.initialized = True

    # -- one step ----------------------------------------------------------------------------------

    def _coefficients(self) -> dict[str, Any]:
        cfg, arch = self.cfg, self.cfg.architecture
        warm = 1.0
        if cfg.sparsity_warmup_steps:
            warm = min(1.0, (self.step_count + 1) / cfg.sparsity_warmup_steps)
        if arch in TOPK_FAMILY:
            return {"aux_coeff": cfg.aux_coeff, "k_aux": cfg.k_aux}
        if arch == "jumprelu":
            return {"l0_coeff": cfg.l0_coeff * warm}
        return {"l1_coeff": cfg.l1_coeff * warm}

    def lr_at(self, step: int) -> float:
        """Linear warm-up, constant, then linear decay to zero from ``decay_start``."""
        cfg = self.cfg
        lr = cfg.learning_rate
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return lr * (step + 1) / cfg.warmup_steps
        total, start = cfg.total_steps, int(cfg.decay_start * cfg.total_steps)
        if step >= start and total > start:
            return lr * max(0.0, (total - step) / (total - start))
        return lr

    def _autocast(self):
        if self.cfg.autocast == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(self, x: Tensor, y: Tensor | None = None) -> dict[str, float]:
        """One optimizer step on ``x [B, d_in]`` (and target ``y [B, d_out]`` for transcoders)."""
        sae = self.sae
        if x.ndim != 2 or x.shape[1] != sae.d_in:
            raise ValueError(f"x has shape {tuple(x.shape)}; expected [B, {sae.d_in}]")
        if sae.d_out != sae.d_in and y is None:
            raise ValueError(f"a transcoder (d_out={sae.d_out}) needs the target y")
        if not self.initialized:
            self.initialize(x, y)
        x, y = self.normalize(x, y)
        return self.step_normalized(x, y)

    def normalize(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """``x`` and ``y`` scaled by the input/output scales, on the device, in the SAE's dtype.

        A pure function of ``(x, in_scale, dtype)``: a group of SAEs on one hook shares it
        (:mod:`fastsae.train.group`)."""
        dtype = self.sae.dtype
        x = (x.to(self.device, torch.float64) * self.in_scale.item()).to(dtype)
        if y is not None:
            y = (y.to(self.device, torch.float64) * self.out_scale.item()).to(dtype)
        return x, y

    def step_normalized(self, x: Tensor, y: Tensor | None = None) -> dict[str, float]:
        """:meth:`step` on inputs already passed through :meth:`normalize` (after
        :meth:`initialize`)."""
        cfg, sae = self.cfg, self.sae
        dead = self.since_fired >= cfg.dead_tokens
        dead_mask = dead if bool(dead.any()) else None
        lr = self.lr_at(self.step_count)
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = lr

        # NVTX ranges (the nvtx package works without a GPU) name each phase in Nsight and in
        # profiling/profile_step.py's table.
        with nvtx.annotate("sae.forward+loss", color="green"):
            with ops.use_backend(cfg.backend), self._autocast():
                result = sae.loss(x, y, dead_mask=dead_mask, **self._coefficients())
            loss_value = result.loss.item()
        if not math.isfinite(loss_value):
            raise NonFiniteLossError(self.step_count + 1, loss_value)
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        with nvtx.annotate("sae.backward", color="red"), ops.use_backend(cfg.backend):
            result.loss.backward()  # with optimizer_in_backward, Adam steps happen in here
        grad_norm = None
        if not self.optimizer_in_backward:
            with nvtx.annotate("optimizer", color="yellow"):
                if cfg.decoder_normalized:
                    _remove_parallel_decoder_grad(sae)
                if cfg.grad_clip is not None:
                    grad_norm = float(
                        torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
                    )
                self.optimizers[0].step()
        with nvtx.annotate("bookkeeping", color="purple"):
            self._after_update(result.output)
        self.step_count += 1
        self.tokens += x.shape[0]
        return self._metrics(result, x if y is None else y, dead, grad_norm)

    @torch.no_grad()
    def _after_update(self, out) -> None:
        cfg, sae = self.cfg, self.sae
        if cfg.decoder_normalized:
            sae.W_dec.div_(sae.W_dec.norm(dim=-1, keepdim=True).clamp(min=1e-8))
        if cfg.architecture == "jumprelu":
            sae.threshold.clamp_(min=0.0)
        if out.values is not None:
            fired = out.indices[out.values > 0]
        else:
            fired = (out.codes > 0).any(0).nonzero().squeeze(-1)
        if cfg.architecture in ("batchtopk", "matryoshka_batchtopk") and sae.training:
            sae.update_threshold(
                out.values if out.values is not None else out.codes, cfg.topk_threshold_lr
            )
        B = out.recon.shape[0]
        self.since_fired += B
        self.since_fired[fired] = 0
        self.fire_counts.index_add_(0, fired.reshape(-1), torch.ones_like(fired.reshape(-1)))
        self.counted_tokens += B

    @torch.no_grad()
    def _metrics(
        self, result, target: Tensor, dead: Tensor, grad_norm: float | None
    ) -> dict[str, float]:
        now = time.perf_counter()
        out = result.output
        if out.values is not None:
            l0 = float((out.values > 0).sum(-1).float().mean())
        else:
            l0 = float((out.codes > 0).sum(-1).float().mean())
        metrics = {
            "step": self.step_count,
            "tokens": self.tokens,
            "loss": result.loss.item(),
            **{name: float(v) for name, v in result.terms.items()},
            "fvu": float(ref.fvu(out.recon.float(), target.float())),
            "l0": l0,
            "dead_pct": 100.0 * float(dead.float().mean()),
            "lr": self.optimizers[0].param_groups[0]["lr"],
        }
        if grad_norm is not None:
            metrics["grad_norm"] = grad_norm
        if self._last_time is not None:
            metrics["tokens_per_s"] = target.shape[0] / max(now - self._last_time, 1e-9)
        self._last_time = now
        return metrics

    # -- outputs ------------------------------------------------------------------------------------

    def feature_density(self) -> Tensor:
        """Fraction of counted tokens on which each latent fired: ``[d_sae]``."""
        return self.fire_counts.double().cpu() / max(self.counted_tokens, 1)

    @torch.no_grad()
    def inference_sae(self) -> SAE:
        """A copy of the SAE with the input/output scaling folded into its weights, in eval mode:
        it reads and writes activations in the model's own units."""
        sae = copy.deepcopy(self.sae).eval()
        s_in, s_out = float(self.in_scale), float(self.out_scale)
        # pre = (s_in x - b_dec) W + b  = (x - b_dec / s_in) (s_in W) + b  (b_dec lives in output
        # space; for an SAE s_in == s_out). recon_raw = recon / s_out.
        sae.W_enc.mul_(s_in)
        sae.W_dec.div_(s_out)
        sae.b_dec.div_(s_out)
        if sae.W_skip is not None:
            sae.W_skip.mul_(s_in / s_out)
        return sae

    def save_sae(self, path: str | Path) -> Path:
        """Write the inference SAE (scaling folded) with its ``sparsity.safetensors``."""
        sparsity = torch.log10(self.feature_density() + 1e-10).float()
        return self.inference_sae().save(path, sparsity=sparsity)


def _adam_impl(device: torch.device) -> dict[str, bool]:
    """``fused=True`` where PyTorch has a fused Adam for the device (CUDA, and CPU since 2.4),
    which reads and writes each parameter's state once; ``foreach`` otherwise."""
    return {"fused": True} if device.type in ("cuda", "cpu") else {"foreach": True}


@torch.no_grad()
def _remove_parallel_decoder_grad(sae: SAE) -> None:
    """Project out the gradient component along each unit decoder row, so that Adam moves rows
    along the sphere and the renormalisation after the step is a small correction."""
    grad = sae.W_dec.grad
    if grad is None:
        return
    w = sae.W_dec
    parallel = (grad * w).sum(-1, keepdim=True)
    grad.sub_(parallel * w)
