"""Sharded checkpoints that resume on any world size, and the consolidated SAELens export.

A checkpoint is ``OUT/checkpoints/step-NNNNNNNN/`` holding

- ``shard-00000.safetensors`` ... one per latent slab, written by that slab's data rank 0 (data
  ranks hold identical replicas): the slab's parameters (``sae/*``; replicated ones such as
  ``b_dec`` in every shard), Adam's moments (``optim/<param>/<key>``), the weight average
  (``average/<param>``, when ``ema_gamma`` is set), ``trainer/since_fired`` and
  ``trainer/fire_counts`` for the slab, the scales;
- ``state.json`` (rank 0, last): ``"format": "sharded-1"``, the counters, the data position, the
  configs, and each shard's file, latent offset and count, and tensor shapes.

Loading cuts the latent axis anew: a rank owning latents ``[a, b)`` reads the overlapping part
of every shard, so a run saved on 4 ranks resumes on 2, 8 or 1. The checkpoint is written into a
hidden temporary directory that rank 0 renames into place after every shard is fsynced: a rank
killed mid-write leaves the earlier checkpoints loadable.

:func:`export_sae` turns a checkpoint into the SAELens v6 files that ``sae.save`` writes (input
scaling folded, ``sparsity.safetensors``), the same as one process's ``Trainer.save_sae``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fastsae.config import SAEConfig
from fastsae.parallel.comm import barrier
from fastsae.parallel.trainer import LATENT_ROWS
from fastsae.sae import SAE
from fastsae.train.checkpoint import (
    CheckpointError,
    average_tensors,
    list_checkpoints,
    restore_trainer_tensors,
    saved_average,
)
from fastsae.train.trainer import Trainer

__all__ = ["FORMAT", "export_sae", "is_sharded", "load_sharded", "read_meta", "save_sharded"]

FORMAT = "sharded-1"
META = "state.json"
_SLICED_COUNTERS = ("trainer/since_fired", "trainer/fire_counts")


def _is_sliced(key: str) -> bool:
    """Whether state tensor ``key`` is cut along the latent axis (``W_enc`` along dim 1)."""
    if key in _SLICED_COUNTERS:
        return True
    parts = key.split("/")
    if parts[0] in ("sae", "average"):
        return parts[1] in (*LATENT_ROWS, "W_enc")
    if parts[0] == "optim":
        return parts[1] in (*LATENT_ROWS, "W_enc") and parts[2] != "step"
    return False


def _latent_dim(key: str) -> int:
    return 1 if key.split("/")[1:2] == ["W_enc"] else 0


def _slab_tensors(trainer) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for name, t in trainer.scaled_sae.state_dict().items():
        tensors[f"sae/{name}"] = t
    for name, p in trainer.scaled_sae.named_parameters():
        for key, value in trainer.optimizer_state(p).items():
            tensors[f"optim/{name}/{key}"] = value
    tensors.update(average_tensors(trainer))
    tensors["trainer/since_fired"] = trainer.since_fired
    tensors["trainer/fire_counts"] = trainer.fire_counts
    tensors["trainer/in_scale"] = trainer.in_scale
    tensors["trainer/out_scale"] = trainer.out_scale
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_sharded(trainer, out_dir: str | Path, *, data_state: dict[str, Any] | None = None) -> Path:
    """Collective: every rank calls it. Returns the checkpoint directory."""
    layout = trainer.layout
    root = Path(out_dir) / "checkpoints"
    path = root / f"step-{trainer.step_count:08d}"
    tmp = root / f".{path.name}.tmp"
    if layout.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier("checkpoint: directory")
    name = f"shard-{layout.latent_rank:05d}.safetensors"
    if layout.writes_shard:
        tensors = _slab_tensors(trainer)
        save_file(tensors, str(tmp / name))
        _fsync(tmp / name)
    barrier("checkpoint: shards written")
    if layout.is_main:
        from fastsae.parallel.mesh import latent_slab

        shards = []
        for r in range(layout.latent_size):
            offset, count = latent_slab(trainer.cfg.d_sae, layout.latent_size, r)
            file = tmp / f"shard-{r:05d}.safetensors"
            with safe_open(str(file), framework="pt") as f:
                shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
            shards.append({"file": file.name, "offset": offset, "count": count, "tensors": shapes})
        meta = {
            "format": FORMAT,
            "step": trainer.step_count,
            "tokens": trainer.tokens,
            "counted_tokens": trainer.counted_tokens,
            "initialized": trainer.initialized,
            "config": trainer.cfg.to_dict(),
            "sae_config": trainer.full_sae_cfg.to_dict(),
            "data_state": data_state or {},
            "world": layout.world,
            "shards": shards,
        }
        (tmp / META).write_text(json.dumps(meta, indent=1))
        _fsync(tmp / META)
        shutil.rmtree(path, ignore_errors=True)
        os.rename(tmp, path)
        for old in list_checkpoints(out_dir)[: -trainer.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    barrier("checkpoint: renamed")
    return path


def is_sharded(path: str | Path) -> bool:
    try:
        return json.loads((Path(path) / META).read_text()).get("format") == FORMAT
    except (OSError, json.JSONDecodeError):
        return False


def read_meta(path: str | Path) -> dict[str, Any]:
    """``state.json`` of a sharded checkpoint, with every shard file checked against it."""
    path = Path(path)
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / META} is missing, truncated or corrupt: {e}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path / META}: format {meta.get('format')!r}, expected {FORMAT}")
    for shard in meta["shards"]:
        file = path / shard["file"]
        try:
            with safe_open(str(file), framework="pt") as f:
                shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        except Exception as e:
            raise CheckpointError(f"{file} is missing, truncated or corrupt: {e}") from None
        if shapes != shard["tensors"]:
            raise CheckpointError(f"{file} does not match {META}")
    return meta


def read_slab(path: str | Path, offset: int, count: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(meta, tensors)`` for latents ``[offset, offset + count)``, assembled from the shards
    that overlap them; replicated tensors come from the first shard."""
    path = Path(path)
    meta = read_meta(path)
    out: dict[str, list[torch.Tensor]] = {}
    for i, shard in enumerate(meta["shards"]):
        lo = max(offset, shard["offset"])
        hi = min(offset + count, shard["offset"] + shard["count"])
        with safe_open(str(path / shard["file"]), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118
                if not _is_sliced(key):
                    if i == 0:
                        out[key] = [f.get_tensor(key)]
                    continue
                if hi <= lo:
                    continue
                t = f.get_tensor(key)
                a, b = lo - shard["offset"], hi - shard["offset"]
                out.setdefault(key, []).append(t[:, a:b] if _latent_dim(key) else t[a:b])
    tensors = {
        k: (torch.cat(v, dim=_latent_dim(k)) if _is_sliced(k) else v[0]) for k, v in out.items()
    }
    return meta, tensors


def load_sharded(trainer, path: str | Path) -> dict[str, Any]:
    """Restore ``trainer`` (a :class:`DistributedTrainer` on any layout) from ``path``; returns
    the data position."""
    meta, tensors = read_slab(path, trainer.shard.offset, trainer.shard.count)
    restore_trainer_tensors(trainer, tensors)
    trainer.step_count = meta["step"]
    trainer.tokens = meta["tokens"]
    trainer.counted_tokens = meta["counted_tokens"]
    trainer.initialized = meta["initialized"]
    return meta["data_state"]


class _Consolidated:
    """The parts of a :class:`Trainer` that :meth:`Trainer.save_sae` reads."""

    feature_density = Trainer.feature_density
    inference_sae = Trainer.inference_sae
    save_sae = Trainer.save_sae
    averaged_weights = Trainer.averaged_weights
    _write_average = Trainer._write_average
    _fold_weight = Trainer._fold_weight

    def __init__(self, sae, in_scale, out_scale, fire_counts, counted_tokens, average=None):
        self.scaled_sae, self.in_scale, self.out_scale = sae, in_scale, out_scale
        self.fire_counts, self.counted_tokens = fire_counts, counted_tokens
        # (averaged, averaged_step, step_count, average_gamma), or None: the raw weights
        averaged, averaged_step, step_count, gamma = average or (None, 0, 0, None)
        self.averaged, self.averaged_step = averaged, averaged_step
        self.step_count, self.average_gamma = step_count, gamma


def consolidated(path: str | Path) -> _Consolidated:
    """The whole SAE and its statistics from a sharded checkpoint (any world size)."""
    meta = read_meta(path)
    sae = SAE.from_config(SAEConfig.from_dict(meta["sae_config"]))
    _, tensors = read_slab(path, 0, sae.d_sae)
    state = {k.removeprefix("sae/"): v for k, v in tensors.items() if k.startswith("sae/")}
    sae.load_state_dict(state, strict=True)
    saved = saved_average(tensors, dict(sae.named_parameters()))
    average = None  # none, or a partial one: the raw weights
    if saved is not None:
        average = (
            saved,
            int(tensors["trainer/averaged_step"]),
            meta["step"],
            meta["config"]["ema_gamma"],
        )
    return _Consolidated(
        sae,
        tensors["trainer/in_scale"],
        tensors["trainer/out_scale"],
        tensors["trainer/fire_counts"],
        meta["counted_tokens"],
        average,
    )


def export_sae(path: str | Path, out: str | Path) -> Path:
    """Write the SAELens v6 files of the checkpoint ``path`` to ``out`` (what ``Trainer.save_sae``
    writes for one process)."""
    return consolidated(path).save_sae(out)
