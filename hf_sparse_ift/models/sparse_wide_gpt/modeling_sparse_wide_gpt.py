"""Sparse Wide GPT: the GPT-2/GPT-3 decoder, widened by Sparse-IFT, with masked sparse block linears.

Architecture is GPT-2's (learned positions, pre-LayerNorm, GELU MLP, tied embeddings), so at
sparsity 0 the model computes exactly what `GPT2LMHeadModel` computes (see `convert.py`). The
difference: every block linear named in ``config.sparse_layers`` is a `SparseLinear`, which owns a
boolean mask saved in the checkpoint.

Why the forward pass costs one plain dense matmul: inactive weights are kept *exactly zero* (they
are zeroed at init, regrown weights start at zero, and their gradient is masked so no optimizer step
moves them), so ``W`` equals ``W * mask`` and the forward is ``F.linear(x, W)`` with no mask
multiply. The mask is applied once per step, to the weight gradient, in `_MaskGradient.backward`.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_sparse_wide_gpt import SparseWideGPTConfig
from .iso_flop import BLOCK_LINEARS, num_inactive
from .sparse_safetensors import SparseCheckpointMixin


# ----------------------------------------------------------------------------------------------
# Sparse linear layer
# ----------------------------------------------------------------------------------------------
class _MaskGradient(torch.autograd.Function):
    """Identity on the weight in forward; multiplies its gradient by the mask in backward.

    A view costs nothing in forward; the backward multiply is one elementwise pass over the weight
    gradient (tiny next to the weight-gradient matmul) and keeps every inactive gradient at 0, so
    clipping, Adam moments and weight decay never see or revive inactive weights. An `observer`
    (set from outside the model, e.g. by a training algorithm that ranks inactive positions by their
    gradient) is handed the gradient before it is masked.
    """

    @staticmethod
    def forward(weight: torch.Tensor, mask: torch.Tensor, observer=None) -> torch.Tensor:
        return weight.view_as(weight)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])
        ctx.observer = inputs[2]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        if ctx.observer is not None:
            ctx.observer(grad)
        return grad * mask, None, None


def derive_seed(*parts: int) -> int:
    """One reproducible seed from several integers (a base seed, a layer index, a step, ...)."""
    seed = 0
    for part in parts:
        seed = (seed * 1_000_003 + int(part)) % 2**63
    return seed


class SparseLinear(nn.Linear):
    """`nn.Linear` whose weight has a fixed-size set of active positions, ``weight_mask`` (bool).

    Invariant: ``weight[~weight_mask] == 0`` exactly. The mask is a persistent buffer (1 byte per
    weight) because regrown weights are zero too, so a mask cannot be read off the weights.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 sparsity: float = 0.0, mask_seed: int = 0, residual_projection: bool = False,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.sparsity = sparsity
        self.mask_seed = mask_seed
        # GPT-2 scales the init of the projections that write into the residual stream by 1/sqrt(2L).
        self.residual_projection = residual_projection
        # Called with the unmasked weight gradient in backward when set (see `_MaskGradient`).
        self.grad_observer = None
        self.register_buffer("weight_mask", torch.ones(out_features, in_features, dtype=torch.bool, device=device))

    def random_mask(self) -> torch.Tensor:
        """Uniform random mask with exactly round(s·n) inactive weights, reproducible from the seed."""
        n = self.weight.numel()
        generator = torch.Generator().manual_seed(self.mask_seed)
        inactive = torch.randperm(n, generator=generator)[: num_inactive(n, self.sparsity)]
        mask = torch.ones(n, dtype=torch.bool)
        mask[inactive] = False
        return mask.view(self.out_features, self.in_features)

    def effective_weight(self) -> torch.Tensor:
        """The weight to multiply with: itself in forward, with the mask applied to its gradient."""
        weight = self.weight
        if weight.requires_grad and torch.is_grad_enabled():
            return _MaskGradient.apply(weight, self.weight_mask, self.grad_observer)
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sparsity={self.sparsity:.4f}"


def _effective_weight(linear: nn.Linear) -> torch.Tensor:
    return linear.effective_weight() if isinstance(linear, SparseLinear) else linear.weight


def _block_linear(config: SparseWideGPTConfig, name: str, layer_idx: int, d_in: int, d_out: int) -> nn.Linear:
    residual = name in ("o_proj", "fc_out")
    if config.sparsity > 0 and name in config.sparse_layers:
        seed = derive_seed(config.mask_seed, layer_idx * len(BLOCK_LINEARS) + BLOCK_LINEARS.index(name))
        return SparseLinear(d_in, d_out, sparsity=config.layer_sparsity, mask_seed=seed, residual_projection=residual)
    linear = nn.Linear(d_in, d_out)
    linear.residual_projection = residual
    return linear


