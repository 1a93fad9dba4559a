"""Dynamic sparse training (DST): evolve the masks of a model's `SparseLinear` layers while it trains.

The engine is separate from the model and from the training loop. Attach it once, then call
``engine.step()`` right after every real optimizer step:

    engine = DSTEngine(model, optimizer, DSTConfig(method="set"), total_steps=10_000)
    for batch in loader:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step(); optimizer.zero_grad()
        engine.step()            # every ΔT steps: drop / regrow in every sparse layer

Methods: ``static`` (mask never changes), ``set`` (Mocanu et al. 2018: drop smallest |w|, regrow at
random), ``rigl`` (Evci et al. 2020: regrow where the dense |∇w| is largest), ``srigl`` (Lasby et al.
2024: RigL with a constant fan-in per neuron and neuron ablation).

Invariants (tests/test_dst.py checks each): the active count of every layer is constant (SRigL: every
active neuron has the same fan-in); inactive weights and their optimizer state are exactly zero after
every step; regrown weights start at zero; the same seed gives the same masks on any number of ranks
(growth randomness comes from a generator seeded by (seed, step, layer), dense gradients are summed
over ranks before they are ranked); ``state_dict`` / ``load_state_dict`` make a resume exact.

FSDP2: parameters and optimizer state are DTensor shards, masks (buffers) stay whole on every rank. On update
steps the engine gathers each weight (``full_tensor``), computes the new mask, identical on all ranks, and applies
it to its own shard of the weight and of Adam's moments; the mask gradient multiply runs in backward, where FSDP2
has the weight unsharded. Nothing is gathered between updates.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, fields

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor

from .modeling_sparse_wide_gpt import SparseLinear

METHODS = ("static", "set", "rigl", "srigl")


@dataclass
class DSTConfig:
    """Dynamic sparse training settings (the ``dst:`` section of a training config).

    method: static | set | rigl | srigl.
    drop_fraction: α, the fraction of a layer's active weights replaced at the first update;
        decays to 0 by cosine over the update period (RigL's schedule).
    update_interval: ΔT, optimizer steps between mask updates.
    stop_fraction: updates stop after this fraction of training (masks then stay fixed).
    seed: seed of the regrowth randomness (SET) and of SRigL's constant fan-in initial masks.
    ablation_threshold: SRigL's γ_sal: a neuron is ablated when fewer than γ_sal·fan_in of its weights
        are salient (kept by magnitude or chosen for regrowth by gradient).
    track_churn: keep a bit-packed copy of the initial masks (1/8 byte per weight) to report the
        fraction of positions that changed since initialisation.
    """

    method: str = "set"
    drop_fraction: float = 0.3
    update_interval: int = 100
    stop_fraction: float = 0.75
    seed: int = 0
    ablation_threshold: float = 0.3
    track_churn: bool = True

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"dst.method={self.method!r} is invalid: expected one of {list(METHODS)}")
        if not 0.0 <= self.drop_fraction < 1.0:
            raise ValueError(f"dst.drop_fraction={self.drop_fraction!r} is invalid: expected a number in [0, 1)")
        if isinstance(self.update_interval, bool) or not isinstance(self.update_interval, int) or self.update_interval < 1:
            raise ValueError(f"dst.update_interval={self.update_interval!r} is invalid: expected an integer >= 1")
        if not 0.0 <= self.stop_fraction <= 1.0:
            raise ValueError(f"dst.stop_fraction={self.stop_fraction!r} is invalid: expected a number in [0, 1]")
        if not 0.0 <= self.ablation_threshold <= 1.0:
            raise ValueError(f"dst.ablation_threshold={self.ablation_threshold!r} is invalid: expected a number in [0, 1]")

    @classmethod
    def from_dict(cls, values: dict) -> DSTConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown dst option(s) {unknown}; valid: {sorted(known)}")
        return cls(**values)


# ----------------------------------------------------------------------------------------------
# Deterministic selection helpers (ties broken by the lowest flat index, on any device)
# ----------------------------------------------------------------------------------------------
def select_top_k(scores: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """Boolean mask of the k largest (or smallest) entries of a 1-D tensor; ties go to the lowest index.

    `torch.topk` finds the k-th value (multi-block radix select on GPUs, unlike kthvalue or a sort of one
    long slice); everything strictly beyond it is taken, then the first ties by index until k are chosen.
    Exact and deterministic, with no host synchronisation.
    """
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    values = scores.topk(k, largest=largest, sorted=False).values
    threshold = values.min() if largest else values.max()
    beyond = scores > threshold if largest else scores < threshold
    ties = scores == threshold
    room = k - beyond.sum()
    return beyond | (ties & (ties.cumsum(0, dtype=torch.int32) <= room))


def top_k(scores: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """Flat indices of `select_top_k` (ascending)."""
    return torch.nonzero(select_top_k(scores, k, largest)).squeeze(1)


def smallest_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Flat indices of the k smallest entries of a 1-D tensor; ties go to the lowest index."""
    return top_k(scores, k, largest=False)


def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    flat = mask.reshape(-1)
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % 8)]).view(-1, 8).to(torch.uint8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=mask.device)
    return (flat * weights).sum(1, dtype=torch.uint8)


