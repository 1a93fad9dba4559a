"""Run by tests/models/test_modeling_parallel.py with 2 CPU processes (torchrun, gloo): tensor-parallel loading.

Loads the checkpoint plainly and with ``tp_plan="auto"``; the logits must agree (with and without autograd), every
mask must be sharded exactly like its weight and gather to the saved mask, and a training step must keep inactive
gradients zero. A checkpoint whose heads cannot be split over the ranks must fail with a clear error. Writes one
JSON line with the verdict from rank 0.
"""

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

import hf_sparse_ift  # noqa: F401  (registers the model with the Auto classes)
from hf_sparse_ift.sparsity import sparse_layers


def main(checkpoint: str, odd_heads_checkpoint: str, out: str) -> None:
    x = torch.load(f"{checkpoint}/x.pt")
    plain = AutoModelForCausalLM.from_pretrained(checkpoint)
    tp = AutoModelForCausalLM.from_pretrained(checkpoint, tp_plan="auto")
    rank = dist.get_rank()
    with torch.no_grad():
        expected = plain(x).logits
        no_grad = (tp(x).logits - expected).abs().max().item()
    with_grad = (tp(x).logits.detach() - expected).abs().max().item()

    plain_layers, tp_layers = sparse_layers(plain), sparse_layers(tp)
    sharded = all(
        isinstance(m.weight, DTensor)
        and isinstance(m.weight_mask, DTensor)
        and m.weight_mask.placements == m.weight.placements
        and m.weight_mask.to_local().shape == m.weight.to_local().shape
        and m.weight.to_local().numel() < m.weight.numel()
        for m in tp_layers.values()
    )
    same_masks = all(
        torch.equal(tp_layers[k].weight_mask.full_tensor(), m.weight_mask) for k, m in plain_layers.items()
    )

    tp.train()
    tp(x, labels=x).loss.backward()
    zero_inactive_grads = all(
        int(torch.count_nonzero(m.weight.grad.full_tensor()[~m.weight_mask.full_tensor()])) == 0
        and int(torch.count_nonzero(m.weight.grad.full_tensor())) > 0
        for m in tp_layers.values()
    )

    try:
        odd = AutoModelForCausalLM.from_pretrained(odd_heads_checkpoint, tp_plan="auto")
        odd(x % odd.config.vocab_size)
        odd_heads_error = None
    except Exception as err:
        odd_heads_error = f"{type(err).__name__}: {err}"

    if rank == 0:
        with open(out, "w") as f:
            json.dump(
                {
                    "ranks": dist.get_world_size(),
                    "no_grad_diff": no_grad,
                    "grad_diff": with_grad,
                    "layers": len(tp_layers),
                    "sharded": sharded,
                    "same_masks": same_masks,
                    "zero_inactive_grads": zero_inactive_grads,
                    "odd_heads_error": odd_heads_error,
                },
                f,
            )
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
