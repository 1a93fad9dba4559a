"""The DST engine: schedules mask updates, asks the method for each layer's new mask, applies it to the
weights and the optimizer state, and checks the invariants.

Two kinds of sparse layer: a masked `SparseLinear` (a dense weight and a mask; units are weights) and a
`BlockSparseLinear` (only the active blocks and their index; units are blocks). A block layer has a fixed number of
slots in ``weight_blocks``: a regrown block takes a dropped block's slot, starts at zero with zeroed optimizer state,
and the slots are re-sorted into the order of the new block index, parameter and optimizer state alike.

Invariants (tests/sparsity/test_dst.py and test_dst_blocks.py check each): the active count of every layer is its budget (SRigL: every
active neuron has the same fan-in); inactive weights and their optimizer state are exactly zero after
every step; regrown weights start at zero; the same seed gives the same masks on any number of ranks
(randomness comes from generators seeded by (seed, step, layer), dense gradients are summed over ranks
before they are ranked); ``state_dict`` / ``load_state_dict`` make a resume exact.

FSDP2: parameters and optimizer state are DTensor shards, masks (buffers) stay whole on every rank. On update
steps the engine gathers each weight (``full_tensor``), computes the new mask, identical on all ranks, and applies
it to its own shard of the weight and of Adam's moments; the mask gradient multiply runs in backward, where FSDP2
has the weight unsharded. Block layers move blocks between slots, so their values and moments are gathered, moved
and re-sliced on update steps. Nothing is gathered between updates.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict

import torch
import torch.distributed as dist

from ...errors import UsageError
from ...models.sparse_wide_gpt import compat
from ...models.sparse_wide_gpt.layer_utils import full_tensor, is_dtensor
from ..masks import BlockSparseLinear, SparseLinear, count_differing_bits, pack_bits, sparse_layers
from ..spectral import mask_graph_stats
from .block_grid import active_block_norms, block_norms, block_slots
from .config import DSTConfig
from .methods import METHODS, LayerUpdate


def _like(full: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`full` laid out like `target`: sliced to this rank's shard when `target` is a DTensor. Every rank holds
    the same `full`, so the slicing needs no communication."""
    if is_dtensor(target):
        return compat.distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None)
    return full


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _unit_mask(layer: SparseLinear | BlockSparseLinear) -> torch.Tensor:
    """What a method selects: the weight mask, or the block mask of a block-sparse layer."""
    return layer.block_mask if isinstance(layer, BlockSparseLinear) else layer.weight_mask


def _weights_per_unit(layer: SparseLinear | BlockSparseLinear) -> int:
    if isinstance(layer, BlockSparseLinear):
        rows, cols = layer.sparsity_block
        return rows * cols
    return 1


def _gathered_dense_weight(layer: SparseLinear | BlockSparseLinear) -> torch.Tensor:
    if isinstance(layer, BlockSparseLinear):
        return layer.dense_weight(full_tensor(layer.weight_blocks.detach()))
    return full_tensor(layer.weight.detach())


class _DenseGradAccumulator:
    """A sparse layer's ``grad_observer``: sums the unmasked weight gradients of one step (all micro-batches)."""

    def __init__(self):
        self.grad = None

    def __call__(self, grad: torch.Tensor) -> None:
        self.grad = grad.detach().clone() if self.grad is None else self.grad.add_(grad)