_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.uint8)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: FSDP2 keeps parameters as DTensor shards outside forward / backward."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _like(full: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`full` laid out like `target`: sliced to this rank's shard when `target` is a DTensor. Every rank holds
    the same `full`, so the slicing needs no communication."""
    if isinstance(target, DTensor):
        return distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None)
    return full


def _raw_optimizer(optimizer):
    """The torch optimizer behind accelerate's `AcceleratedOptimizer` (or the optimizer itself)."""
    return getattr(optimizer, "optimizer", optimizer)


# ----------------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------------
class DSTEngine:
    """Evolves the masks of every `SparseLinear` in `model`; see the module docstring for usage."""

    def __init__(self, model: torch.nn.Module, optimizer, config: DSTConfig, total_steps: int):
        if total_steps < 1:
            raise ValueError(f"total_steps={total_steps!r} is invalid: expected an integer >= 1")
        self.config = config
        self.optimizer = optimizer
        self.total_steps = total_steps
        self.step_count = 0
        unwrapped = getattr(model, "module", model)
        self.layers: dict[str, SparseLinear] = {
            name: m for name, m in unwrapped.named_modules() if isinstance(m, SparseLinear)}
        if config.method != "static" and not self.layers:
            raise ValueError("the model has no SparseLinear layers (is its sparsity 0?): nothing for DST to update")
        # SRigL's budget per layer: constant fan-in f = round(density·d_in) on every output neuron.
        self.layer_budget: dict[str, int] = {}
        if config.method == "srigl":
            self._init_constant_fan_in()
        self.active_counts = {name: int(m.weight_mask.sum()) for name, m in self.layers.items()}
        for name, count in self.active_counts.items():
            self.layer_budget.setdefault(name, count)
        self.initial_masks = {name: _pack_bits(m.weight_mask) for name, m in self.layers.items()} \
            if config.track_churn else {}
        self._arm_dense_grad_capture()

    # --- schedule ---
    @property
    def last_update_step(self) -> int:
        return int(self.config.stop_fraction * self.total_steps)

    def is_update_step(self, step: int) -> bool:
        return (self.config.method != "static" and step > 0 and step % self.config.update_interval == 0
                and step < self.last_update_step)

    def drop_fraction_at(self, step: int) -> float:
        """Cosine decay of α from `drop_fraction` at step 0 to 0 at the last update step."""
        if self.last_update_step <= 0:
            return 0.0
        return self.config.drop_fraction / 2 * (1 + math.cos(math.pi * min(step / self.last_update_step, 1.0)))

    # --- the per-step hook ---
    def step(self) -> dict | None:
        """Advance one optimizer step; on update steps evolve the masks and return the telemetry."""
        self.step_count += 1
        telemetry = None
        if self.is_update_step(self.step_count):
            telemetry = self.update()
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
            old = layer.weight_mask.clone()
            if self.config.method == "srigl":
                new, stats = self._srigl_mask(name, layer, alpha)
            else:
                new, stats = self._unstructured_mask(name, index, layer, alpha)
            self._apply(layer, old, new)
            if name in self.initial_masks:
                differing = (_pack_bits(new) ^ self.initial_masks[name]).long()
                changed = _POPCOUNT.to(new.device)[differing].sum(dtype=torch.int64)
                churn[name] = changed / new.numel()
            telemetry["layers"][name] = stats
            if "fan_in" in stats:  # SRigL: the total follows the active neurons
                self.active_counts[name] = stats["fan_in"] * stats["active_neurons"]
            layer.dense_grad = None
        if churn:  # one device-to-host copy for all layers instead of one sync per layer
            for name, value in zip(churn, torch.stack(list(churn.values())).tolist()):
                telemetry["layers"][name]["churn"] = value
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        telemetry["seconds"] = time.perf_counter() - start
        return telemetry

    # --- mask rules ---
    def _growth_generator(self, index: int, device) -> torch.Generator:
        seed = (self.config.seed * 1_000_003 + self.step_count) * 10_007 + index
        return torch.Generator(device=device).manual_seed(seed)

    def _unstructured_mask(self, name: str, index: int, layer: SparseLinear, alpha: float):
        mask = layer.weight_mask.reshape(-1)
        n_active = self.layer_budget[name]  # constant for SET / RigL: no need to count (and sync) on device
        k = min(int(round(alpha * n_active)), n_active, mask.numel() - n_active)
        inf = torch.tensor(float("inf"), device=mask.device)
        dropped = select_top_k(torch.where(mask, _full(layer.weight.detach()).reshape(-1).abs().float(), inf), k,
                               largest=False)
        if self.config.method == "set":  # k uniformly random positions among those inactive before the update
            noise = torch.rand(mask.numel(), generator=self._growth_generator(index, mask.device), device=mask.device)
            growth_scores = torch.where(mask, -inf, noise)
        else:  # rigl: the largest dense-gradient magnitudes among positions inactive before this update
            growth_scores = torch.where(mask, -inf, self._dense_grad(layer).reshape(-1).abs().float())
        grown = select_top_k(growth_scores, k, largest=True)
        new = (mask & ~dropped) | grown
        return new.view_as(layer.weight_mask), {"dropped": k, "grown": k}

    def _init_constant_fan_in(self) -> None:
        """SRigL starts from masks with the same number of active inputs on every output neuron.

        Layers whose masks already have a constant fan-in (a model that trained with SRigL before)
        keep them; `load_state_dict` then restores the original budgets.
        """
        for index, (name, layer) in enumerate(self.layers.items()):
            d_out, d_in = layer.weight.shape
            fan_ins = layer.weight_mask.sum(dim=1)
            alive = fan_ins[fan_ins > 0]
            if alive.numel() and (alive == alive[0]).all():
                self.layer_budget[name] = int(fan_ins.sum())
                continue
            fan_in = max(1, int(round((1 - layer.sparsity) * d_in)))
            generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + index)
            columns = torch.rand(d_out, d_in, generator=generator).argsort(dim=1)[:, :fan_in]
            mask = torch.zeros(d_out, d_in, dtype=torch.bool)
            mask.scatter_(1, columns, True)
            with torch.no_grad():
                self._apply(layer, layer.weight_mask.clone(), mask.to(layer.weight_mask.device))
            self.layer_budget[name] = d_out * fan_in

    def _srigl_mask(self, name: str, layer: SparseLinear, alpha: float):
        mask = layer.weight_mask
        weight = _full(layer.weight.detach()).abs().float()
        grad = self._dense_grad(layer).abs().float()
        d_out, d_in = mask.shape
        active_rows = mask.any(dim=1)
        n_active = int(mask.sum())
        fan_in = n_active // max(int(active_rows.sum()), 1)
        k = min(int(round(alpha * n_active)), n_active)
        inf = torch.tensor(float("inf"), device=weight.device)
        # Saliency as unstructured RigL would decide it: keep all but the k smallest |w|, regrow the k
        # largest |∇w| among inactive positions.
        kept = mask & ~select_top_k(torch.where(mask, weight, inf).view(-1), k, largest=False).view_as(mask)
        grow = select_top_k(torch.where(mask, -inf, grad).view(-1), k, largest=True).view_as(mask)
        salient = (kept | grow).sum(dim=1)
        # Neuron ablation: an active neuron with too few salient weights is removed.
        alive = active_rows & (salient >= self.config.ablation_threshold * fan_in)
        # Never ablate below what the budget needs at full fan-in; then the most salient neurons stay.
        min_alive = min(int(active_rows.sum()), -(-self.layer_budget[name] // d_in))
        if int(alive.sum()) < min_alive:
            rank = torch.where(active_rows, salient * (d_out + 1) - torch.arange(d_out, device=salient.device), -1)
            alive = torch.zeros_like(active_rows)
            alive[rank.topk(min_alive).indices] = True
        new_fan_in = min(d_in, self.layer_budget[name] // int(alive.sum()))
        # Per neuron: all kept weights first, then the largest gradients among positions inactive before.
        score = torch.where(kept, inf, torch.where(mask, -inf, grad))
        columns = score.topk(new_fan_in, dim=1).indices
        new = torch.zeros_like(mask)
        new.scatter_(1, columns, True)
        new &= alive.unsqueeze(1)
        stats = {"dropped": int((mask & ~new).sum()), "grown": int((new & ~mask).sum()),
                 "active_neurons": int(alive.sum()), "fan_in": new_fan_in}
        return new, stats

    # --- dense gradients (RigL, SRigL), only on update steps ---
    def _arm_dense_grad_capture(self) -> None:
        capture = self.config.method in ("rigl", "srigl") and self.is_update_step(self.step_count + 1)
        for layer in self.layers.values():
            layer.capture_dense_grad = capture

    def _dense_grad(self, layer: SparseLinear) -> torch.Tensor:
        grad = getattr(layer, "dense_grad", None)
        if grad is None:
            raise RuntimeError(
                "RigL/SRigL needs the dense gradient of the update step: call engine.step() after every "
                "optimizer step, starting from the first, so that it can capture it")
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(grad)  # every rank ranks the same (summed) gradient -> identical masks
        return grad

    # --- writing a new mask ---
    def _apply(self, layer: SparseLinear, old: torch.Tensor, new: torch.Tensor) -> None:
        """Install `new`: weights and optimizer state are kept only where a weight stays active.

        Dropped weights become 0, regrown ones start at 0 (they were inactive, hence 0), and Adam's
        moments at both are zeroed so momentum cannot revive or push them.
        """
        keep = old & new
        layer.weight_mask.copy_(new)
        layer.weight.mul_(_like(keep, layer.weight))
        state = _raw_optimizer(self.optimizer).state.get(layer.weight, {}) if self.optimizer is not None else {}
        for value in state.values():
            if torch.is_tensor(value) and value.shape == layer.weight.shape:
                value.mul_(_like(keep, value))

    # --- checkpointing ---
    def state_dict(self) -> dict:
        """Everything needed to continue exactly: step, settings, budgets and churn references.

        Masks themselves live in the model's state (persistent buffers). Growth randomness is a pure
        function of (seed, step, layer), so there is no generator state to save.
        """
        return {"step_count": self.step_count, "total_steps": self.total_steps, "config": asdict(self.config),
                "layer_budget": dict(self.layer_budget),
                "initial_masks": {k: v.cpu() for k, v in self.initial_masks.items()}}

    def load_state_dict(self, state: dict) -> None:
        if state["config"] != asdict(self.config):
            raise ValueError(f"checkpointed DST settings {state['config']} differ from the current {asdict(self.config)}")
        self.step_count = state["step_count"]
        self.total_steps = state["total_steps"]
        self.layer_budget = dict(state["layer_budget"])
        self.initial_masks = {k: v.to(self.layers[k].weight.device) for k, v in state["initial_masks"].items()}
        self.active_counts = {name: int(m.weight_mask.sum()) for name, m in self.layers.items()}
        self._arm_dense_grad_capture()

    # --- distributed safety net ---
    @torch.no_grad()
    def masks_synchronized(self) -> bool:
        """True when every rank holds the same masks (compares per-layer checksums; one all-gather).

        Cheap enough to run after each update: a silent divergence would corrupt every later step.
        """
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return True
        sums = []
        for layer in self.layers.values():
            flat = layer.weight_mask.reshape(-1)
            positions = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.float64)
            sums.append(torch.stack([flat.sum(dtype=torch.float64), (positions * flat).sum(), (positions.sqrt() * flat).sum()]))
        local = torch.stack(sums) if sums else torch.zeros(1, 3, dtype=torch.float64)
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, local)
        return all(torch.equal(g, gathered[0]) for g in gathered)

    # --- reporting ---
    def sparsity(self) -> float:
        """Current fraction of inactive weights over all sparse layers (from tracked counts: no device sync)."""
        total = sum(m.weight_mask.numel() for m in self.layers.values())
        return 1.0 - sum(self.active_counts.values()) / max(total, 1)


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
    return out
