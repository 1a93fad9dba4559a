"""Conversion between transformers' `GPT2LMHeadModel` and `SparseWideGPTForCausalLM`.

GPT-2 stores block linears as `Conv1D` (weight is in x out, q/k/v fused in ``c_attn``); we store
`nn.Linear` layout (out x in) with q/k/v separate. Everything else maps one to one.

* GPT-2 -> Sparse Wide: a dense (s = 0) SparseWideGPT that computes the same logits.
* Sparse Wide -> GPT-2: a GPT-2 of the *widened* sizes whose weights are ours (inactive ones are
  zero), so any GPT-2 tool can run a Sparse Wide model, at dense cost.
"""

from __future__ import annotations

import os

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from .configuration_sparse_wide_gpt import SparseWideGPTConfig
from .modeling_sparse_wide_gpt import SparseWideGPTForCausalLM

_SHARED_CONFIG = ("vocab_size", "n_positions", "n_layer", "n_head", "activation_function", "resid_pdrop",
                  "embd_pdrop", "attn_pdrop", "layer_norm_epsilon", "initializer_range", "bos_token_id",
                  "eos_token_id", "pad_token_id", "tie_word_embeddings")


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
        raise ValueError(f"GPT-2 options without a SparseWideGPT equivalent: {bad}")


@torch.no_grad()
def gpt2_to_sparse_wide(model_or_path) -> SparseWideGPTForCausalLM:
    """A dense SparseWideGPT (sparsity 0) with the weights of a GPT-2 model or checkpoint directory."""
    gpt2 = _load_gpt2(model_or_path)
    gc = gpt2.config
    _check_gpt2_supported(gc)
    config = SparseWideGPTConfig(
        dense_hidden_size=gc.n_embd, dense_intermediate_size=gc.n_inner or 4 * gc.n_embd, sparsity=0.0,
        **{k: getattr(gc, k) for k in _SHARED_CONFIG})
    model = SparseWideGPTForCausalLM(config).to(gpt2.dtype)
    src, dst = gpt2.transformer, model.transformer
    dst.wte.weight.copy_(src.wte.weight)
    dst.wpe.weight.copy_(src.wpe.weight)
    _copy_norm(dst.ln_f, src.ln_f)
    for s, d in zip(src.h, dst.h):
        _copy_norm(d.ln_1, s.ln_1)
        _copy_norm(d.ln_2, s.ln_2)
        qkv_w = s.attn.c_attn.weight.t().chunk(3, dim=0)
        qkv_b = s.attn.c_attn.bias.chunk(3, dim=0)
        for linear, w, b in zip((d.attn.q_proj, d.attn.k_proj, d.attn.v_proj), qkv_w, qkv_b):
            linear.weight.copy_(w)
            linear.bias.copy_(b)
        for linear, conv in ((d.attn.o_proj, s.attn.c_proj), (d.mlp.fc_in, s.mlp.c_fc), (d.mlp.fc_out, s.mlp.c_proj)):
            linear.weight.copy_(conv.weight.t())
            linear.bias.copy_(conv.bias)
    if not config.tie_word_embeddings:
        model.lm_head.weight.copy_(gpt2.lm_head.weight)
    return model


@torch.no_grad()
def sparse_wide_to_gpt2(model: SparseWideGPTForCausalLM) -> GPT2LMHeadModel:
    """A GPT2LMHeadModel of the widened sizes computing the same logits (inactive weights stay 0)."""
    c = model.config
    config = GPT2Config(n_embd=c.hidden_size, n_inner=c.intermediate_size,
                        **{k: getattr(c, k) for k in _SHARED_CONFIG})
    gpt2 = GPT2LMHeadModel(config).to(model.dtype)
    src, dst = model.transformer, gpt2.transformer
    dst.wte.weight.copy_(src.wte.weight)
    dst.wpe.weight.copy_(src.wpe.weight)
    _copy_norm(dst.ln_f, src.ln_f)
    for s, d in zip(src.h, dst.h):
        _copy_norm(d.ln_1, s.ln_1)
        _copy_norm(d.ln_2, s.ln_2)
        d.attn.c_attn.weight.copy_(torch.cat([s.attn.q_proj.weight, s.attn.k_proj.weight, s.attn.v_proj.weight]).t())
        d.attn.c_attn.bias.copy_(torch.cat([s.attn.q_proj.bias, s.attn.k_proj.bias, s.attn.v_proj.bias]))
        for conv, linear in ((d.attn.c_proj, s.attn.o_proj), (d.mlp.c_fc, s.mlp.fc_in), (d.mlp.c_proj, s.mlp.fc_out)):
            conv.weight.copy_(linear.weight.t())
            conv.bias.copy_(linear.bias)
    if not c.tie_word_embeddings:
        gpt2.lm_head.weight.copy_(model.lm_head.weight)
    return gpt2


def _copy_norm(dst: torch.nn.LayerNorm, src: torch.nn.LayerNorm) -> None:
    dst.weight.copy_(src.weight)
    dst.bias.copy_(src.bias)
