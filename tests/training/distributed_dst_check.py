"""Run by tests/training/test_distributed.py under `accelerate launch --cpu --num_processes 2`.

Each rank trains on different data (so local gradients differ); after many DST updates the masks
must be identical on every rank. Writes one JSON line with the verdict from rank 0. A third argument "block" trains
the block-sparse model (8x8 blocks) instead of the masked one.
"""

import json
import sys

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from hf_sparse_ift.sparsity import sparse_layers

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))  # tests/, for helpers
from helpers import tiny_config

from hf_sparse_ift import SparseWideGPTForCausalLM
from hf_sparse_ift.sparsity.dst import DSTConfig, DSTEngine

BLOCKS = dict(dense_hidden_size=32, sparsity_block=8)


def main(method: str, out: str, layout: str = "masked") -> None:
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = SparseWideGPTForCausalLM(tiny_config(**BLOCKS if layout == "block" else {}))
    initial = {k: m.weight_mask.clone() for k, m in sparse_layers(model).items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model, opt = accelerator.prepare(model, opt)
    engine = DSTEngine(model, opt, DSTConfig(method=method, update_interval=2), total_steps=40)
    g = torch.Generator().manual_seed(1000 + accelerator.process_index)  # different data per rank
    updates = 0
    for _ in range(30):
        x = torch.randint(0, 97, (4, 16), generator=g)
        accelerator.backward(model(x, labels=x).loss)
        opt.step()
        opt.zero_grad()
        updates += engine.step() is not None
    layers = sparse_layers(accelerator.unwrap_model(model))
    digest = {k: m.weight_mask.to(torch.uint8).flatten().tolist() for k, m in layers.items()}
    params = [p.detach().flatten().tolist() for p in model.parameters()]
    everyone = gather_object([(digest, params)])
    if accelerator.is_main_process:
        same_masks = all(d == everyone[0][0] for d, _ in everyone)
        same_params = all(p == everyone[0][1] for _, p in everyone)
        changed = sum(int((initial[k] != m.weight_mask).sum()) for k, m in layers.items())
        with open(out, "w") as f:
            json.dump(
                {
                    "ranks": len(everyone),
                    "same_masks": same_masks,
                    "same_params": same_params,
                    "updates": updates,
                    "changed_positions": changed,
                },
                f,
            )


if __name__ == "__main__":
    main(*sys.argv[1:])