class DSTEngine:
    """Evolves the masks of every sparse layer in `model`; see the package docstring for usage."""

    def __init__(self, model: torch.nn.Module, optimizer, config: DSTConfig, total_steps: int):
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise UsageError(f"total_steps={total_steps!r} is invalid: expected an integer >= 1")
        self.config = config
        self.method = METHODS[config.method](config)
        self.optimizer = optimizer
        self.total_steps = total_steps
        self.step_count = 0
        self.layers: dict[str, SparseLinear | BlockSparseLinear] = sparse_layers(model)
        if self.method.updates_masks and not self.layers:
            raise UsageError("the model has no SparseLinear layers (is its sparsity 0?): nothing for DST to update")
        blocks = [name for name, m in self.layers.items() if isinstance(m, BlockSparseLinear)]
        if blocks and not self.method.supports_blocks:
            usable = sorted(name for name, method in METHODS.items() if method.supports_blocks)
            raise UsageError(
                f"dst.method={config.method!r} does not work on block-sparse layers (the model has {len(blocks)}, "
                f"e.g. {blocks[0]}): use one of {usable}, or a model with sparsity_block=1"
            )
        for index, layer in enumerate(self.layers.values()):
            mask = self.method.initial_mask(layer, index)
            if mask is not None:
                with torch.no_grad():
                    self._apply(layer, layer.weight_mask.clone(), mask)
        # The budget of a layer: the active units (weights or blocks) it keeps (SRigL: those its fan-in allows
        # across all neurons).
        self.layer_budget = {name: int(_unit_mask(m).sum()) for name, m in self.layers.items()}
        self.active_counts = dict(self.layer_budget)
        self.initial_masks = (
            {name: pack_bits(_unit_mask(m)) for name, m in self.layers.items()} if config.track_churn else {}
        )
        self.dense_grads: dict[str, _DenseGradAccumulator] = {}
        self._arm_dense_grad_capture()

    # --- schedule ---
    @property
    def last_update_step(self) -> int:
        return int(self.config.stop_fraction * self.total_steps)

    def is_update_step(self, step: int) -> bool:
        return (
            self.method.updates_masks
            and step > 0
            and step % self.config.update_interval == 0
            and step < self.last_update_step
        )

    def drop_fraction_at(self, step: int) -> float:
        """Cosine decay of α from `drop_fraction` at step 0 to 0 at the last update step."""
        if self.last_update_step <= 0:
            return 0.0
        return self.config.drop_fraction / 2 * (1 + math.cos(math.pi * min(step / self.last_update_step, 1.0)))

    # --- the per-step hook ---
    def step(self) -> dict | None:
        """Advance one optimizer step; on update steps evolve the masks and return the telemetry."""
        self.step_count += 1
        telemetry = self.update() if self.is_update_step(self.step_count) else None
        self._arm_dense_grad_capture()
        return telemetry

    @torch.no_grad()
    def update(self) -> dict:
        """One drop / regrow round over every sparse layer; returns per-layer telemetry."""
        start = time.perf_counter()
        alpha = self.drop_fraction_at(self.step_count)
        telemetry = {"step": self.step_count, "drop_fraction": alpha, "layers": {}}
        churn = {}
        for index, (name, layer) in enumerate(self.layers.items()):
            update = self._layer_update(index, name, layer)
            new, stats = self.method.new_mask(update, alpha)
            if isinstance(layer, BlockSparseLinear):
                self._apply_blocks(layer, new)
            else:
                self._apply(layer, update.mask, new)
            self.active_counts[name] = stats.pop("active", self.active_counts[name])
            if name in self.initial_masks:
                churn[name] = count_differing_bits(pack_bits(new), self.initial_masks[name]) / new.numel()
            telemetry["layers"][name] = stats
        if self.config.spectral_gap:
            for name, layer in self.layers.items():
                telemetry["layers"][name].update(mask_graph_stats(layer.weight_mask, _gathered_dense_weight(layer)))
        self.dense_grads = {}
        if churn:  # one device-to-host copy for all layers instead of one sync per layer
            for name, value in zip(churn, torch.stack(list(churn.values())).tolist()):
                telemetry["layers"][name]["churn"] = value
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        telemetry["seconds"] = time.perf_counter() - start
        return telemetry

    def _layer_update(self, index: int, name: str, layer: SparseLinear | BlockSparseLinear) -> LayerUpdate:
        """What the method sees of one layer: its units (weights or blocks), their magnitudes and dense gradients."""
        if isinstance(layer, BlockSparseLinear):
            weight = full_tensor(layer.weight_blocks.detach())
            magnitude = active_block_norms(layer, weight)
            mask = layer.block_mask
            constant_fan_in = layer.block_fan_in == "constant"

            def dense_grad():
                return block_norms(layer, self._dense_grad(name))
        else:
            weight = full_tensor(layer.weight.detach())
            magnitude = weight.abs()
            mask = layer.weight_mask.clone()
            constant_fan_in = False  # SRigL's constant fan-in is its own method (srigl.py)

            def dense_grad():
                return self._dense_grad(name)

        return LayerUpdate(
            name=name,
            index=index,
            layer=layer,
            weight=weight,
            mask=mask,
            magnitude=magnitude,
            budget=self.layer_budget[name],
            constant_fan_in=constant_fan_in,
            step=self.step_count,
            seed=self.config.seed,
            dense_grad=dense_grad,
        )

    # --- dense gradients, captured only for the backward passes of update steps ---
    @property
    def capturing_dense_grad(self) -> bool:
        return bool(self.dense_grads)

    def _arm_dense_grad_capture(self) -> None:
        capture = self.method.needs_dense_grad and self.is_update_step(self.step_count + 1)
        self.dense_grads = {name: _DenseGradAccumulator() for name in self.layers} if capture else {}
        for name, layer in self.layers.items():
            layer.grad_observer = self.dense_grads.get(name)

    def _dense_grad(self, name: str) -> torch.Tensor:
        accumulator = self.dense_grads.get(name)
        if accumulator is None or accumulator.grad is None:
            raise RuntimeError(
                f"{self.method.name} needs the dense gradient of the update step: call engine.step() after every "
                "optimizer step, starting from the first, so that it can capture it"
            )
        if _distributed():
            dist.all_reduce(accumulator.grad)  # every rank ranks the same (summed) gradient -> identical masks
        return accumulator.grad

    # --- writing a new mask ---
    def _apply(self, layer: SparseLinear, old: torch.Tensor, new: torch.Tensor) -> None:
        """Install `new`: weights and optimizer state are kept only where a weight stays active.

        Dropped weights become 0, regrown ones start at 0 (they were inactive, hence 0), and Adam's
        moments at both are zeroed so momentum cannot revive or push them.
        """
        keep = old & new
        layer.weight_mask.copy_(new)
        layer.weight.masked_fill_(_like(~keep, layer.weight), 0.0)  # +0.0: a product would leave -0.0
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate wraps the torch optimizer
        state = optimizer.state.get(layer.weight, {}) if optimizer is not None else {}
        for value in state.values():
            if torch.is_tensor(value) and value.shape == layer.weight.shape:
                value.mul_(_like(keep, value))

    def _apply_blocks(self, layer: BlockSparseLinear, new: torch.Tensor) -> None:
        """Install the block mask `new` (same number of active blocks): kept blocks keep their values and optimizer
        state, moved to the slot of their place in the new block index; regrown blocks take the dropped blocks'
        slots and start at zero, with zero optimizer state."""
        source = block_slots(layer, new)  # old slot of each new active block, -1 for regrown ones
        kept = (source >= 0).view(-1, 1, 1)
        source = source.clamp(min=0)

        def moved(values: torch.Tensor) -> torch.Tensor:
            full = full_tensor(values)
            return _like(torch.where(kept, full[source], torch.zeros((), dtype=full.dtype, device=full.device)), values)

        parameter = layer.weight_blocks
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate wraps the torch optimizer
        state = optimizer.state.get(parameter, {}) if optimizer is not None else {}
        parameter.copy_(moved(parameter))
        for value in state.values():
            if torch.is_tensor(value) and value.shape == parameter.shape:
                value.copy_(moved(value))
        layer.set_block_mask(new)

    # --- checkpointing ---
    def state_dict(self) -> dict:
        """Everything needed to continue exactly: step, settings, budgets and churn references.

        Masks themselves live in the model's state (persistent buffers). Randomness is a pure function of
        (seed, step, layer), so there is no generator state to save.
        """
        return {
            "step_count": self.step_count,
            "total_steps": self.total_steps,
            "config": asdict(self.config),
            "layer_budget": dict(self.layer_budget),
            "initial_masks": {k: v.cpu() for k, v in self.initial_masks.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        # spectral_gap only adds telemetry (and is absent from older checkpoints): it may change on resume.
        saved = {k: v for k, v in state["config"].items() if k != "spectral_gap"}
        if saved != {k: v for k, v in asdict(self.config).items() if k != "spectral_gap"}:
            raise UsageError(
                f"checkpointed DST settings {state['config']} differ from the current {asdict(self.config)}"
            )
        self.step_count = state["step_count"]
        self.total_steps = state["total_steps"]
        self.layer_budget = dict(state["layer_budget"])
        self.initial_masks = {k: v.to(_unit_mask(self.layers[k]).device) for k, v in state["initial_masks"].items()}
        self.active_counts = {name: int(_unit_mask(m).sum()) for name, m in self.layers.items()}
        self._arm_dense_grad_capture()

    @torch.no_grad()
    def masks_synchronized(self) -> bool:
        """True when every rank holds the same masks (run after each update: a silent divergence would corrupt every
        later step). Compares per-layer checksums of the unit masks over all ranks (one all-gather); True without
        distribution."""
        if not _distributed():
            return True
        sums = []
        for layer in self.layers.values():
            flat = _unit_mask(layer).reshape(-1)
            positions = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.float64)
            sums.append(
                torch.stack([flat.sum(dtype=torch.float64), (positions * flat).sum(), (positions.sqrt() * flat).sum()])
            )
        local = torch.stack(sums) if sums else torch.zeros(1, 3, dtype=torch.float64)
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, local)
        return all(torch.equal(g, gathered[0]) for g in gathered)

    # --- reporting ---
    def sparsity(self) -> float:
        """Current fraction of inactive (zero) weights over all sparse layers (tracked counts: no device sync)."""
        total = sum(m.in_features * m.out_features for m in self.layers.values())
        active = sum(count * _weights_per_unit(self.layers[name]) for name, count in self.active_counts.items())
        return 1.0 - active / total if total else 0.0


def summarize(telemetry: dict) -> dict[str, float]:
    """Flat scalars for trackers: totals plus per-layer dropped / grown / churn / active neurons."""
    out = {"dst/seconds": telemetry["seconds"], "dst/drop_fraction": telemetry["drop_fraction"]}
    for name, stats in telemetry["layers"].items():
        for key, value in stats.items():
            out[f"dst/{name}/{key}"] = value
    for key in ("dropped", "grown"):
        out[f"dst/total_{key}"] = sum(s[key] for s in telemetry["layers"].values())
    churn = [s["churn"] for s in telemetry["layers"].values() if "churn" in s]
    if churn:
        out["dst/mean_churn"] = sum(churn) / len(churn)
    for key in ("ramanujan_gap", "weighted_spectral_gap"):
        values = [s[key] for s in telemetry["layers"].values() if key in s]
        if values:
            out[f"dst/mean_{key}"] = sum(values) / len(values)
    return out
