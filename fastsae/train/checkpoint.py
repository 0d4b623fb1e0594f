"""Training checkpoints: safetensors + JSON only (loading runs no code), written atomically.

A checkpoint is a directory ``OUT/checkpoints/step-00001234/`` holding

- ``state.safetensors``: the SAE's parameters and buffers (``sae/<name>``), Adam's moments and
  step counts (``optim/<param>/<key>``), the trainer's counters (``trainer/*``) and the torch RNG
  state (``rng/torch``);
- ``state.json``: the format version, the :class:`TrainConfig`, the step and token counters, the
  data position (whatever the data source reports) and the names of every tensor, so that a
  truncated or tampered file is detected before anything is loaded.

Writes go through :func:`fastsae.io.atomic_directory`: a process killed mid-write leaves only a
hidden temporary directory, and every earlier checkpoint stays loadable.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fastsae.io import atomic_directory

__all__ = [
    "CheckpointError",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "save_checkpoint",
]

FORMAT = 1
TENSORS = "state.safetensors"
META = "state.json"
_NAME = re.compile(r"^step-(\d{8,})$")


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated or does not match this run."""


def _checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Checkpoint directories of a run, oldest first (temporary directories are ignored)."""
    root = _checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def _trainer_tensors(trainer) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for name, t in trainer.scaled_sae.state_dict().items():
        tensors[f"sae/{name}"] = t
    for name, p in trainer.scaled_sae.named_parameters():
        alias = trainer.adam_param[p]  # Adam may step a contiguous alias (the transpose) of p
        for key, value in trainer.optimizer_of[p].state.get(alias, {}).items():
            if isinstance(value, torch.Tensor):
                if alias is not p and value.shape == alias.shape:
                    value = value.T  # saved in the parameter's own shape
                tensors[f"optim/{name}/{key}"] = value
    tensors["trainer/since_fired"] = trainer.since_fired
    tensors["trainer/fire_counts"] = trainer.fire_counts
    tensors["trainer/in_scale"] = trainer.in_scale
    tensors["trainer/out_scale"] = trainer.out_scale
    tensors["trainer/sparsity_coeff"] = trainer.sparsity_coeff
    tensors["rng/torch"] = torch.get_rng_state()
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def save_checkpoint(
    trainer, out_dir: str | Path, *, data_state: dict[str, Any] | None = None
) -> Path:
    """Write a checkpoint of ``trainer`` and keep only the newest ``keep_checkpoints``."""
    tensors = _trainer_tensors(trainer)
    meta = {
        "format": FORMAT,
        "step": trainer.step_count,
        "tokens": trainer.tokens,
        "counted_tokens": trainer.counted_tokens,
        "initialized": trainer.initialized,
        "config": trainer.cfg.to_dict(),
        "data_state": data_state or {},
        "tensors": {k: list(v.shape) for k, v in tensors.items()},
    }
    path = _checkpoint_root(out_dir) / f"step-{trainer.step_count:08d}"
    atomic_directory(
        path,
        {
            TENSORS: lambda p: save_file(tensors, str(p)),
            META: lambda p: p.write_text(json.dumps(meta, indent=1)),
        },
    )
    for old in list_checkpoints(out_dir)[: -trainer.cfg.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def read_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(meta, tensors)`` of a checkpoint, verified against the tensor list in ``state.json``."""
    path = Path(path)
    meta_path, tensor_path = path / META, path / TENSORS
    if not meta_path.exists() or not tensor_path.exists():
        raise CheckpointError(f"{path} is not a complete checkpoint (needs {META} and {TENSORS})")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_path} is truncated or corrupt: {e}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT}")
    try:
        with safe_open(str(tensor_path), framework="pt", device="cpu") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    except Exception as e:
        raise CheckpointError(f"{tensor_path} is truncated or corrupt: {e}") from None
    expected = meta.get("tensors", {})
    got = {k: list(v.shape) for k, v in tensors.items()}
    if got != expected:
        missing = sorted(set(expected) - set(got))
        raise CheckpointError(
            f"{tensor_path} does not match {META}: "
            + (f"missing {', '.join(missing)}" if missing else "tensor shapes differ")
        )
    return meta, tensors


def load_checkpoint(trainer, path: str | Path) -> dict[str, Any]:
    """Restore ``trainer`` in place from ``path``; returns the saved ``data_state``."""
    meta, tensors = read_checkpoint(path)
    with torch.no_grad():
        state = {k.removeprefix("sae/"): v for k, v in tensors.items() if k.startswith("sae/")}
        trainer.scaled_sae.load_state_dict(state, strict=True)
        params = dict(trainer.scaled_sae.named_parameters())
        for opt in trainer.optimizers:
            opt.state.clear()
        for key, value in tensors.items():
            if key.startswith("optim/"):
                _, pname, skey = key.split("/", 2)
                p = params[pname]
                if value.shape == p.shape:
                    # Moments must share the parameter's memory layout (W_enc is a transposed
                    # view): fused Adam walks parameter and state storage in the same order.
                    value = torch.empty_like(p, dtype=value.dtype).copy_(value)
                    if trainer.adam_param[p] is not p:
                        value = value.T  # the alias's contiguous layout
                # fused Adam keeps its step counters on the parameter's device
                alias = trainer.adam_param[p]
                trainer.optimizer_of[p].state.setdefault(alias, {})[skey] = value.to(p.device)
        trainer.since_fired.copy_(tensors["trainer/since_fired"])
        trainer.fire_counts.copy_(tensors["trainer/fire_counts"])
        trainer.in_scale = tensors["trainer/in_scale"].clone()
        trainer.out_scale = tensors["trainer/out_scale"].clone()
        trainer.sparsity_coeff = tensors["trainer/sparsity_coeff"].clone()
        torch.set_rng_state(tensors["rng/torch"])
    trainer.step_count = meta["step"]
    trainer.tokens = meta["tokens"]
    trainer.counted_tokens = meta["counted_tokens"]
    trainer.initialized = meta["initialized"]
    return meta["data_state"]
