"""Checks a run makes before it loads the model: paths, ``--resume`` flags, device support and
memory. Each failure is one ``ValueError`` / ``MemoryError`` naming the problem.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from fastsae.train.config import TrainConfig
from fastsae.train.memory import PLAN_SHARE, MemoryEstimate, available_bytes, estimate

__all__ = [
    "RESUME_CHANGEABLE",
    "absolute_paths",
    "check_device_support",
    "check_memory",
    "check_resume_config",
    "peek_dims",
    "run_directory_of",
]

GiB = 2**30

#: Fields a resumed run may change: they change neither the SAE nor its data stream.
RESUME_CHANGEABLE = frozenset(
    {
        "total_tokens",
        "log_every",
        "eval_every",
        "checkpoint_every_tokens",
        "keep_checkpoints",
        "device",
        "backend",
        "optimizer_in_backward",
        "progress",
        "wandb",
        "out_dir",  # checked separately: a resumed run continues in its own directory
    }
)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with local ``model``, ``dataset`` and ``cache_dir`` paths made absolute, so that
    what the run records (config, checkpoints, the SAE's ``cfg.json``) works from any directory.
    Names that are not local paths (hub names, ``embedded``) are kept as given."""
    changes = {}
    for name in ("model", "dataset", "cache_dir"):
        value = getattr(cfg, name)
        if value is not None and value != "embedded" and Path(value).expanduser().exists():
            changes[name] = str(Path(value).expanduser().resolve())
    return dataclasses.replace(cfg, **changes) if changes else cfg


def run_directory_of(checkpoint: Path) -> Path:
    """The run directory a checkpoint belongs to: ``RUN`` for ``RUN/checkpoints/step-N``."""
    if checkpoint.parent.name != "checkpoints":
        raise ValueError(
            f"--resume {checkpoint}: a checkpoint must lie in RUN/checkpoints/ so that the run "
            "continues in RUN; pass the run directory"
        )
    return checkpoint.parent.parent


def check_resume_config(cfg: TrainConfig, saved: TrainConfig, run_dir: Path) -> TrainConfig:
    """Refuse settings that would change the SAE or its data on resume; return ``cfg`` with
    ``out_dir`` set to ``run_dir`` (a moved or copied run continues where it now lies)."""
    new, old = absolute_paths(cfg), absolute_paths(saved)
    changed = [
        f.name
        for f in dataclasses.fields(TrainConfig)
        if f.name not in RESUME_CHANGEABLE and getattr(new, f.name) != getattr(old, f.name)
    ]
    if changed:
        name = changed[0]
        allowed = ", ".join(_flag(n) for n in sorted(RESUME_CHANGEABLE - {"out_dir"}))
        raise ValueError(
            f"{_flag(name)} {getattr(new, name)!r} conflicts with the checkpoint's "
            f"{name}={getattr(old, name)!r}: a resumed run keeps its SAE and data (flags it may "
            f"change: {allowed})"
        )
    given = cfg.out_dir
    if given not in (None, saved.out_dir) and Path(given).resolve() != run_dir.resolve():
        raise ValueError(
            f"--out-dir {given}: a resumed run continues in its own directory {run_dir}; copy "
            "the run directory first to continue it elsewhere"
        )
    return dataclasses.replace(new, out_dir=str(run_dir))


def check_device_support(cfg: TrainConfig, device: torch.device) -> None:
    """Refuse dtype / backend / device combinations the kernels do not support."""
    if cfg.dtype in ("float16", "bfloat16") and device.type != "cuda":
        raise ValueError(
            f"dtype={cfg.dtype!r} parameters need a CUDA device (on {device} the kernels train "
            "float32 or float64 parameters); use --dtype float32"
        )
    if (
        cfg.backend == "triton"
        and device.type != "cuda"
        and os.environ.get("TRITON_INTERPRET") != "1"
    ):
        raise ValueError(
            f"backend='triton' needs a CUDA device, and device is {device} (set TRITON_INTERPRET=1 "
            "to run the kernels interpreted on the CPU); allowed here: auto, torch, reference"
        )


_MODEL_WIDTH_HOOKS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out",
                      "hook_mlp_out", "hook_embed", "hook_pos_embed")  # fmt: skip


def peek_dims(cfg: TrainConfig) -> tuple[int, int] | None:
    """``(d_in, d_out)`` when known without loading the model (explicit widths, or a
    residual/MLP hook of the embedded model); ``None`` otherwise. An explicit ``d_in`` that
    disagrees with the embedded model's hook is refused here."""
    if cfg.cache_dir is not None or cfg.model != "embedded":
        if cfg.d_in is not None and (cfg.hook_out is None or cfg.d_out is not None):
            return cfg.d_in, cfg.d_out or cfg.d_in
        return None
    from fastsae.demo.model import ASSETS, _read_config

    hooked = _read_config(ASSETS)["hooked_transformer"]

    def width(hook: str) -> int | None:
        if hook.endswith(_MODEL_WIDTH_HOOKS):
            return hooked["d_model"]
        if hook.endswith(("mlp.hook_pre", "mlp.hook_post")):
            return hooked["d_mlp"]
        return None

    hook_width = width(cfg.hook)
    if cfg.d_in is not None and hook_width is not None and cfg.d_in != hook_width:
        raise ValueError(f"d_in={cfg.d_in} does not match the activations' width {hook_width}")
    d_in = cfg.d_in or hook_width
    d_out = cfg.d_out or (width(cfg.hook_out) if cfg.hook_out else d_in)
    return (d_in, d_out) if d_in and d_out else None


def check_memory(
    cfg: TrainConfig, d_in: int, d_out: int, device: torch.device, log
) -> MemoryEstimate:
    """Print the estimate; raise ``MemoryError`` if the device or the host cannot hold the run.

    On the CPU the device *is* the host: the SAE's state and the shuffler's buffer share it."""
    mem = estimate(cfg, d_in, d_out, optimizer_in_backward=bool(cfg.optimizer_in_backward))
    host_free = available_bytes(torch.device("cpu"))
    free = host_free - mem.host_buffer if device.type == "cpu" else available_bytes(device)
    if mem.average and mem.device_total > PLAN_SHARE * free:
        # The trainer drops the weight average when it does not fit (Trainer._plan_memory).
        log(
            f"the weight average ({mem.average / GiB:.1f} GiB) does not fit: the run trains "
            "without it and serves the raw weights"
        )
        mem.average = 0
    log(f"memory estimate: {mem.describe()}")
    if device.type == "cpu":
        need = mem.device_total + mem.host_buffer
        if need > host_free:
            raise MemoryError(
                f"this run needs about {need / GiB:.1f} GiB of host memory but "
                f"{host_free / GiB:.1f} GiB is available ({mem.describe()}); lower buffer_tokens, "
                "d_sae or batch_size"
            )
        return mem
    if mem.device_total > free:
        raise MemoryError(
            f"this run needs about {mem.device_total / GiB:.1f} GiB on {device} but "
            f"{free / GiB:.1f} GiB is free ({mem.describe()}); lower d_sae or batch_size, or set "
            "optimizer_in_backward=True"
        )
    if mem.host_buffer > host_free:
        raise MemoryError(
            f"the shuffler's buffer needs {mem.host_buffer / GiB:.1f} GiB of host memory but "
            f"{host_free / GiB:.1f} GiB is available; lower buffer_tokens"
        )
    return mem
