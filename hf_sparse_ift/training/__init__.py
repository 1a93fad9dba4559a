"""Pretraining: config, optimizer, checkpoints and the loop.

The public entry points, which the CLI and the study use: `pretrain` (one run, start or resume), `time_training_steps`
(what one optimizer step of a config costs, as a run takes it), the config loaders, and the checkpoint folder rules
(`RunLock`, `list_checkpoints`, `newest_complete_checkpoint`).
"""

from .._lazy import lazy_exports

_EXPORTS = {
    "RunLock": ".checkpoint",
    "list_checkpoints": ".checkpoint",
    "newest_complete_checkpoint": ".checkpoint",
    "PretrainConfig": ".config",
    "build_pretrain_config": ".config",
    "load_pretrain_config": ".config",
    "NonFiniteLossError": ".loop",
    "pretrain": ".loop",
    "time_training_steps": ".loop",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
