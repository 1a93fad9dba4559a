"""Sparse Wide GPT: the GPT-2/GPT-3 decoder, widened by Sparse-IFT, with masked sparse block linears.

Architecture is GPT-2's (learned positions, pre-LayerNorm, GELU MLP, tied embeddings), so at
sparsity 0 the model computes exactly what `GPT2LMHeadModel` computes (see `convert_gpt2.py`). The
difference: every block linear named in ``config.sparse_layers`` is a `SparseLinear`, which owns a
boolean mask saved in the checkpoint.

Why the forward pass costs one plain dense matmul: inactive weights are kept *exactly zero* (they
are zeroed at init, regrown weights start at zero, and their gradient is masked so no optimizer step
moves them), so ``W`` equals ``W * mask`` and the forward is ``F.linear(x, W)`` with no mask
multiply. The mask is applied once per step, to the weight gradient, in `_MaskGradient.backward`.

The rest follows the in-tree transformers models (GPT-2, Llama): the attention kernel is looked up
in ``ALL_ATTENTION_FUNCTIONS`` at call time, masks come from `masking_utils` (padding, KV cache and
packed sequences), hidden states and attentions are recorded by the output-capturing decorator from
``_can_record_outputs``, and ``return_dict`` follows the call or the config.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask, find_packed_sequence_indices
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, slice_logits_to_keep
from transformers.utils import can_return_tuple, logging
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .condensed_linear import install_condensed_layers
from .configuration_sparse_wide_gpt import SparseWideGPTConfig
from .errors import UsageError
from .sparse_checkpoint import SparseCheckpointMixin, init_block_index, init_mask
from .sparse_layers import BlockSparseLinear, SparseLinear, block_linear, effective_weight, fusable

logger = logging.get_logger(__name__)


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
        self.attention_dropout = config.attn_pdrop
        self.is_causal = True
        d = config.hidden_size
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self, name, block_linear(config, name, layer_idx, d, d))
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, hidden_states, attention_mask=None, cache: Cache | None = None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        projections = (self.q_proj, self.k_proj, self.v_proj)
        if torch.is_grad_enabled() and all(fusable(p) for p in projections):
            # Training: one matmul for q, k and v (a wider GEMM runs closer to peak than three narrow ones);
            # concatenating the weights costs about what autocast's bf16 copy of them costs anyway. Not at
            # inference: decoding is memory-bound and the concatenation would copy 3·d² weights per token.
            weight = torch.cat([effective_weight(p) for p in projections])
            bias = torch.cat([p.bias for p in projections])
            qkv = F.linear(hidden_states, weight, bias).chunk(3, dim=-1)
        else:
            qkv = tuple(p(hidden_states) for p in projections)
        width = qkv[0].shape[-1]
        if width % self.head_dim:
            raise UsageError(
                f"q_proj gives {width} features here, not a whole number of heads of size {self.head_dim}: under "
                f"tensor parallelism the TP size must divide n_head={self.config.n_head}"
            )
        query, key, value = (t.view(*input_shape, -1, self.head_dim).transpose(1, 2) for t in qkv)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)

        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        pad = 0
        if attention_interface is not eager_attention_forward:
            # Fused kernels (flash / memory-efficient) need head sizes that are multiples of 8; the paper's
            # SW-50 width gives 1092 / 12 = 91. Zero-padding q, k, v to 96 leaves every dot product and the
            # output unchanged (the scale stays 1/sqrt(91)) and keeps the fast kernel.
            pad = -self.head_dim % 8
            if pad:
                query, key, value = (F.pad(t, (0, pad)) for t in (query, key, value))
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        if pad:
            attn_output = attn_output[..., : self.head_dim]
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.resid_dropout(self.o_proj(attn_output)), attn_weights


class SparseWideGPTMLP(nn.Module):
    def __init__(self, config: SparseWideGPTConfig, layer_idx: int):
        super().__init__()
        self.fc_in = block_linear(config, "fc_in", layer_idx, config.hidden_size, config.intermediate_size)
        self.fc_out = block_linear(config, "fc_out", layer_idx, config.intermediate_size, config.hidden_size)
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

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, hidden_states, attention_mask=None, cache: Cache | None = None, use_cache=False, **kwargs):
        attn_output, _ = self.attn(self.ln_1(hidden_states), attention_mask=attention_mask, cache=cache, **kwargs)
        hidden_states = hidden_states + attn_output
        return hidden_states + self.mlp(self.ln_2(hidden_states))


# ----------------------------------------------------------------------------------------------
# Pre-trained model plumbing
# ----------------------------------------------------------------------------------------------
class SparseWideGPTPreTrainedModel(SparseCheckpointMixin, PreTrainedModel):
    config_class = SparseWideGPTConfig
    config: SparseWideGPTConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["SparseWideGPTBlock"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # One graph for masked and block models (the block product is a torch.library op): tests/models/test_compile.py
    # shows it on CPU; on CUDA the same op runs the Triton kernel, not yet compiled there by a test.
    _can_compile_fullgraph = True
    _can_record_outputs = {
        "hidden_states": SparseWideGPTBlock,
        "attentions": OutputRecorder(SparseWideGPTAttention, index=1),
    }

    @torch.no_grad()
    def _init_weights(self, module):
        """GPT-2 initialisation; sparse layers get the same dense init, then their mask zeroes it.

        Weights: N(0, 0.02), residual projections (o_proj, fc_out) N(0, 0.02/sqrt(2·n_layer)), biases 0,
        LayerNorm 1/0. A `SparseLinear` keeps the std of its dense counterpart (the widened layer is
        initialised like a dense layer of its size, then masked), so active weights have GPT-2 scale.
        Anything `from_pretrained` loaded is left as loaded (the `init` functions skip it). A mask is drawn
        from its seed only when it was neither loaded nor drawn yet, and never next to loaded weights: then it is
        read off their non-zero pattern, which `from_pretrained` refuses unless asked (see `sparse_checkpoint.init_mask`).
        """
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            if getattr(module, "residual_projection", False):
                std = std / math.sqrt(2 * self.config.n_layer)
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
            if isinstance(module, SparseLinear):
                init_mask(module)
        elif isinstance(module, BlockSparseLinear):
            # The active blocks of a dense layer initialised as above (the entries are independent draws).
            if module.residual_projection:
                std = std / math.sqrt(2 * self.config.n_layer)
            init.normal_(module.weight_blocks, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
            init_block_index(module)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)


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
        # A condensed model's config lists its condensed layers: they are built here, so that loading fills them.
        install_condensed_layers(self, config.sparse_format)
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, new_embeddings):
        self.wte = new_embeddings

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """GPT-2's forward. ``output_attentions`` / ``output_hidden_states`` / ``return_dict`` are read from the kwargs or
        the config by the output-capturing decorator. Unlike GPT-2, ``use_cache`` defaults to ``config.use_cache``
        only in eval mode: in training a KV cache would only cost memory and copies."""
        if (input_ids is None) == (inputs_embeds is None):
            raise UsageError("You must specify exactly one of input_ids or inputs_embeds")
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            use_cache = False
        kwargs.pop("cache_position", None)
        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past_seen = cache.get_seq_length() if cache is not None else 0
        packed = False
        if position_ids is None:
            end = past_seen + inputs_embeds.shape[1]
            if end > self.config.n_positions:  # else an IndexError from the position embedding, naming nothing
                raise UsageError(
                    f"the input reaches position {end} ({past_seen} cached + {inputs_embeds.shape[1]} new tokens) but "
                    f"the model has n_positions={self.config.n_positions}: give at most {self.config.n_positions} "
                    f"tokens (tokenizer(..., truncation=True, max_length={self.config.n_positions}))"
                )
            position_ids = torch.arange(past_seen, end, device=inputs_embeds.device)
            position_ids = position_ids.unsqueeze(0)
        elif attention_mask is None and past_seen == 0:
            # Padding-free batches (DataCollatorWithFlattening): positions restart at 0 at each document, and a
            # document must not see the ones before it. Detected as transformers does (positions not +1 apart).
            packed = find_packed_sequence_indices(position_ids.expand(inputs_embeds.shape[0], -1)) is not None
        if (
            attention_mask is None
            and cache is None
            and not packed
            and self.config._attn_implementation in _CAUSAL_KERNELS
        ):
            # Training and plain full-sequence forwards: the kernel applies causality itself (is_causal). An
            # explicit mask would force slower SDPA kernels (transformers builds one whenever torch.compile traces).
            causal_mask = None
        elif packed and cache is not None:
            # masking_utils only looks for packing without a cache. An empty dynamic cache holds exactly this
            # forward's keys, so the mask built without it is the same mask, with the documents separated.
            if getattr(cache, "is_compileable", False):
                raise UsageError(
                    "position_ids restart inside a row (packed sequences) but the KV cache is a static one, whose "
                    "masks cannot separate the documents: pass use_cache=False (or a DynamicCache) for packed inputs"
                )
            causal_mask = create_causal_mask(
                config=self.config,
                inputs_embeds=inputs_embeds,
                attention_mask=None,
                cache=None,
                position_ids=position_ids,
            )
        else:
            causal_mask = create_causal_mask(
                config=self.config,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                cache=cache,
                position_ids=position_ids,
            )

        position_embeds = self.wpe(position_ids).to(inputs_embeds.device)
        hidden_states = self.drop(inputs_embeds + position_embeds)
        for block in self.h:
            hidden_states = block(
                hidden_states,
                attention_mask=causal_mask,
                cache=cache,
                use_cache=use_cache,
                position_ids=position_ids,
                **kwargs,
            )
        hidden_states = self.ln_f(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache if use_cache else None)


class SparseWideGPTForCausalLM(SparseWideGPTPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: SparseWideGPTConfig):
        super().__init__(config)
        self.transformer = SparseWideGPTModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """`labels` give the standard shifted causal-LM loss (-100 is ignored), like GPT2LMHeadModel."""
        # return_dict=True: the base model must hand back its output object whatever config.return_dict says
        # (this class's decorator turns the final output into a tuple when asked).
        outputs = self.transformer(
            input_ids,
            cache=cache,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            cache=outputs.cache,
        )


__all__ = ["SparseWideGPTForCausalLM", "SparseWideGPTModel", "SparseWideGPTPreTrainedModel"]