# ----------------------------------------------------------------------------------------------
# Transformer block
# ----------------------------------------------------------------------------------------------
def eager_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    attn_weights = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class SparseWideGPTAttention(nn.Module):
    def __init__(self, config: SparseWideGPTConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        d = config.hidden_size
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self, name, _block_linear(config, name, layer_idx, d, d))
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, hidden_states, attention_mask=None, past_key_values: Cache | None = None, **kwargs):
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        # One matmul for q, k and v (a wider GEMM runs closer to peak than three narrow ones); concatenating
        # the weights costs about what autocast's bf16 copy of them costs anyway.
        projections = (self.q_proj, self.k_proj, self.v_proj)
        if isinstance(self.q_proj, nn.Linear):
            weight = torch.cat([_effective_weight(p) for p in projections])
            bias = torch.cat([p.bias for p in projections])
            qkv = F.linear(hidden_states, weight, bias)
        else:  # condensed layers (condensed.py) have no dense weight to concatenate
            qkv = torch.cat([p(hidden_states) for p in projections], dim=-1)
        query, key, value = (t.view(shape).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)

        attention_interface = eager_attention_forward
        pad = 0
        if self.config._attn_implementation not in (None, "eager"):
            attention_interface = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
            # Fused kernels (flash / memory-efficient) need head sizes that are multiples of 8; the paper's
            # SW-50 width gives 1092 / 12 = 91. Zero-padding q, k, v to 96 leaves every dot product and the
            # output unchanged (the scale stays 1/sqrt(91)) and keeps the fast kernel.
            pad = -self.head_dim % 8
            if pad:
                query, key, value = (F.pad(t, (0, pad)) for t in (query, key, value))
        attn_output, attn_weights = attention_interface(
            self, query, key, value, attention_mask,
            dropout=self.config.attn_pdrop if self.training else 0.0, scaling=self.scaling, **kwargs)
        if pad:
            attn_output = attn_output[..., : self.head_dim]
        attn_output = attn_output.reshape(*hidden_states.shape[:-1], -1).contiguous()
        return self.resid_dropout(self.o_proj(attn_output)), attn_weights


class SparseWideGPTMLP(nn.Module):
    def __init__(self, config: SparseWideGPTConfig, layer_idx: int):
        super().__init__()
        self.fc_in = _block_linear(config, "fc_in", layer_idx, config.hidden_size, config.intermediate_size)
        self.fc_out = _block_linear(config, "fc_out", layer_idx, config.intermediate_size, config.hidden_size)
        self.act = ACT2FN[config.activation_function]
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, hidden_states):
        return self.dropout(self.fc_out(self.act(self.fc_in(hidden_states))))


