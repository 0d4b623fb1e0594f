"""Training checkpoints: safetensors + JSON only (loading runs no code), written atomically.

A checkpoint is a directory ``OUT/checkpoints/step-00001234/`` holding

- ``state.safetensors``: the SAE's parameters and buffers (``sae/<name>``), Adam's moments and
  step counts (``optim/<param>/<key>``), the trainer's counters (``trainer/*``) and the torch RNG
  state (``rng/torch``);
- ``state.json``: the format version, the :class:`TrainConfig`, the step and token counters, the
  data position (whatever the data source reports), the names and shapes of every tensor and the
  sha256 of ``state.safetensors``, so that a truncated, bit-flipped or tampered file is detected
  before anything is loaded.

A checkpoint is only written when every floating tensor in it is finite, and reading one checks
the checksum and the finiteness again: :func:`latest_good_checkpoint` names the newest checkpoint
that passes both.

Writes go through :func:`fastsae.atomic.atomic_directory`: a process killed mid-write leaves only a
hidden temporary directory (``.step-*.tmp-p<pid>-*``), and every earlier checkpoint stays
loadable. Such temporaries are removed by the next save and by a resume (:func:`load_checkpoint`).
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

from fastsae.atomic import atomic_directory, remove_stale_temporaries, sha256_file

__all__ = [
    "CheckpointError",
    "latest_checkpoint",
    "latest_good_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "read_checkpoint",
    "remove_stale_run_temporaries",
    "save_checkpoint",
]

#: 2 added ``sha256`` (of ``state.safetensors``); format 1 checkpoints are read without it.
FORMAT = 2
_READABLE_FORMATS = (1, 2)
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


def remove_stale_run_temporaries(out_dir: str | Path) -> list[Path]:
    """Remove what killed writes left in a run directory: ``checkpoints/.step-*.tmp-*`` and
    ``.sae.tmp-*`` whose writer process is gone (see
    :func:`fastsae.atomic.remove_stale_temporaries`). For the start of a run or a resume."""
    out_dir = Path(out_dir)
    return [
        *remove_stale_temporaries(_checkpoint_root(out_dir), name=_NAME),
        *remove_stale_temporaries(out_dir, name="sae"),
    ]


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest checkpoint directory of a run (not verified; see :func:`latest_good_checkpoint`)."""
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def latest_good_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest checkpoint that :func:`read_checkpoint` accepts (complete, checksum matches,
    every tensor finite), or None."""
    for path in reversed(list_checkpoints(out_dir)):
        try:
            read_checkpoint(path)
        except CheckpointError:
            continue
        return path
    return None


def _non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    return [
        name
        for name, t in tensors.items()
        if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]


def average_tensors(trainer) -> dict[str, torch.Tensor]:
    """The weight average's entries of a checkpoint (none without one): ``average/<param>`` and
    ``trainer/averaged_step`` (shared with the sharded checkpoints of fastsae/parallel)."""
    if trainer.averaged is None:
        return {}
    names = [name for name, _ in trainer.scaled_sae.named_parameters()]
    tensors = {f"average/{n}": avg for n, avg in zip(names, trainer.averaged, strict=True)}
    tensors["trainer/averaged_step"] = torch.tensor(trainer.averaged_step)
    return tensors


def saved_average(tensors: dict[str, torch.Tensor], params: dict) -> list[torch.Tensor] | None:
    """The saved average of ``params`` (name -> parameter) in their order, or None when it is
    missing or partial (a sharded checkpoint of ranks of which some dropped it)."""
    found = [tensors.get(f"average/{name}") for name in params]
    if not params or any(
        t is None or t.shape != p.shape for t, p in zip(found, params.values(), strict=True)
    ):
        return None
    return found


def _trainer_tensors(trainer) -> dict[str, torch.Tensor]:
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
    tensors["trainer/sparsity_coeff"] = trainer.sparsity_coeff
    tensors["rng/torch"] = torch.get_rng_state()
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def save_checkpoint(
    trainer, out_dir: str | Path, *, data_state: dict[str, Any] | None = None
) -> Path:
    """Write a checkpoint of ``trainer`` and keep only the newest ``keep_checkpoints``.

    Raises:
        CheckpointError: a parameter, optimizer moment or scale is NaN or infinite; nothing is
            written, so the newest checkpoint on disk stays the last good one.
    """
    tensors = _trainer_tensors(trainer)
    bad = _non_finite(tensors)
    if bad:
        raise CheckpointError(
            f"not writing a checkpoint at step {trainer.step_count}: non-finite values in "
            f"{', '.join(bad)}; last good checkpoint: {latest_good_checkpoint(out_dir) or 'none'}"
        )
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

    def write_meta(p: Path) -> None:
        # state.safetensors is already written and closed in the same temporary directory
        meta["sha256"] = {TENSORS: sha256_file(p.parent / TENSORS)}
        p.write_text(json.dumps(meta, indent=1))

    root = _checkpoint_root(out_dir)
    remove_stale_temporaries(root, name=_NAME)
    path = root / f"step-{trainer.step_count:08d}"
    atomic_directory(path, {TENSORS: lambda p: save_file(tensors, str(p)), META: write_meta})
    for old in list_checkpoints(out_dir)[: -trainer.cfg.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def _check_meta_fields(meta: dict[str, Any], meta_path: Path) -> None:
    """The counters and records a resume copies into the trainer have the right types."""
    for name in ("step", "tokens", "counted_tokens"):
        value = meta.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise CheckpointError(f"{meta_path} is corrupt: {name}={value!r}")
    if not isinstance(meta.get("initialized"), bool):
        raise CheckpointError(f"{meta_path} is corrupt: initialized={meta.get('initialized')!r}")
    for name in ("config", "data_state", "tensors"):
        if not isinstance(meta.get(name), dict):
            raise CheckpointError(f"{meta_path} is corrupt: {name!r} is not an object")


def read_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(meta, tensors)`` of a checkpoint, verified against ``state.json``: the sha256 of
    ``state.safetensors``, the tensor names and shapes, and finite values.

    Raises:
        CheckpointError: naming the file and what is wrong with it.
    """
    path = Path(path)
    meta_path, tensor_path = path / META, path / TENSORS
    if not meta_path.exists() or not tensor_path.exists():
        raise CheckpointError(f"{path} is not a complete checkpoint (needs {META} and {TENSORS})")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_path} is truncated or corrupt: {e}") from None
    except RecursionError:
        raise CheckpointError(f"{meta_path} is corrupt: nested too deeply") from None
    if not isinstance(meta, dict) or meta.get("format") not in _READABLE_FORMATS:
        found = meta.get("format") if isinstance(meta, dict) else meta
        raise CheckpointError(f"{meta_path}: format {found!r}, expected {FORMAT}")
    _check_meta_fields(meta, meta_path)
    if meta["format"] >= 2:
        expected_sha = (meta.get("sha256") or {}).get(TENSORS)
        if not isinstance(expected_sha, str):
            raise CheckpointError(f"{meta_path} is truncated or corrupt: no sha256 of {TENSORS}")
        actual = sha256_file(tensor_path)
        if actual != expected_sha:
            raise CheckpointError(
                f"{tensor_path} is truncated or corrupt: its sha256 is {actual[:12]}..., "
                f"{META} says {expected_sha[:12]}..."
            )
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
    bad = _non_finite(tensors)
    if bad:
        raise CheckpointError(f"{tensor_path} holds non-finite values in {', '.join(bad)}")
    return meta, tensors


