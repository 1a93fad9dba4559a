"""Pretraining: config, optimizer, checkpoints and the loop.

The public entry points, which the CLI and the study use: `pretrain` (one run, start or resume), `time_training_steps`
(what one optimizer step of a config costs, as a run takes it), the config loaders, and the checkpoint folder rules
(`RunLock`, `list_checkpoints`, `newest_complete_checkpoint`).
"""

from .checkpoint import RunLock, list_checkpoints, newest_complete_checkpoint
from .config import PretrainConfig, build_pretrain_config, load_pretrain_config
from .loop import NonFiniteLossError, pretrain, time_training_steps

__all__ = [
    "NonFiniteLossError",
    "PretrainConfig",
    "RunLock",
    "build_pretrain_config",
    "list_checkpoints",
    "load_pretrain_config",
    "newest_complete_checkpoint",
    "pretrain",
    "time_training_steps",
]