class SparseWideGPTBlock(GradientCheckpointingLayer):
    def __init__(self, config: SparseWideGPTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = SparseWideGPTAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = SparseWideGPTMLP(config, layer_idx)

    def forward(self, hidden_states, attention_mask=None, past_key_values=None, use_cache=False, **kwargs):
        attn_output, attn_weights = self.attn(
            self.ln_1(hidden_states), attention_mask=attention_mask, past_key_values=past_key_values, **kwargs)
        hidden_states = hidden_states + attn_output
        hidden_states = hidden_states + self.mlp(self.ln_2(hidden_states))
        return hidden_states, attn_weights


# ----------------------------------------------------------------------------------------------
# Pre-trained model plumbing
# ----------------------------------------------------------------------------------------------
class SparseWideGPTPreTrainedModel(SparseCheckpointMixin, PreTrainedModel):
    config_class = SparseWideGPTConfig
    config: SparseWideGPTConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["SparseWideGPTBlock"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True

    @torch.no_grad()
    def _init_weights(self, module):
        """GPT-2 initialisation; sparse layers get the same dense init, then their mask zeroes it.

        Weights: N(0, 0.02), residual projections (o_proj, fc_out) N(0, 0.02/sqrt(2·n_layer)), biases 0,
        LayerNorm 1/0. A `SparseLinear` keeps the std of its dense counterpart (the widened layer is
        initialised like a dense layer of its size, then masked), so active weights have GPT-2 scale.
        Masks are drawn only when none was loaded; weights are multiplied by the mask in every case.
        """
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            if getattr(module, "residual_projection", False):
                std = std / math.sqrt(2 * self.config.n_layer)
            if not getattr(module.weight, "_is_hf_initialized", False):
                module.weight.normal_(mean=0.0, std=std)
            if module.bias is not None and not getattr(module.bias, "_is_hf_initialized", False):
                module.bias.zero_()
            if isinstance(module, SparseLinear):
                if not getattr(module.weight_mask, "_is_hf_initialized", False):
                    module.weight_mask.copy_(module.random_mask())
                module.weight.mul_(module.weight_mask)
        elif isinstance(module, nn.Embedding):
            if not getattr(module.weight, "_is_hf_initialized", False):
                module.weight.normal_(mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            if not getattr(module.weight, "_is_hf_initialized", False):
                module.weight.fill_(1.0)
            if not getattr(module.bias, "_is_hf_initialized", False):
                module.bias.zero_()


def _causal_mask(config, inputs_embeds, attention_mask, past_key_values, position_ids, past_seen):
    """`create_causal_mask` across transformers 5.x: older releases also take `cache_position`."""
    kwargs = dict(config=config, attention_mask=attention_mask, past_key_values=past_key_values,
                  position_ids=position_ids)
    params = _CAUSAL_MASK_PARAMS
    kwargs["inputs_embeds" if "inputs_embeds" in params else "input_embeds"] = inputs_embeds
    if "cache_position" in params:
        kwargs["cache_position"] = torch.arange(
            past_seen, past_seen + inputs_embeds.shape[1], device=inputs_embeds.device)
    return create_causal_mask(**kwargs)


_CAUSAL_MASK_PARAMS = frozenset(inspect.signature(create_causal_mask).parameters)
# Attention implementations that are causal by themselves when given no mask.
_CAUSAL_KERNELS = ("sdpa", "flash_attention_2", "flash_attention_3")


class SparseWideGPTModel(SparseWideGPTPreTrainedModel):
    def __init__(self, config: SparseWideGPTConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.wpe = nn.Embedding(config.n_positions, config.hidden_size)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList([SparseWideGPTBlock(config, i) for i in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, new_embeddings):
        self.wte = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds")
        # A KV cache is for generation: in training it would only cost memory and copies.
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if self.gradient_checkpointing and self.training:
            use_cache = False
        kwargs.pop("cache_position", None)
        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past_seen, past_seen + inputs_embeds.shape[1], device=inputs_embeds.device)
            position_ids = position_ids.unsqueeze(0)
        if attention_mask is None and past_key_values is None and self.config._attn_implementation in _CAUSAL_KERNELS:
            # Training and plain full-sequence forwards: the kernel applies causality itself (is_causal). An
            # explicit mask would force slower SDPA kernels (transformers builds one whenever torch.compile traces).
            causal_mask = None
        else:
            causal_mask = _causal_mask(self.config, inputs_embeds, attention_mask, past_key_values, position_ids,
                                       past_seen)

        hidden_states = self.drop(inputs_embeds + self.wpe(position_ids))
        all_hidden_states = () if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for block in self.h:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states, attn_weights = block(
                hidden_states, attention_mask=causal_mask, past_key_values=past_key_values,
                use_cache=use_cache, position_ids=position_ids, **kwargs)
            if output_attentions:
                all_attentions += (attn_weights,)
        hidden_states = self.ln_f(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states, past_key_values=past_key_values if use_cache else None,
            hidden_states=all_hidden_states, attentions=all_attentions)


class SparseWideGPTForCausalLM(SparseWideGPTPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: SparseWideGPTConfig):
        super().__init__(config)
        self.transformer = SparseWideGPTModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """`labels` give the standard shifted causal-LM loss (-100 is ignored), like GPT2LMHeadModel."""
        outputs = self.transformer(
            input_ids, past_key_values=past_key_values, attention_mask=attention_mask,
            position_ids=position_ids, inputs_embeds=inputs_embeds, use_cache=use_cache,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, **kwargs)
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:, :]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden_states = hidden_states[:, logits_to_keep, :]
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **kwargs)
        output = CausalLMOutputWithPast(
            loss=loss, logits=logits, past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states, attentions=outputs.attentions)
        return output if return_dict is not False else output.to_tuple()


__all__ = ["SparseLinear", "derive_seed", "SparseWideGPTPreTrainedModel", "SparseWideGPTModel", "SparseWideGPTForCausalLM"]