def load_checkpoint(trainer, path: str | Path) -> dict[str, Any]:
    """Restore ``trainer`` in place from ``path`` (verified first, see :func:`read_checkpoint`);
    returns the saved ``data_state``. Stale temporaries of killed saves beside ``path`` are removed.
    """
    meta, tensors = read_checkpoint(path)
    remove_stale_temporaries(Path(path).parent, name=_NAME)
    restore_trainer_tensors(trainer, tensors)
    with torch.no_grad():
        trainer.sparsity_coeff = tensors["trainer/sparsity_coeff"].clone()
        torch.set_rng_state(tensors["rng/torch"])
    trainer.step_count = meta["step"]
    trainer.tokens = meta["tokens"]
    trainer.counted_tokens = meta["counted_tokens"]
    trainer.initialized = meta["initialized"]
    return meta["data_state"]


@torch.no_grad()
def restore_trainer_tensors(trainer, tensors: dict[str, torch.Tensor]) -> None:
    """Put saved ``sae/*`` weights, ``optim/*`` Adam state and the firing counters and scales
    back into ``trainer`` (shared by this module and the sharded checkpoints of
    :mod:`fastsae.parallel.checkpoint`)."""
    state = {k.removeprefix("sae/"): v for k, v in tensors.items() if k.startswith("sae/")}
    trainer.scaled_sae.load_state_dict(state, strict=True)
    params = dict(trainer.scaled_sae.named_parameters())
    for opt in trainer.optimizers:
        opt.state.clear()
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, pname, skey = key.split("/", 2)
            trainer.set_optimizer_state(params[pname], skey, value)
    # The weight average, when saved and this run keeps one (not turned off, not dropped for
    # memory on this machine); without it the next step starts it afresh. In each parameter's
    # own layout (W_enc is a transposed view), so folds stay fast.
    saved = saved_average(tensors, params) if trainer.average_gamma is not None else None
    trainer.averaged = None
    if saved is not None:
        trainer.averaged = [
            torch.empty_like(p, dtype=t.dtype).copy_(t)
            for p, t in zip(params.values(), saved, strict=True)
        ]
        trainer.averaged_step = int(tensors["trainer/averaged_step"])
    trainer.since_fired.copy_(tensors["trainer/since_fired"])
    trainer.fire_counts.copy_(tensors["trainer/fire_counts"])
    trainer.in_scale = tensors["trainer/in_scale"].clone()
    trainer.out_scale = tensors["trainer/out_scale"].clone()
