"""Conversion between transformers' `GPT2LMHeadModel` and `SparseWideGPTForCausalLM`.

GPT-2 stores block linears as `Conv1D` (weight is in x out, q/k/v fused in ``c_attn``); we store
`nn.Linear` layout (out x in) with q/k/v separate. Everything else maps one to one.

* GPT-2 -> Sparse Wide: a dense (s = 0) SparseWideGPT that computes the same logits.
* Sparse Wide -> GPT-2: a GPT-2 of the *widened* sizes whose weights are ours (inactive ones are
  zero), so any GPT-2 tool can run a Sparse Wide model, at dense cost.
"""

from __future__ import annotations

import inspect
import os

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from .configuration_sparse_wide_gpt import SparseWideGPTConfig
from .errors import UsageError
from .modeling_sparse_wide_gpt import SparseWideGPTForCausalLM

# The arguments both configs have, with the same meaning (GPT-2's widths are ours after widening: n_embd, n_inner).
_SHARED_CONFIG = tuple(
    name for name in SparseWideGPTConfig.arguments() if name in inspect.signature(GPT2Config.__init__).parameters
)


def _load_gpt2(model_or_path) -> GPT2LMHeadModel:
    if isinstance(model_or_path, GPT2LMHeadModel):
        return model_or_path
    if isinstance(model_or_path, (str, os.PathLike)):
        return GPT2LMHeadModel.from_pretrained(model_or_path)
    raise TypeError(f"expected a GPT2LMHeadModel or a checkpoint path, got {type(model_or_path).__name__}")


def _check_gpt2_supported(config: GPT2Config) -> None:
    unsupported = {
        "add_cross_attention": config.add_cross_attention,
        "scale_attn_by_inverse_layer_idx": config.scale_attn_by_inverse_layer_idx,
        "reorder_and_upcast_attn": config.reorder_and_upcast_attn,
        "scale_attn_weights": not config.scale_attn_weights,
    }
    bad = {k: getattr(config, k) for k, v in unsupported.items() if v}
    if bad:
        raise UsageError(f"GPT-2 options without a SparseWideGPT equivalent: {bad}")


def _weight(linear: torch.nn.Module) -> torch.Tensor:
    """The full (out, in) weight of a linear of any layout, zero at inactive positions: a dense or masked layer's
    ``weight``, a block layer's `dense_weight()` (active blocks placed in a zero matrix), a condensed layer's
    `to_dense()` weight (active values scattered into a zero matrix). Only a dense or masked weight can be written
    to."""
    if hasattr(linear, "dense_weight") and not isinstance(getattr(linear, "weight", None), torch.Tensor):
        return linear.dense_weight()
    if hasattr(linear, "to_dense"):
        return linear.to_dense()[0]
    return linear.weight


def _linked_tensors(model: SparseWideGPTForCausalLM, gpt2: GPT2LMHeadModel):
    """(our tensor, GPT-2's tensor, transposed?) for every parameter; GPT-2's q/k/v are slices of ``c_attn``."""
    ours, theirs = model.transformer, gpt2.transformer
    pairs = [(ours.wte.weight, theirs.wte.weight, False), (ours.wpe.weight, theirs.wpe.weight, False)]
    norms = [(ours.ln_f, theirs.ln_f)]
    for o, t in zip(ours.h, theirs.h):
        norms += [(o.ln_1, t.ln_1), (o.ln_2, t.ln_2)]
        d = o.attn.q_proj.out_features
        for i, linear in enumerate((o.attn.q_proj, o.attn.k_proj, o.attn.v_proj)):
            pairs += [
                (_weight(linear), t.attn.c_attn.weight[:, i * d : (i + 1) * d], True),
                (linear.bias, t.attn.c_attn.bias[i * d : (i + 1) * d], False),
            ]
        for linear, conv in ((o.attn.o_proj, t.attn.c_proj), (o.mlp.fc_in, t.mlp.c_fc), (o.mlp.fc_out, t.mlp.c_proj)):
            pairs += [(_weight(linear), conv.weight, True), (linear.bias, conv.bias, False)]
    pairs += [(a, b, False) for x, y in norms for a, b in ((x.weight, y.weight), (x.bias, y.bias))]
    if not model.config.tie_word_embeddings:
        pairs.append((model.lm_head.weight, gpt2.lm_head.weight, False))
    return pairs


@torch.no_grad()
def gpt2_to_sparse_wide(model_or_path) -> SparseWideGPTForCausalLM:
    """A dense SparseWideGPT (sparsity 0) with the weights of a GPT-2 model or checkpoint directory."""
    gpt2 = _load_gpt2(model_or_path)
    gc = gpt2.config
    _check_gpt2_supported(gc)
    config = SparseWideGPTConfig(
        dense_hidden_size=gc.n_embd,
        dense_intermediate_size=gc.n_inner or 4 * gc.n_embd,
        sparsity=0.0,
        **{k: getattr(gc, k) for k in _SHARED_CONFIG},
    )
    model = SparseWideGPTForCausalLM(config).to(gpt2.dtype)
    for ours, theirs, transposed in _linked_tensors(model, gpt2):
        ours.copy_(theirs.t() if transposed else theirs)
    return model


@torch.no_grad()
def sparse_wide_to_gpt2(model: SparseWideGPTForCausalLM) -> GPT2LMHeadModel:
    """A GPT2LMHeadModel of the widened sizes computing the same logits (inactive weights stay 0). The sparse layers
    may be masked, block-sparse or condensed; nothing is padded (the head size stays the model's own)."""
    c = model.config
    config = GPT2Config(n_embd=c.hidden_size, n_inner=c.intermediate_size, **{k: getattr(c, k) for k in _SHARED_CONFIG})
    gpt2 = GPT2LMHeadModel(config).to(model.dtype)
    for ours, theirs, transposed in _linked_tensors(model, gpt2):
        theirs.copy_(ours.t() if transposed else ours)
    return gpt2
