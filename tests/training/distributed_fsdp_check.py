"""Run by tests/training/test_distributed.py with 2 CPU processes (torchrun, gloo): DST under FSDP2 (fully_shard).

Each rank holds a shard of every weight; it trains on its own data. After many SET / RigL updates the masks
must be identical on all ranks, inactive weights and Adam moments exactly zero in the gathered tensors, and
each rank's shard must really be a shard. Writes one JSON line with the verdict from rank 0. A third argument "block"
trains the block-sparse model (8x8 blocks), whose sharded parameter is ``weight_blocks`` and which stores no inactive
weights (the zero checks then look at the blocks regrown by the last update).
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from hf_sparse_ift.sparsity import sparse_layers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for helpers
from helpers import tiny_config

from hf_sparse_ift import BlockSparseLinear, SparseWideGPTForCausalLM
from hf_sparse_ift.sparsity.dst import DSTConfig, DSTEngine

BLOCKS = dict(dense_hidden_size=32, sparsity_block=8)


def sparse_parameter(layer):
    return layer.weight_blocks if isinstance(layer, BlockSparseLinear) else layer.weight


def dense(layer, values: DTensor):
    """A gathered parameter (or optimizer state of it) as the dense (out, in) matrix of the layer."""
    full = values.full_tensor()
    return layer.dense_weight(full) if isinstance(layer, BlockSparseLinear) else full


def main(method: str, out: str, layout: str = "masked") -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = SparseWideGPTForCausalLM(tiny_config(**BLOCKS if layout == "block" else {}))
    initial = {k: m.weight_mask.clone() for k, m in sparse_layers(model).items()}
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    engine = DSTEngine(model, opt, DSTConfig(method=method, update_interval=2), total_steps=40)
    g = torch.Generator().manual_seed(1000 + rank)
    updates = 0
    layers = sparse_layers(model)
    for _ in range(20):
        x = torch.randint(0, 97, (4, 16), generator=g)
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
        before = {k: m.weight_mask.clone() for k, m in layers.items()}
        updates += engine.step() is not None
    # Masked layers: every inactive weight. Block layers store none: the blocks regrown by the last step instead.
    zeros = {k: ~m.weight_mask if layout == "masked" else m.weight_mask & ~before[k] for k, m in layers.items()}
    sharded = all(
        isinstance(sparse_parameter(m), DTensor)
        and sparse_parameter(m).to_local().shape[0] < sparse_parameter(m).shape[0]
        for m in layers.values()
    )
    zero_weights = all(torch.count_nonzero(dense(m, sparse_parameter(m))[zeros[k]]) == 0 for k, m in layers.items())
    zero_state = all(
        torch.count_nonzero(dense(m, opt.state[sparse_parameter(m)][key])[zeros[k]]) == 0
        for k, m in layers.items()
        for key in ("exp_avg", "exp_avg_sq")
    )
    counts = all(int(m.weight_mask.sum()) == int(initial[k].sum()) for k, m in layers.items())
    masks = [m.weight_mask.to(torch.uint8).flatten().tolist() for m in layers.values()]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, masks)
    if rank == 0:
        changed = sum(int((initial[k] != m.weight_mask).sum()) for k, m in layers.items())
        with open(out, "w") as f:
            json.dump(
                {
                    "ranks": len(everyone),
                    "same_masks": all(m == everyone[0] for m in everyone),
                    "sharded": sharded,
                    "zero_weights": zero_weights,
                    "zero_state": zero_state,
                    "constant_counts": counts,
                    "updates": updates,
                    "changed_positions": changed,
                },
                f,
            )
    dist.barrier()  # no rank tears gloo down while another still communicates
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
