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
EMA / JumpReLU threshold clamp, the L1/L0 coefficient controller (and the JumpReLU threshold
controller) toward ``target_l0``, and the firing statistics.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
import warnings
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
from fastsae.train.memory import PLAN_SHARE, MemoryEstimate, available_bytes, estimate
from fastsae.train.precision import resolve_precision

__all__ = ["NonFiniteLossError", "Trainer", "geometric_median", "resolve_device"]

#: Where the adapted L1/L0 coefficient starts (inputs scaled to E||x|| = sqrt(d_in)); the firing
#: rates start at the target (:meth:`Trainer._init_firing_rate`), so this only sets how hard the
#: penalty pushes until the controller has settled.
SPARSITY_COEFF_START = {"relu": 0.1, "gated": 0.1, "jumprelu": 0.01}


#: Gain of the JumpReLU threshold controller: after each step (adaptive L0 coefficient only) every
#: threshold is multiplied by ((L0 + 1) / (target_l0 + 1)) ** THRESHOLD_GAIN, L0 that batch's. The
#: coefficient alone cannot hold L0 from below: it is >= 0, so the penalty only raises thresholds,
#: while the reconstruction by itself lowers L0 (penalty off, 200 steps, target 32: 46.6 -> 21.2
#: on the embedded model as latents died, 44 -> 26 on MiniLM with none dead). A threshold acts on
#: the next batch's L0 directly, with no optimizer in between, so this is an integral controller
#: on a static plant: it converges without overshoot while THRESHOLD_GAIN * |d log L0 / d log
#: threshold| < 1. That slope is (t / sigma)^2 + 1 for a Gaussian tail cut at t sigmas: 5.6 at a
#: firing rate of 32 / 2048, 9.5 at 32 / 16384, ~16 at 8 / 131072 (still < 2, so still stable);
#: heavier tails than Gaussian have smaller slopes. 0.05 settles in ~5-10 steps.
THRESHOLD_GAIN = 0.05


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
    """Owns the SAE, its Adam optimizer and the training statistics. See the module docstring.

    Two views of the SAE: :attr:`sae` reads raw activations (eval mode, the input scaling folded
    in, what :meth:`save_sae` writes); :attr:`scaled_sae` is the module being trained, which reads
    activations multiplied by :attr:`in_scale` (so that ``E||x|| = sqrt(d_in)``).
    """

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
        #: reused CPU memory for the encoders' pre-activation slabs, so that a step does not
        #: page-fault a fresh ``[B, slab]`` matrix (fastsae/ops/_scratch.py); None off the CPU.
        #: Trainers that step in turn on one thread may share one (the group trainer does).
        on_cpu = self.device.type == "cpu"
        self.scratch_pool = ops.ScratchPool() if on_cpu else None
        if on_cpu and cfg.keep_freed_memory:
            ops.keep_freed_memory()
        #: the resolved ``cfg.autocast`` ("bf16" or "none") and why (fastsae/train/precision.py)
        self.precision = resolve_precision(cfg, self.device, d_in)
        #: peak learning rate: ``cfg.lr``, or the default for this d_in and d_sae
        self.learning_rate = cfg.lr_for(d_in)
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
            jumprelu_init_threshold=cfg.jumprelu_init_threshold or 0.0,
            matryoshka_widths=list(cfg.matryoshka_widths),
            hook_name=hook_name,
            hook_name_out=hook_name_out,
            model_name=model_name,
        )
        self.scaled_sae: SAE = self._build_sae(sae_cfg)
        self.scaled_sae.cfg.metadata["precision"] = self.precision._asdict()
        self.optimizer_in_backward = bool(cfg.optimizer_in_backward)
        #: gamma of the power-function weight average (``cfg.ema_gamma``; None: off)
        self.average_gamma = cfg.ema_gamma
        self._plan_memory(d_in, d_out)
        self._build_optimizers()
        self.step_count = 0
        self.tokens = 0
        self.initialized = False
        self.in_scale = torch.ones((), dtype=torch.float64)
        self.out_scale = torch.ones((), dtype=torch.float64)
        # sae.d_sae: a latent-sharded trainer (fastsae/parallel) tracks its own slab only.
        self.since_fired = torch.zeros(self.scaled_sae.d_sae, dtype=torch.long, device=self.device)
        self.fire_counts = torch.zeros(self.scaled_sae.d_sae, dtype=torch.long, device=self.device)
        self.counted_tokens = 0
        self._last_time: float | None = None
        # The L1/L0 coefficient: fixed when configured, else adapted toward target_l0.
        fixed = cfg.l0_coeff if cfg.architecture == "jumprelu" else cfg.l1_coeff
        self.adaptive_sparsity = cfg.architecture not in TOPK_FAMILY and fixed is None
        start = SPARSITY_COEFF_START.get(cfg.architecture, 0.0) if fixed is None else fixed
        self.sparsity_coeff = torch.tensor(float(start), dtype=torch.float64)
        if cfg.warmup_steps is not None and cfg.warmup_steps > cfg.total_steps:
            warnings.warn(
                f"warmup_steps={cfg.warmup_steps} is longer than the run ({cfg.total_steps} steps "
                f"= total_tokens / batch_size); the warm-up is cut to {cfg.total_steps} steps so "
                "the run reaches its peak learning rate",
                stacklevel=2,
            )
        self._warned_past_end = False
        #: the averaged parameters, in ``scaled_sae.parameters()`` order, as of step
        #: ``averaged_step``; None before the first step or without averaging
        self.averaged: list[Tensor] | None = None
        self.averaged_step = 0

    def _estimate(self, d_in: int, d_out: int, cfg: TrainConfig) -> MemoryEstimate:
        """Device memory of this trainer's share of a run of ``cfg`` (fastsae/parallel overrides
        it with one rank's share)."""
        return estimate(cfg, d_in, d_out, optimizer_in_backward=bool(cfg.optimizer_in_backward))

    def _plan_memory(self, d_in: int, d_out: int) -> None:
        """The two memory-dependent choices, against ``PLAN_SHARE`` (85%) of the device's free
        memory: ``optimizer_in_backward`` left at None turns on when the plain step would not fit
        (or when it makes room for the weight average), and the weight average is dropped, with a
        warning, when it would not fit even so (at 2^20 latents and d 2304 it is 18 GiB:
        docs/training.md, "Memory")."""
        cfg = self.cfg
        if cfg.optimizer_in_backward is not None and cfg.ema_gamma is None:
            return
        budget = PLAN_SHARE * available_bytes(self.device)
        auto_oib = cfg.optimizer_in_backward is None and cfg.grad_clip is None
        if cfg.optimizer_in_backward is None:
            plain = dataclasses.replace(cfg, ema_gamma=None, optimizer_in_backward=False)
            need = self._estimate(d_in, d_out, plain).device_total
            self.optimizer_in_backward = auto_oib and need > budget
        if cfg.ema_gamma is None:
            return
        mem = self._estimate(
            d_in, d_out, dataclasses.replace(cfg, optimizer_in_backward=self.optimizer_in_backward)
        )
        if mem.device_total <= budget:
            return
        if auto_oib and not self.optimizer_in_backward:
            lean = self._estimate(d_in, d_out, dataclasses.replace(cfg, optimizer_in_backward=True))
            if lean.device_total <= budget:  # bit-identical steps, and room for the average
                self.optimizer_in_backward = True
                return
        warnings.warn(
            f"the weight average (ema_gamma={cfg.ema_gamma}) needs "
            f"{mem.average / 2**30:.1f} GiB more than fits on {self.device} "
            f"({mem.describe()}; {PLAN_SHARE:.0%} of free memory is {budget / 2**30:.1f} GiB): "
            "training without it, so the raw weights are served; set ema_gamma=None to "
            "silence this",
            stacklevel=3,
        )
        self.average_gamma = None

    def _build_sae(self, sae_cfg: SAEConfig) -> SAE:
        """The SAE, seeded and on the device (fastsae/parallel overrides this to keep a slab)."""
        sae = SAE.from_config(sae_cfg)
        sae.reset_parameters(torch.Generator().manual_seed(self.cfg.seed))
        if self.cfg.init_encoder_scale is not None:
            with torch.no_grad():
                sae.W_enc.mul_(self.cfg.init_encoder_scale)
        return sae.to(self.device)

    def _build_optimizers(self) -> None:
        """One fused Adam over every parameter, or one per parameter stepped from a
        post-accumulate-grad hook (``optimizer_in_backward``)."""
        cfg = self.cfg
        kwargs = {
            "lr": self.learning_rate,
            "betas": (cfg.beta1, cfg.beta2),
            **_adam_impl(self.device),
        }
        params = list(self.scaled_sae.parameters())
        # W_enc is the [d_in, n] transpose view of a contiguous [n, d_in] buffer. Fused Adam copies
        # a non-contiguous parameter (and its grad and moments) to contiguous memory and back:
        # 460 ms against 80 ms per step at n=16384, d=768 (measured side by side). Adam is
        # elementwise, so it steps a contiguous *alias* of the same storage instead; its grad is
        # the (contiguous) transpose of W_enc's, attached before each step.
        self.adam_param = {
            p: torch.nn.Parameter(p.detach().T, requires_grad=False)
            if p.dim() == 2 and not p.is_contiguous() and p.T.is_contiguous()
            else p
            for p in params
        }
        if not self.optimizer_in_backward:
            groups = [
                {"params": [self.adam_param[p]], "lr_scale": self._lr_scale(p)} for p in params
            ]
            self.optimizers = [torch.optim.Adam(groups, **kwargs)]
            self.optimizer_of = {p: self.optimizers[0] for p in params}
            return
        self.optimizers = [
            torch.optim.Adam(
                [{"params": [self.adam_param[p]], "lr_scale": self._lr_scale(p)}], **kwargs
            )
            for p in params
        ]
        self.optimizer_of = dict(zip(params, self.optimizers, strict=True))
        for p in params:
            p.register_post_accumulate_grad_hook(self._step_in_backward)

    def _threshold_rate(self) -> float:
        """EMA rate of the BatchTopK threshold at this step (see :meth:`_after_update`)."""
        cfg = self.cfg
        return max(cfg.topk_threshold_lr, 20.0 / cfg.total_steps, 1.0 / (self.step_count + 1))

    def _lr_scale(self, p: Tensor) -> float:
        """Gated's ``r_mag`` is a log-scale: Adam moves it by ~lr per step, a relative change of
        lr in the magnitudes, while the shared W_enc entries (O(1/sqrt(d_in))) change by
        ~lr * sqrt(d_in) relative per step. At lr, r_mag could not follow W_enc as the gate's L1
        shrank it, and the magnitudes shrank with it (held-out FVU rose as the coefficient rose);
        it gets lr * sqrt(d_in). Every other parameter, the JumpReLU threshold included, gets lr
        (at lr * sqrt(d_in) the thresholds outran the controller and L0 fell to a quarter of the
        target on the embedded model)."""
        sae = self.scaled_sae
        if getattr(sae, "r_mag", None) is p:
            return math.sqrt(sae.d_in)
        return 1.0

    @torch.no_grad()
    def _step_in_backward(self, p: Tensor) -> None:
        if p is self.scaled_sae.W_dec and self.cfg.decoder_normalized:
            _remove_parallel_decoder_grad(self.scaled_sae)
        self._attach_alias_grads([p])
        self.optimizer_of[p].step()
        p.grad = None
        self.adam_param[p].grad = None

    def optimizer_state(self, p: Tensor) -> dict[str, Tensor]:
        """Adam's state of parameter ``p`` (moments in ``p``'s own shape, even where Adam steps a
        contiguous alias of a transposed ``p``): what checkpoints save."""
        alias = self.adam_param[p]
        state = {}
        for key, value in self.optimizer_of[p].state.get(alias, {}).items():
            if isinstance(value, Tensor):
                if alias is not p and value.shape == alias.shape:
                    value = value.T
                state[key] = value
        return state

    def set_optimizer_state(self, p: Tensor, key: str, value: Tensor) -> None:
        """Restore one entry of :meth:`optimizer_state`. Moments get the parameter's memory
        layout (fused Adam walks parameter and state storage in the same order)."""
        alias = self.adam_param[p]
        if value.shape == p.shape:
            value = torch.empty_like(p, dtype=value.dtype).copy_(value)
            if alias is not p:
                value = value.T  # the alias's contiguous layout
        # fused Adam keeps its step counters on the parameter's device
        self.optimizer_of[p].state.setdefault(alias, {})[key] = value.to(p.device)

    def _attach_alias_grads(self, params) -> None:
        for p in params:
            alias = self.adam_param[p]
            if alias is not p:
                alias.grad = None if p.grad is None else p.grad.T

    # -- initialisation ------------------------------------------------------------------------

    @torch.no_grad()
    def initialize(self, x: Tensor, y: Tensor | None = None, *, memo: dict | None = None) -> None:
        """Data-dependent initialisation from a sample: input-norm scales and ``b_dec``.

        ``memo``: a dict shared by trainers initialised on the same ``(x, y)`` (a group of SAEs,
        :mod:`fastsae.train.group`): the ``b_dec`` target (the geometric median: 100 Weiszfeld
        iterations over ``[4096, d_out]`` in float64) is a pure function of ``(y, out_scale)`` and
        is computed once per key; the result is bit-identical to computing it here.

        Raises:
            ValueError: the sample is empty, holds NaN or infinite values, or has a (near-)zero
                mean norm (an all-zero batch would give a scale of 1e12); the trainer is left
                untouched, so a good batch later initialises it normally.
        """
        cfg, sae = self.cfg, self.scaled_sae
        x = x.to(self.device, torch.float64)
        y = x if y is None else y.to(self.device, torch.float64)
        # checked before anything is assigned: a refused batch leaves the trainer untouched
        scales = [_init_scale(n, t, d) for n, t, d in (("x", x, sae.d_in), ("y", y, sae.d_out))]
        if cfg.normalize_activations:
            # SAELens's expected_average_only_in: E||x|| = sqrt(d) after scaling.
            self.in_scale, self.out_scale = (torch.tensor(s) for s in scales)
        target = y * self.out_scale.to(y.device)
        if cfg.init_b_dec in ("geometric_median", "mean"):
            memo = {} if memo is None else memo
            key = (cfg.init_b_dec, float(self.out_scale), tuple(target.shape))
            if key not in memo:
                memo[key] = (
                    geometric_median(target[:4096])
                    if cfg.init_b_dec == "geometric_median"
                    else target.mean(0)
                )
            sae.b_dec.copy_(memo[key].to(sae.dtype))
        xs = (x * self.in_scale.to(x.device)).to(sae.dtype)
        if cfg.architecture not in TOPK_FAMILY:
            self._init_firing_rate(xs)
        if cfg.init_encoder_scale is None and y is x and sae.W_skip is None:
            self._init_encoder_scale(xs[:4096])
        if self.adaptive_sparsity:
            ys = (target if y is not x else x * self.in_scale.to(x.device)).to(sae.dtype)
            start = self._balanced_sparsity_coeff(xs[:4096], ys[:4096])
            if start is not None:
                self.sparsity_coeff.fill_(start)
        self.initialized = True

    def _gate_parameter(self) -> Tensor:
        """The ``[d_sae]`` parameter that sets whether each latent fires: the JumpReLU threshold,
        the Gated gate bias, the ReLU encoder bias."""
        sae = self.scaled_sae
        if self.cfg.architecture == "jumprelu":
            return sae.threshold
        return sae.b_gate if self.cfg.architecture == "gated" else sae.b_enc

    def _balanced_sparsity_coeff(self, x: Tensor, y: Tensor) -> float | None:
        """The L1/L0 coefficient at which the sparsity penalty's gradient on the latents' gates
        cancels the reconstruction's, summed over latents, on the first batch: the coefficient
        under which the initial firing rate (the target) is a stationary point on average, so L0
        neither explodes nor collapses in the first steps while the controller settles. None when
        the two gradients do not oppose (the table's start is used)."""
        sae, gate = self.scaled_sae, self._gate_parameter()
        penalty = "l0" if self.cfg.architecture == "jumprelu" else "l1"
        coeffs = {"l0_coeff": 1.0} if penalty == "l0" else {"l1_coeff": 1.0}
        with torch.enable_grad(), ops.use_backend(self.cfg.backend):
            terms = sae.loss(x, y, **coeffs).terms
            rec = sum(v for k, v in terms.items() if k != penalty)
            (g_rec,) = torch.autograd.grad(rec, [gate], retain_graph=True)
            (g_pen,) = torch.autograd.grad(terms[penalty], [gate])
        num, den = float(g_rec.double().sum()), float(g_pen.double().sum())
        if not (num * den < 0 and math.isfinite(num / den)):
            return None
        return -num / den

    @torch.no_grad()
    def _init_encoder_scale(self, x: Tensor) -> None:
        """Scale W_enc (and the thresholds / biases that gate it) by the least-squares factor
        ``a = <x - b_dec, R> / ||R||^2``, R the initial reconstruction without b_dec: every
        architecture's codes scale by ``a`` (selection does not change), so the first steps start
        from the best-fitting magnitude instead of overshooting and killing latents."""
        a = self._fit_encoder_scale(self.scaled_sae, x)
        if a is None:
            return
        _scale_encoder(self.scaled_sae, a)
        self.init_scale_used = a

    def _fit_encoder_scale(self, sae: SAE, x: Tensor) -> float | None:
        """The least-squares factor of :meth:`_init_encoder_scale` for ``sae`` on ``x`` (None
        when the initial reconstruction is zero)."""
        with ops.use_backend(self.cfg.backend):
            recon = sae(x).recon.double() - sae.b_dec.double()
        target = x.double() - sae.b_dec.double()
        denom = float(recon.pow(2).sum())
        if denom <= 0:
            return None
        return min(max(float((target * recon).sum()) / denom, 1e-3), 1.0)

    @torch.no_grad()
    def _init_firing_rate(self, x: Tensor) -> None:
        """Start each latent of an L1/L0 SAE at the target firing rate: its gate (JumpReLU
        threshold, ReLU encoder bias, Gated gate bias) at the ``1 - target_l0 / d_sae`` quantile of
        its pre-activations on the first batch, so L0 starts at target_l0 instead of ~d_sae / 2."""
        cfg, sae = self.cfg, self.scaled_sae
        x = x[:4096]
        zero = torch.zeros_like(sae.W_enc[0])
        base = ops.pre_activations(x, sae.W_enc, zero, sae._encoder_input(x))
        q = 1.0 - min(1.0, cfg.l0_target / sae.d_sae)
        cut = torch.quantile(base.float(), q, dim=0).to(sae.dtype)
        if cfg.architecture == "jumprelu":
            if cfg.jumprelu_init_threshold is None:
                sae.b_enc.zero_()
                sae.threshold.copy_(cut.clamp(min=0.0))
            else:
                sae.threshold.fill_(cfg.jumprelu_init_threshold)
        elif cfg.architecture == "relu":
            sae.b_enc.copy_(-cut)
        elif cfg.architecture == "gated":
            sae.b_gate.copy_(-cut)

    # -- one step ----------------------------------------------------------------------------------

    def _coefficients(self) -> dict[str, Any]:
        cfg, arch = self.cfg, self.cfg.architecture
        warm = 1.0
        if cfg.sparsity_warmup_steps:
            warm = min(1.0, (self.step_count + 1) / cfg.sparsity_warmup_steps)
        if arch in TOPK_FAMILY:
            return {"aux_coeff": cfg.aux_coeff, "k_aux": cfg.k_aux}
        coeff = float(self.sparsity_coeff) * warm
        if arch == "jumprelu":
            return {"l0_coeff": coeff}
        return {"l1_coeff": coeff}

    def _loss(self, x: Tensor, y: Tensor | None, dead_mask: Tensor | None):
        """The step's loss (fastsae/parallel overrides this for latent-sharded SAEs)."""
        return self.scaled_sae.loss(x, y, dead_mask=dead_mask, **self._coefficients())

    def _reduce_gradients(self) -> None:
        """Called after backward, before the decoder projection, clipping and Adam: the
        data-parallel trainer (fastsae/parallel) all-reduces gradients here."""

    def _clip_gradients(self, max_norm: float) -> float:
        """Clip the global gradient norm to ``max_norm``; returns the norm before clipping
        (fastsae/parallel overrides this to sum the norms of latent slabs)."""
        return float(torch.nn.utils.clip_grad_norm_(self.scaled_sae.parameters(), max_norm))

    def lr_at(self, step: int) -> float:
        """Linear warm-up, constant, then linear decay to zero from ``decay_start``."""
        cfg = self.cfg
        lr = self.learning_rate
        warmup = cfg.warmup
        if warmup and step < warmup:
            return lr * (step + 1) / warmup
        total, start = cfg.total_steps, int(cfg.decay_start * cfg.total_steps)
        if step >= start and total > start:
            return lr * max(0.0, (total - step) / (total - start))
        return lr

    def _encode_strategy(self):
        """The configured encode strategy; ``auto`` leaves FASTSAE_ENCODE_STRATEGY in charge."""
        strategy = self.cfg.encode_strategy
        return contextlib.nullcontext() if strategy == "auto" else ops.use_encode_strategy(strategy)

    def scratch(self):
        """A context in which encodes reuse :attr:`scratch_pool` (a no-op off the CPU)."""
        if self.scratch_pool is None:
            return contextlib.nullcontext()
        return ops.scratch_memory(self.scratch_pool)

    def _autocast(self):
        if self.precision.autocast == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(self, x: Tensor, y: Tensor | None = None) -> dict[str, float]:
        """One optimizer step on ``x [B, d_in]`` (and target ``y [B, d_out]`` for transcoders).

        ``x`` and ``y`` must be floating-point tensors (any float dtype, any device; they are
        moved to the trainer's). The first step also initialises the scales and ``b_dec`` from
        its batch (see :meth:`initialize`).

        Raises:
            TypeError: ``x`` / ``y`` is not a tensor or not floating point (int, bool).
            ValueError: a wrong shape, or a first batch that cannot initialise the trainer.
            NonFiniteLossError: the loss is NaN or infinite (the weights are not updated).
        """
        sae = self.scaled_sae
        _check_batch("x", x, sae.d_in)
        if y is not None:
            _check_batch("y", y, sae.d_out)
            if y.shape[0] != x.shape[0]:
                raise ValueError(f"y has {y.shape[0]} rows, x has {x.shape[0]}")
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
        dtype = self.scaled_sae.dtype
        # copy=True: the in-place scale never writes into the caller's float64 tensor
        x = x.to(self.device, torch.float64, copy=True).mul_(self.in_scale.item()).to(dtype)
        if y is not None:
            y = y.to(self.device, torch.float64, copy=True).mul_(self.out_scale.item()).to(dtype)
        return x, y

    def step_normalized(self, x: Tensor, y: Tensor | None = None) -> dict[str, float]:
        """:meth:`step` on inputs already passed through :meth:`normalize` (after
        :meth:`initialize`)."""
        cfg, sae = self.cfg, self.scaled_sae
        dead = self.since_fired >= cfg.dead_after_tokens
        dead_mask = dead if bool(dead.any()) else None
        lr = self.lr_at(self.step_count)
        if self.step_count >= cfg.total_steps and not self._warned_past_end:
            warnings.warn(
                f"step {self.step_count + 1} is past the run's {cfg.total_steps} steps "
                f"(total_tokens={cfg.total_tokens}): the learning rate has decayed to "
                f"{lr:g}; set total_tokens to the tokens you will train on",
                stacklevel=2,
            )
            self._warned_past_end = True
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)

        # NVTX ranges (the nvtx package works without a GPU) name each phase in Nsight and in
        # profiling/profile_step.py's table.
        with nvtx.annotate("sae.forward+loss", color="green"):
            with (
                ops.use_backend(cfg.backend),
                self._encode_strategy(),
                self._autocast(),
                self.scratch(),
            ):
                result = self._loss(x, y, dead_mask)
            loss_value = result.loss.item()
        if not math.isfinite(loss_value):
            raise NonFiniteLossError(self.step_count + 1, loss_value)
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        for p in self.adam_param:
            p.grad = None
        with nvtx.annotate("sae.backward", color="red"), ops.use_backend(cfg.backend):
            result.loss.backward()  # with optimizer_in_backward, Adam steps happen in here
        self._reduce_gradients()
        grad_norm = None
        if not self.optimizer_in_backward:
            with nvtx.annotate("optimizer", color="yellow"):
                if cfg.decoder_normalized:
                    _remove_parallel_decoder_grad(sae)
                if cfg.grad_clip is not None:
                    grad_norm = self._clip_gradients(cfg.grad_clip)
                self._attach_alias_grads(self.adam_param)
                self.optimizers[0].step()
        with nvtx.annotate("bookkeeping", color="purple"):
            self._after_update(result.output)
        self.step_count += 1
        self.tokens += x.shape[0]
        if self.average_gamma is not None:
            with nvtx.annotate("weight average", color="purple"):
                self._update_average()
        return self._metrics(result, x if y is None else y, dead, grad_norm)

    @torch.no_grad()
    def _after_update(self, out) -> None:
        cfg, sae = self.cfg, self.scaled_sae
        if cfg.decoder_normalized:
            norms = torch.linalg.vector_norm(sae.W_dec, dim=-1, keepdim=True)
            sae.W_dec.div_(norms.clamp_(min=1e-8))
        if cfg.architecture == "jumprelu":
            sae.threshold.clamp_(min=0.0)
        if out.values is not None:
            fired = out.indices[out.values > 0]
        else:
            fired = (out.codes > 0).any(0).nonzero().squeeze(-1)
        if cfg.architecture in ("batchtopk", "matryoshka_batchtopk") and sae.training:
            # A running mean until the EMA's window (1 / lr steps) fills, then the EMA: it tracks
            # the threshold from the first steps instead of lagging behind its starting value.
            # The window is also kept under 5% of the run: at 200 steps a 100-step window still
            # averaged early, larger minima and eval-mode L0 came out 24 for k = 32 (MiniLM).
            sae.update_threshold(
                out.values if out.values is not None else out.codes, self._threshold_rate()
            )
        B = out.recon.shape[0]
        if self.adaptive_sparsity:
            codes = out.values if out.values is not None else out.codes
            self._adapt_sparsity(float((codes > 0).sum()) / B)
        self.since_fired += B
        self.since_fired[fired] = 0
        self.fire_counts.index_add_(0, fired.reshape(-1), torch.ones_like(fired.reshape(-1)))
        self.counted_tokens += B

    @torch.no_grad()
    def _update_average(self) -> None:
        """Fold the weights into the average after step ``t = step_count``.

        The power-function EMA (Karras et al. 2024, eq. 3) is ``avg_t = beta_t avg_{t-1} +
        (1 - beta_t) w_t`` with ``beta_t = (1 - 1/t) ** (gamma + 1)``. The product of the betas
        of steps ``s + 1 .. t`` telescopes to ``(s / t) ** (gamma + 1)``, so the average can skip
        steps: folding in ``w_t`` at step ``t`` with weight ``1 - (s / t) ** (gamma + 1)``, ``s``
        the last folded step, is exact when the weights did not move in between and close when
        they moved little. It folds every ``t / (16 (gamma + 1))`` steps (every step early on):
        16 samples per window (about ``t / (gamma + 1)`` steps), so a long run pays for one
        ``lerp`` over the parameters every few dozen steps instead of every step. The served
        weights (:meth:`averaged_weights`) fold in the current step, so they are never stale.
        The first call copies the weights, as does the first after resuming from a checkpoint
        without an average. Averages of 16-bit weights are fp32."""
        params = [p.detach() for p in self.scaled_sae.parameters()]
        t = self.step_count
        if self.averaged is None:
            self.averaged = [p.to(_average_dtype(p.dtype), copy=True) for p in params]
            self.averaged_step = t
            return
        every = max(1, int(t // (AVERAGE_SAMPLES * (self.average_gamma + 1.0))))
        if t - self.averaged_step < every:
            return
        _lerp_all(self.averaged, params, self._fold_weight(t))
        self.averaged_step = t

    def _fold_weight(self, t: int) -> float:
        """The weight of ``w_t`` in the average when the last folded step was ``averaged_step``."""
        return 1.0 - (self.averaged_step / t) ** (self.average_gamma + 1.0)

    @torch.no_grad()
    def averaged_weights(self) -> list[Tensor] | None:
        """Copies of the weight average as of the current step (the stored average with the
        current weights folded in, in the parameters' dtypes), in ``scaled_sae.parameters()``
        order; None without averaging or before the first step."""
        if self.averaged is None or self.average_gamma is None:
            return None
        out = [p.detach().clone() for p in self.scaled_sae.parameters()]
        self._write_average(out)
        return out

    @torch.no_grad()
    def _write_average(self, raw: list[Tensor]) -> None:
        """Overwrite ``raw`` (copies of the current weights) with the average as of the current
        step, in place: no further copy of the parameters."""
        weight = self._fold_weight(self.step_count) if self.averaged_step < self.step_count else 0.0
        for r, avg in zip(raw, self.averaged, strict=True):
            # weight * w + (1 - weight) * avg, in r's dtype (fp32 averages of 16-bit weights)
            r.mul_(weight).add_(avg, alpha=1.0 - weight)

    @torch.no_grad()
    def _adapt_sparsity(self, l0: float) -> None:
        """The L1/L0 coefficient controller (relu, gated, jumprelu) and JumpReLU's threshold
        controller, from this step's L0 (over the whole batch: every data rank's rows)."""
        cfg = self.cfg
        # Multiplicative feedback: the coefficient moves by (L0 / target) ** rate per step, a
        # step of rate * log(L0 / target) in log space; (L0 + 1) keeps an all-zero batch finite.
        ratio = (l0 + 1.0) / (cfg.l0_target + 1.0)
        self.sparsity_coeff.mul_(ratio**cfg.sparsity_rate)
        if cfg.architecture == "jumprelu":
            self.scaled_sae.threshold.mul_(ratio**THRESHOLD_GAIN)  # see THRESHOLD_GAIN

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
        if self.adaptive_sparsity:
            metrics["sparsity_coeff"] = float(self.sparsity_coeff)
        if self._last_time is not None:
            metrics["tokens_per_s"] = target.shape[0] / max(now - self._last_time, 1e-9)
        self._last_time = now
        return metrics

    # -- outputs ------------------------------------------------------------------------------------

    def feature_density(self) -> Tensor:
        """Fraction of counted tokens on which each latent fired: ``[d_sae]``."""
        return self.fire_counts.double().cpu() / max(self.counted_tokens, 1)

    @property
    def sae(self) -> SAE:
        """The SAE in the activations' own units, in eval mode: ``trainer.sae.encode(x)`` on raw
        activations gives the codes the saved SAE gives. A read-only view, rebuilt after each
        step (editing it does not change training); the module being trained, which reads
        inputs multiplied by ``in_scale``, is :attr:`scaled_sae`."""
        key = (self.step_count, self.initialized)
        if getattr(self, "_view_key", None) != key:
            self._view = self.inference_sae()
            self._view_key = key
        return self._view

    @torch.no_grad()
    def inference_sae(self) -> SAE:
        """A copy of the SAE with the input/output scaling folded into its weights, in eval mode:
        it reads and writes activations in the model's own units. Its weights are the run's weight
        average (``cfg.ema_gamma``) when there is one, else the raw weights."""
        sae = copy.deepcopy(self.scaled_sae).eval()
        if self.averaged is not None and self.average_gamma is not None:
            self._write_average([p.detach() for p in sae.parameters()])
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


#: Average samples per window of the weight average (see ``Trainer._update_average``).
AVERAGE_SAMPLES = 16


def _lerp_all(averaged: list[Tensor], params: list[Tensor], weight: float) -> None:
    """``a += weight * (p - a)`` for every pair (fp32 averages of 16-bit weights included)."""
    if all(a.dtype == p.dtype for a, p in zip(averaged, params, strict=True)):
        torch._foreach_lerp_(averaged, params, weight)
    else:  # no full-size cast of the 16-bit weights
        for a, p in zip(averaged, params, strict=True):
            a.mul_(1.0 - weight).add_(p, alpha=weight)


def _average_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a weight average is kept in: fp32 for 16-bit weights (a bf16 average would round
    away the small per-step updates), else the weights' own."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _check_batch(name: str, t: Tensor, width: int) -> None:
    """Type and shape of a training batch (free: no data is read)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(
            f"{name} has dtype {t.dtype}; activations must be floating point (float32, "
            "bfloat16, float16 or float64)"
        )
    if t.ndim != 2 or t.shape[1] != width:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected [B, {width}]")
    if t.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(t.shape)}); B must be >= 1")


def _init_scale(name: str, t: Tensor, d: int) -> float:
    """``sqrt(d) / mean ||row||`` of the initialisation batch, refusing batches that would poison
    the trainer: empty, non-finite, or with a mean norm too small to divide by."""
    if t.shape[0] == 0:
        raise ValueError(f"the first batch is empty ({name} has shape {tuple(t.shape)})")
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).any(-1).sum())
        raise ValueError(
            f"the first batch holds NaN or infinite values ({name}: {bad} of {t.shape[0]} rows); "
            "it would set the input scale to NaN. Nothing was initialised"
        )
    mean_norm = float(t.norm(dim=-1).mean())
    if not math.isfinite(mean_norm):
        raise ValueError(
            f"the first batch is too large to scale ({name} mean row norm overflows float64). "
            "Nothing was initialised"
        )
    if not mean_norm > 1e-6 * math.sqrt(d):
        raise ValueError(
            f"the first batch is all (near) zero ({name} mean row norm {mean_norm:.3g}); it would "
            "set the input scale above 1e6. Nothing was initialised"
        )
    return math.sqrt(d) / mean_norm


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
    # Row-wise dots through a batched GEMV and an in-place addcmul: no [n, d] temporaries (the
    # two products and the sum they replace were ~4% of a step at n=8192, d=768).
    parallel = torch.einsum("nd,nd->n", grad, w).unsqueeze(-1)
    grad.addcmul_(parallel, w, value=-1.0)


@torch.no_grad()
def _scale_encoder(sae: SAE, a: float) -> None:
    """Multiply the encoder and what gates it (b_enc, threshold, b_gate) by ``a``."""
    sae.W_enc.mul_(a)
    for name in ("b_enc", "threshold", "b_gate"):
        t = getattr(sae, name, None)
        if t is not None:
            t.mul_(a)
