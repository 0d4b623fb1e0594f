"""``TrainConfig``: every training option, validated before any model or data is touched.

The CLI (``python -m fastsae.train``) generates one ``--flag`` per field from this dataclass, so
``--help`` documents each field with its default. Named presets (:data:`PRESETS`) are partial
configs applied before the flags.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fastsae.config import ARCHITECTURES, TOPK_FAMILY
from fastsae.ops import BACKENDS, ENCODE_STRATEGIES

__all__ = ["PRESETS", "TrainConfig", "default_lr", "load_config_file"]

#: Values of ``TrainConfig.parallel`` (fastsae/parallel).
PARALLEL_MODES = ("none", "dp", "latent", "dp,latent")

#: Learning rate at 2^14 latents and d_in = 512 (``LR_REF_D_IN``), for every architecture; the
#: default scales as 1 / sqrt(d_sae / 2^14) (Gao et al. 2024) and as 1 / sqrt(d_in / 512). 3x the
#: 4e-4 it was: on inputs normalised to E||x|| = sqrt(d_in) the top-k family reached a given held-out
#: FVU in 2-2.5x fewer steps and ended lower at 200 and 1000 steps, and relu, gated and jumprelu
#: (with their L0 controls) ended lower too (MiniLM-L6 and the embedded model, d_sae 2048, B 1024:
#: docs/training.md, "Learning rate").
BASE_LR = 1.2e-3
#: The d_in at which the default rate is BASE_LR / sqrt(d_sae / 2^14). An encoder row has d_in
#: entries of typical size 1 / sqrt(d_in) (unit-norm decoder rows, the encoder tied at start), and
#: Adam moves each entry by about the rate per step, so the rate that moves a row by a fixed
#: fraction per step scales as 1 / sqrt(d_in). Measured: the embedded model (d 128) reached a
#: target FVU in 28% fewer steps at 2x the d-independent rate, MiniLM-L6 (d 384) was best near 1x
#: (docs/training.md, "Learning rate").
LR_REF_D_IN = 512


#: Parameter dtypes a run accepts (float16/bfloat16 need a CUDA device: see ``run``).
TRAIN_DTYPES = ("float32", "float64", "float16", "bfloat16")
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def default_lr(d_sae: int, architecture: str = "topk", *, d_in: int) -> float:
    """The default Adam learning rate, ``BASE_LR / sqrt((d_sae / 2^14) * (d_in / 512))``; the
    same for every ``architecture`` (checked to be one, so that a typo is not silently served)."""
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"architecture={architecture!r} is unknown; allowed: {', '.join(ARCHITECTURES)}"
        )
    return BASE_LR / math.sqrt(d_sae / 2**14 * d_in / LR_REF_D_IN)


@dataclass
class TrainConfig:
    """Training configuration: the SAE, its data, the optimizer and the run."""

    # -- the SAE ---------------------------------------------------------------------------------
    architecture: str = "topk"
    """SAE architecture: topk, batchtopk, matryoshka_batchtopk, jumprelu, relu or gated."""
    d_sae: int = 4096
    """Number of latents."""
    k: float | None = 32
    """Active latents per token (topk: exact; batchtopk/matryoshka: batch average)."""
    target_l0: float | None = None
    """Active latents per token to aim for. Top-k family: sets k. relu, gated, jumprelu: the L1/L0
    coefficient left at None is adapted every step so that L0 tracks it. None: k (or 32)."""
    d_in: int | None = None
    """Input width; None: taken from the hook's activations."""
    d_out: int | None = None
    """Output width for transcoders; None: d_in, or the output hook's width."""
    skip_connection: bool = False
    """Add a linear skip W_skip (skip-transcoders)."""
    matryoshka_widths: list[int] = field(default_factory=list)
    """Nested prefix widths for matryoshka_batchtopk."""
    jumprelu_bandwidth: float = 0.05
    """Rectangle-kernel bandwidth of the JumpReLU straight-through estimator (inputs are scaled
    to E||x|| = sqrt(d_in), so pre-activations are O(1))."""
    jumprelu_init_threshold: float | None = None
    """Initial JumpReLU threshold; None: set from the first batch so that each latent fires on
    target_l0 / d_sae of its tokens."""
    normalize_decoder: bool | None = None
    """Keep decoder rows at unit norm and remove the gradient component parallel to them.
    None: on for the top-k family and gated, off for relu and jumprelu (relu's L1 is weighted by
    the decoder norms; jumprelu's L0 does not see them). Gated's auxiliary loss decodes through
    the detached decoder, so with free rows its L1 was lowered by shrinking them while L0 stayed
    above target and the coefficient wound up (see docs/training.md)."""
    init_b_dec: Literal["geometric_median", "mean", "zeros"] = "geometric_median"
    """How b_dec is initialised from the first batch (SAEs only; transcoders start at zero)."""
    init_encoder_scale: float | None = None
    """W_enc starts as this times W_dec.T (unit-norm decoder rows). None: the least-squares scale
    on the first batch, the one whose initial reconstruction best fits it (the codes of every
    architecture scale linearly with it; W_enc = W_dec.T itself overshoots, ~0.3 fits)."""
    normalize_activations: bool = True
    """Scale inputs so that E||x|| = sqrt(d_in), estimated up front; folded into the saved weights."""

    # -- losses ----------------------------------------------------------------------------------
    aux_coeff: float = 1 / 32
    """AuxK coefficient (top-k family)."""
    k_aux: int | None = None
    """Dead latents used by AuxK per token, in [1, d_sae]; None: d_out // 2."""
    dead_tokens: int | None = None
    """A latent that has not fired for this many tokens counts as dead. None: 5 percent of the run
    (total_tokens / 20), at most 10M (OpenAI's and sparsify's value for long runs), and at least
    100 * d_sae / k tokens (100 times the mean gap between firings)."""
    l1_coeff: float | None = None
    """L1 coefficient (relu, gated). None: adapted toward target_l0 (see sparsity_adapt_rate)."""
    l0_coeff: float | None = None
    """L0 coefficient (jumprelu). None: adapted toward target_l0 (see sparsity_adapt_rate), and
    the thresholds are scaled after each step by ((L0 + 1) / (target_l0 + 1)) ** 0.05, which
    can also lower them (the penalty only raises them)."""
    sparsity_adapt_rate: float | None = None
    """Gain of the L1/L0 coefficient controller: after each step, coeff *= ((L0 + 1) /
    (target_l0 + 1)) ** rate (L0 of that batch), so the coefficient rises while L0 is above
    target and falls below. None: max(0.03, 20 / total_steps), a time constant of at most 5
    percent of the run (as the BatchTopK threshold's EMA)."""
    sparsity_warmup_steps: int = 0
    """Linear warm-up of the L1/L0 coefficient from 0."""
    topk_threshold_lr: float = 0.01
    """EMA rate of the BatchTopK inference threshold (at least 20 / total_steps, so the EMA's window
    stays under 5 percent of the run; a running mean until the window fills)."""

    # -- optimizer ---------------------------------------------------------------------------------
    lr: float | None = None
    """Adam learning rate; None: 1.2e-3 / sqrt((d_sae / 2^14) * (d_in / 512)), every
    architecture."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.999
    """Adam beta2."""
    warmup_steps: int | None = None
    """Linear learning-rate warm-up, in steps; never longer than the run (a longer value is cut to
    the run, with a warning). None: 1 percent of the run's steps."""
    decay_start: float = 0.8
    """Fraction of training after which the learning rate decays linearly to 0."""
    ema_gamma: float | None = 15.0
    """Average the weights over the run with the power-function EMA of Karras et al. (2024,
    "Analyzing and Improving the Training Dynamics of Diffusion Models", eq. 3): after step t,
    ``avg += (1 - (1 - 1/t) ** (ema_gamma + 1)) * (w - avg)``, an average over roughly the last
    ``1 / (ema_gamma + 1)`` of the steps so far, so it suits a run of any length. The SAE a run
    gives (``trainer.sae``, ``inference_sae``, saved SAEs, evaluations) is the average; training
    itself steps the raw weights. None: no average, and one copy of the weights less
    (docs/training.md, "Weight averaging")."""
    grad_clip: float | None = None
    """Clip the global gradient norm to this value; None: no clipping."""
    optimizer_in_backward: bool | None = None
    """Step Adam on each parameter as soon as its gradient is ready and free that gradient, so the
    gradients of W_enc and W_dec never coexist (saves one d_sae x d matrix). None: on when the
    run would not fit the device otherwise. Incompatible with grad_clip."""
    autocast: Literal["auto", "fp32", "none", "bf16"] = "auto"
    """Mixed precision for the SAE forward/backward: auto (bf16 where it was measured faster at
    fp32 quality: the torch backend's TopK step on CPUs with AVX512-BF16/AMX; fp32 elsewhere, see
    fastsae/train/precision.py), bf16, or fp32 (= none: no autocast). The choice is logged and
    recorded in the SAE's metadata ("precision")."""
    keep_freed_memory: bool = True
    """CPU runs on Linux (glibc): keep the large blocks a step frees (gradients, temporaries) for
    the next step instead of returning them to the system and faulting them in again, page by
    page, every step (fastsae.ops.keep_freed_memory). Process-wide: the process keeps memory it
    has freed. False: glibc's defaults."""

    # -- data --------------------------------------------------------------------------------------
    model: str = "embedded"
    """Model: 'embedded' (the tiny model shipped with fastsae), a TransformerLens model name, or a
    HF model path."""
    hook: str = "blocks.1.hook_resid_post"
    """Hook (TransformerLens) or module path (HF) whose activations the SAE reads."""
    hook_out: str | None = None
    """Output hook for transcoders."""
    dataset: str | None = None
    """Text: None for the embedded corpus, a local file, or a HF dataset name."""
    cache_dir: str | None = None
    """Read activations from a fastsae activation cache instead of running the model."""
    context_size: int = 128
    """Tokens per sequence."""
    buffer_tokens: int = 65536
    """Tokens held in the shuffler's mixing buffer."""
    model_batch_size: int = 32
    """Sequences per model forward pass."""

    # -- the run -----------------------------------------------------------------------------------
    total_tokens: int = 2_000_000
    """Training tokens."""
    batch_size: int = 4096
    """Tokens per optimizer step."""
    seed: int = 0
    """Seed for the SAE initialisation and the data order."""
    backend: str = "auto"
    """fastsae.ops backend: auto, triton, torch or reference."""
    encode_strategy: str = "auto"
    """Encoder top-k selection on the triton backend: auto (timed per shape on a GPU, cached),
    fused, slab or torch (see docs/kernels.md). auto also defers to FASTSAE_ENCODE_STRATEGY."""
    device: str = "auto"
    """cpu, cuda, cuda:N, or auto."""
    dtype: str = "float32"
    """Parameter dtype: float32 or float64; float16 and bfloat16 need a CUDA device."""
    out_dir: str | None = None
    """Where checkpoints, metrics.jsonl, plots and the final SAE go; None: runs/<date-time>. An
    existing directory with checkpoints is refused unless resuming; a run holds a lock on it, so
    a second run into it is refused."""
    eval_every: int = 0
    """Evaluate every N steps on held-out tokens (0: only at the end)."""
    eval_tokens: int = 16384
    """Held-out tokens per evaluation."""
    checkpoint_every_tokens: int = 0
    """Write a checkpoint every N tokens (0: only at the end and on SIGINT/SIGTERM)."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk (oldest removed first)."""
    log_every: int = 10
    """Write a metrics.jsonl line every N steps."""
    wandb: bool = False
    """Log to Weights & Biases (only if the wandb package is installed)."""
    progress: bool = True
    """Show a tqdm progress bar."""
    parallel: str = "none"
    """Multi-process training under torchrun: none, dp (data parallel), latent (latents sharded
    across ranks) or dp,latent (a 2-D mesh); see docs/distributed.md."""
    latent_parallel: int = 0
    """Ranks per latent group for parallel=dp,latent; 0: the largest divisor of the world size
    that is <= its square root."""
    group_gemm: bool = False
    """Sweeps only (a group of SAEs on one stream): the TopK/BatchTopK members of one hook and
    input scale compute their pre-activations in one stacked GEMM per step instead of one each
    (torch backend, no autocast, no skip connection). Off (the default), every member is
    bit-identical to its solo run; on, the scores differ from a solo run's by rounding, which can
    flip near-ties in the selection, so members are close to but not bit-identical with solo
    runs. See docs/training.md "Sweeps"."""

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"architecture={self.architecture!r} is unknown; allowed: {', '.join(ARCHITECTURES)}"
            )
        if self.d_sae < 1:
            raise ValueError(f"d_sae={self.d_sae} must be >= 1")
        if self.architecture == "topk" and isinstance(self.k, float) and self.k.is_integer():
            self.k = int(self.k)  # "--k 32" arrives as 32.0
        if self.architecture in TOPK_FAMILY:
            if self.k is None or not 0 < self.k <= self.d_sae:
                raise ValueError(f"k={self.k} must be in [1, d_sae={self.d_sae}]")
            if self.architecture == "topk" and float(self.k) != int(self.k):
                raise ValueError(f"k={self.k} must be an integer for architecture='topk'")
        for name in ("batch_size", "total_tokens", "context_size", "model_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if 2 * self.batch_size > self.buffer_tokens:
            raise ValueError(
                f"batch_size={self.batch_size} must be <= buffer_tokens / 2 = "
                f"{self.buffer_tokens // 2} (the shuffler mixes each batch from its buffer)"
            )
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r} is unknown; allowed: {', '.join(BACKENDS)}")
        if self.encode_strategy not in ENCODE_STRATEGIES:
            raise ValueError(
                f"encode_strategy={self.encode_strategy!r} is unknown; allowed: "
                f"{', '.join(ENCODE_STRATEGIES)}"
            )
        if self.autocast not in ("auto", "fp32", "none", "bf16"):
            raise ValueError(f"autocast={self.autocast!r}; allowed: auto, fp32, none, bf16")
        if self.init_b_dec not in ("geometric_median", "mean", "zeros"):
            raise ValueError(
                f"init_b_dec={self.init_b_dec!r}; allowed: geometric_median, mean, zeros"
            )
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be > 0")
        if not 0 <= self.decay_start <= 1:
            raise ValueError(f"decay_start={self.decay_start} must be in [0, 1]")
        if self.ema_gamma is not None and not (
            isinstance(self.ema_gamma, (int, float))
            and not isinstance(self.ema_gamma, bool)
            and 0 <= self.ema_gamma < math.inf
        ):
            raise ValueError(f"ema_gamma={self.ema_gamma!r} must be None or a finite number >= 0")
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints={self.keep_checkpoints} must be >= 1")
        if self.optimizer_in_backward and self.grad_clip is not None:
            raise ValueError(
                "grad_clip needs every gradient at once; it cannot be combined with "
                "optimizer_in_backward=True"
            )
        if self.parallel not in PARALLEL_MODES:
            raise ValueError(
                f"parallel={self.parallel!r} is unknown; allowed: {', '.join(PARALLEL_MODES)}"
            )
        if self.latent_parallel < 0:
            raise ValueError(f"latent_parallel={self.latent_parallel} must be >= 0")
        if self.d_in is not None and self.d_in < 1:
            raise ValueError(f"d_in={self.d_in} must be >= 1")
        self._check_ranges()
        self._validate_recipe()

    def _check_ranges(self) -> None:
        """Counts, cadences and coefficients: each in its allowed range, named when it is not."""
        for name in ("log_every", "eval_tokens", "dead_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} must be >= 1")
        for name in (
            "warmup_steps",
            "sparsity_warmup_steps",
            "eval_every",
            "checkpoint_every_tokens",
            "aux_coeff",
            "l1_coeff",
            "l0_coeff",
        ):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name}={value} must be >= 0")
        if self.k_aux is not None and not 1 <= self.k_aux <= self.d_sae:
            raise ValueError(f"k_aux={self.k_aux} must be in [1, d_sae={self.d_sae}] (or None)")
        if self.total_tokens < self.batch_size:
            raise ValueError(
                f"total_tokens={self.total_tokens} must be >= batch_size={self.batch_size} "
                "(at least one optimizer step)"
            )
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1)")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip={self.grad_clip} must be > 0 (or None)")
        if not 0 < self.topk_threshold_lr <= 1:
            raise ValueError(f"topk_threshold_lr={self.topk_threshold_lr} must be in (0, 1]")
        if self.dtype not in TRAIN_DTYPES:
            raise ValueError(
                f"dtype={self.dtype!r} is not supported; allowed: {', '.join(TRAIN_DTYPES)}"
            )
        if not _DEVICE.fullmatch(self.device):
            raise ValueError(f"device={self.device!r} is unknown; allowed: auto, cpu, cuda, cuda:N")

    def _validate_recipe(self) -> None:
        """target_l0 (which sets k for the top-k family) and the sparsity controller."""
        if self.target_l0 is not None:
            if not 0 < self.target_l0 <= self.d_sae:
                raise ValueError(f"target_l0={self.target_l0} must be in (0, d_sae={self.d_sae}]")
            if self.architecture in TOPK_FAMILY:
                self.k = int(self.target_l0) if self.architecture == "topk" else self.target_l0
                if self.architecture == "topk" and self.k < 1:
                    raise ValueError(f"target_l0={self.target_l0} must be >= 1 for topk")
        if self.sparsity_adapt_rate is not None and not 0 <= self.sparsity_adapt_rate <= 1:
            raise ValueError(f"sparsity_adapt_rate={self.sparsity_adapt_rate} must be in [0, 1]")

    # -- derived -----------------------------------------------------------------------------------

    def lr_for(self, d_in: int | None = None) -> float:
        """``lr``, or :func:`default_lr` for inputs of width ``d_in`` (default: ``self.d_in``)."""
        if self.lr is not None:
            return self.lr
        d_in = d_in or self.d_in
        if d_in is None:
            raise ValueError("the default learning rate depends on d_in: set d_in or lr")
        return default_lr(self.d_sae, self.architecture, d_in=d_in)

    @property
    def total_steps(self) -> int:
        return max(1, self.total_tokens // self.batch_size)

    @property
    def l0_target(self) -> float:
        """target_l0, else k, else 32."""
        if self.target_l0 is not None:
            return float(self.target_l0)
        return float(self.k) if self.k is not None else 32.0

    @property
    def sparsity_rate(self) -> float:
        """sparsity_adapt_rate, or the default tied to the run's length (see the field)."""
        if self.sparsity_adapt_rate is not None:
            return self.sparsity_adapt_rate
        return min(1.0, max(0.03, 20.0 / self.total_steps))

    @property
    def warmup(self) -> int:
        """Warm-up steps actually used: warmup_steps (None: 1 percent of the run), cut to the run."""
        steps = self.warmup_steps if self.warmup_steps is not None else self.total_steps // 100
        return min(steps, self.total_steps)

    @property
    def dead_after_tokens(self) -> int:
        """dead_tokens, or the default proportional to the run (see the field)."""
        if self.dead_tokens is not None:
            return self.dead_tokens
        floor = math.ceil(100 * self.d_sae / self.l0_target)
        return max(floor, min(10_000_000, self.total_tokens // 20))

    @property
    def decoder_normalized(self) -> bool:
        if self.normalize_decoder is not None:
            return self.normalize_decoder
        return self.architecture in (*TOPK_FAMILY, "gated")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        extra = sorted(set(data) - names)
        if extra:
            raise ValueError(f"unknown TrainConfig fields: {', '.join(extra)}")
        return cls(**data)


#: Named presets: partial configs applied before command-line flags.
PRESETS: dict[str, dict[str, Any]] = {
    # The defaults: a TopK SAE on the embedded model and corpus, minutes on two CPU cores.
    "tiny-cpu": {},
    # Gemma-2-2B residual stream, 16k latents (needs a GPU and the model weights).
    "gemma2-2b-16k": {
        "architecture": "topk",
        "model": "gemma-2-2b",
        "hook": "blocks.12.hook_resid_post",
        "d_sae": 16384,
        "k": 64,
        "batch_size": 4096,
        "total_tokens": 500_000_000,
        "context_size": 1024,
        "buffer_tokens": 2**20,
        "model_batch_size": 8,
        "autocast": "bf16",
        "checkpoint_every_tokens": 50_000_000,
        "eval_every": 5000,
    },
    # Very wide: 2^20 latents at d_in=2304 (see docs/training.md for the memory arithmetic).
    "gemma2-2b-1m": {
        "architecture": "topk",
        "model": "gemma-2-2b",
        "hook": "blocks.12.hook_resid_post",
        "d_sae": 2**20,
        "k": 64,
        "batch_size": 8192,
        "total_tokens": 2_000_000_000,
        "context_size": 1024,
        "buffer_tokens": 2**21,
        "model_batch_size": 8,
        "autocast": "bf16",
        "dtype": "float32",
        "checkpoint_every_tokens": 100_000_000,
    },
}


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON or YAML config file into a dict (validated later by :class:`TrainConfig`)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist or is not a file")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"{path} is not valid YAML: {e}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of TrainConfig fields")
    return data
