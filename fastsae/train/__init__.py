"""Training: :class:`Trainer` for drop-in use, and ``python -m fastsae.train`` (see ``__main__``)."""

from fastsae.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fastsae.train.config import PRESETS, TrainConfig
from fastsae.train.trainer import NonFiniteLossError, Trainer

__all__ = [
    "PRESETS",
    "CheckpointError",
    "NonFiniteLossError",
    "TrainConfig",
    "Trainer",
    "load_checkpoint",
    "save_checkpoint",
]
