"""The ``dst:`` section of a training config."""

from __future__ import annotations

from dataclasses import dataclass, fields

from ... import checks
from ...errors import UsageError


@dataclass
class DSTConfig:
    """Dynamic sparse training settings.

    method: one of `METHODS` (static, set, rigl, srigl).
    drop_fraction: α, the fraction of a layer's active weights replaced at the first update;
        decays to 0 by cosine over the update period (RigL's schedule).
    update_interval: ΔT, optimizer steps between mask updates.
    stop_fraction: updates stop after this fraction of training (masks then stay fixed).
    seed: seed of the regrowth randomness (SET) and of SRigL's constant fan-in initial masks.
    ablation_threshold: SRigL's γ_sal: a neuron is ablated when fewer than γ_sal·fan_in of its weights
        are salient (kept by magnitude or chosen for regrowth by gradient).
    track_churn: keep a bit-packed copy of the initial masks (1/8 byte per weight) to report the
        fraction of positions that changed since initialisation.
    spectral_gap: at every mask update, also report each layer's Ramanujan gap and weighted spectral gap
        (`hf_sparse_ift.sparsity.spectral`, Sparse-IFT §3.1): two singular values per layer, off by default.
    """

    method: str = "set"
    drop_fraction: float = 0.3
    update_interval: int = 100
    stop_fraction: float = 0.75
    seed: int = 0
    ablation_threshold: float = 0.3
    track_churn: bool = True
    spectral_gap: bool = False

    def __post_init__(self):
        from .methods import METHODS  # the methods import torch; the config and its help need not

        checks.choice("dst.method", self.method, sorted(METHODS))
        checks.number("dst.drop_fraction", self.drop_fraction, low=0, high=1, high_open=True)
        checks.integer("dst.update_interval", self.update_interval, low=1)
        checks.number("dst.stop_fraction", self.stop_fraction, low=0, high=1)
        checks.integer("dst.seed", self.seed, low=0)
        checks.number("dst.ablation_threshold", self.ablation_threshold, low=0, high=1)
        if not isinstance(self.track_churn, bool):
            checks.invalid("dst.track_churn", self.track_churn, "expected true or false")
        if not isinstance(self.spectral_gap, bool):
            checks.invalid("dst.spectral_gap", self.spectral_gap, "expected true or false")

    def check_model(self, model_config) -> None:
        """Refuse, from the model's config alone (before it is built: ``--print-config`` runs this too), a method
        that cannot train it: one that updates masks on a model without sparse layers, or one without block support
        on a block-sparse model. `DSTEngine` checks the same on the built layers."""
        from .methods import METHODS

        method = METHODS[self.method]
        if method.updates_masks and not (model_config.sparsity > 0 and model_config.sparse_layers):
            checks.invalid(
                "dst.method",
                self.method,
                f"the model has no sparse layers (model.sparsity={model_config.sparsity}), so there is no mask to "
                "update: use dst.method=static, or a sparse model",
            )
        if model_config.uses_blocks and not method.supports_blocks:
            usable = sorted(name for name, m in METHODS.items() if m.supports_blocks)
            checks.invalid(
                "dst.method",
                self.method,
                f"it does not work on block-sparse layers (model.sparsity_block={model_config.sparsity_block}): use "
                f"one of {usable}, or a model with sparsity_block=1",
            )

    @classmethod
    def from_dict(cls, values: dict) -> DSTConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UsageError(f"unknown dst option(s) {unknown}; valid: {sorted(known)}")
        return cls(**values)
