"""Configuration of Sparse Wide GPT: a GPT-2/GPT-3 decoder widened by Sparse-IFT.

The user gives the *dense* architecture and one number, the sparsity s. The config derives the
widened sizes (``hidden_size``, ``intermediate_size``) and the sparsity each sparse layer actually has
(``layer_sparsity``) from them, so the FLOPs stay those of the dense model.
"""

from __future__ import annotations

import difflib
import inspect
import math

from transformers import PretrainedConfig
from transformers.utils import logging

from .block_sparse_layout import KERNEL_CHOICES as BLOCK_KERNELS
from .compat import check_versions
from .errors import UsageError
from .iso_flop import (
    BLOCK_LINEARS,
    GPTShape,
    calibrate_sparsity,
    check_iso_flop,
    sparse_wide_widths,
    stored_flops_mismatch,
)

# The first module of the model that loads, in this package and as remote code: refuse unsupported releases here,
# with one message, instead of failing later inside a forward pass.
check_versions()

logger = logging.get_logger(__name__)


def _fail(field: str, value, allowed: str):
    raise UsageError(f"SparseWideGPTConfig.{field}={value!r} is invalid: {allowed}")


def _int_at_least(field: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        _fail(field, value, f"expected an integer >= {low}")
    return value


def _block(value) -> tuple[int, int]:
    """``sparsity_block`` as (rows, cols): an integer B is a square B×B block."""
    pair = [value, value] if isinstance(value, int) else value
    if (
        not isinstance(pair, (list, tuple))
        or len(pair) != 2
        or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in pair)
    ):
        _fail("sparsity_block", value, "expected an integer >= 1 or a pair [rows, cols] of them")
    return pair[0], pair[1]


BLOCK_FAN_INS = ("any", "constant")


def _storage_format(value) -> dict | None:
    if value is not None and not (isinstance(value, dict) and isinstance(value.get("format"), str)):
        _fail("sparse_format", value, 'expected None or a mapping with a "format" name')
    return value


def _positive(field: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        _fail(field, value, "expected a number > 0")
    return float(value)


def _prob(field: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        _fail(field, value, "expected a number in [0, 1)")
    return float(value)


# How close (difflib ratio) an unknown key must be to one of our argument names to count as a typo of it.
_TYPO_CUTOFF = 0.85


_TP_PLAN = {
    "wte": "embedding_rowwise",  # vocabulary-sharded, like the (tied) lm_head's colwise shards
    "h.*.attn.q_proj": "colwise",
    "h.*.attn.k_proj": "colwise",
    "h.*.attn.v_proj": "colwise",
    "h.*.attn.o_proj": "rowwise",
    "h.*.mlp.fc_in": "colwise",
    "h.*.mlp.fc_out": "rowwise",
}


_PP_PLAN = {
    "wte": (["input_ids"], ["inputs_embeds"]),
    "wpe": (["position_ids"], ["position_embeds"]),
    "h": (["hidden_states", "attention_mask"], ["hidden_states"]),
    "ln_f": (["hidden_states"], ["hidden_states"]),
}


_FSDP_PLAN = {
    "wte": "free_full_weight",
    "wpe": "free_full_weight",
    "h.*": "free_full_weight",
    "ln_f": "keep_full_weight",
}


class SparseWideGPTConfig(PretrainedConfig):
    r"""Configuration of [`SparseWideGPTForCausalLM`].

    Args:
        vocab_size: vocabulary size (GPT-2 BPE: 50257).
        n_positions: context length (learned position embeddings).
        n_layer: transformer blocks.
        n_head: attention heads (kept when widening; head size grows with width).
        dense_hidden_size: d_model of the dense model this one is iso-FLOP with (GPT-3 Small: 768).
        dense_intermediate_size: d_ff of that dense model (default 4·dense_hidden_size).
        sparsity: the Sparse-IFT hyperparameter s in [0, 1); layers widen by k = sqrt(1/(1-s)).
        width_multiple: None reproduces the paper's widths (Table 14); an integer (e.g. 64) rounds the
            widths to GPU-friendly multiples and re-calibrates the layer sparsity so the sparse layers'
            FLOPs equal the dense model's (within 1e-6).
        sparse_layers: which block linears are sparse (subset of q_proj, k_proj, v_proj, o_proj, fc_in,
            fc_out). Embeddings, positions, LM head, norms and biases are always dense.
        mask_seed: seed of the initial random masks (each layer draws from its own generator).
        sparsity_block: 1 (default) for unstructured masks; an integer B or a pair [rows, cols] for masks made of
            whole blocks: each sparse layer is then a `BlockSparseLinear`, which stores and computes only its active
            blocks. Widths become multiples of the block (``width_multiple`` defaults to it and must be a multiple of
            it), and the layer sparsity is calibrated in whole blocks.
        block_fan_in: ``"any"`` (default): the active blocks fall anywhere in a layer; ``"constant"``: every
            block-row (group of ``rows`` output features) keeps the same number of active blocks (block masks only).
        block_kernel: the kernel the block-sparse layers compute with: ``"auto"`` (default: ``cpu`` on CPU
            tensors, ``triton`` on CUDA ones where it can, else ``torch-bsr``, else ``reference``), or one of
            ``cpu``, ``triton``, ``torch-bsr``, ``reference``, which is refused where it cannot compute
            (``docs/kernels.md``). A run-time setting: it changes speed, not results.
        sparse_format: how `save_pretrained` stored the sparse layers: None (weights plus bool masks),
            ``{"format": "bitmask-values-v1", ...}`` or ``{"format": "condensed-v1"}`` (`sparse_safetensors.py`).
        activation_function, resid_pdrop, embd_pdrop, attn_pdrop, layer_norm_epsilon,
        initializer_range, tie_word_embeddings, use_cache, bos/eos/pad_token_id: as in GPT2Config.

    Derived (read-only): ``hidden_size``, ``intermediate_size``, ``head_dim``, ``layer_sparsity``. A saved
    config.json holds all four and they load as stored (a checkpoint keeps the sizes it was built with, even if a later
    release rounds or calibrates differently; a warning names the FLOPs when they are more than 1% apart).
    """

    model_type = "sparse_wide_gpt"
    # Output keys Trainer.evaluate / predict drop (the KV cache); older transformers called it past_key_values.
    keys_to_ignore_at_inference = ["cache", "past_key_values"]
    # Tensor parallelism (``from_pretrained(..., tp_plan="auto")``), as Llama's: q/k/v and fc_in split by output
    # features (heads / hidden units), o_proj and fc_out by input features, then all-reduced. The model runs the
    # three projections separately when they are sharded (its fused q/k/v matmul is for unsharded weights), and
    # each `weight_mask` is sharded exactly like its weight after loading.
    base_model_tp_plan = _TP_PLAN
    base_model_pp_plan = _PP_PLAN
    base_model_fsdp_plan = _FSDP_PLAN
    # What each argument is, for the code that rebuilds or converts configs (the study's arms, GPT-2 conversion, block
    # layouts): the arguments are `arguments()`, read off __init__; these say which of them make a dense model sparse,
    # which are run-time settings and which record how a checkpoint was stored. The rest describe the dense model.
    sparsification_arguments = ("sparsity", "mask_seed", "sparsity_block", "block_fan_in")
    runtime_arguments = ("use_cache", "block_kernel")
    storage_arguments = ("sparse_format",)
    # Derived sizes, written to config.json so that tools which read the JSON see the real shapes. A config holding all
    # of them (a saved config.json) is used as stored (`_use_stored`); any of them given alone must agree with what the
    # dense sizes and sparsity imply.
    derived_keys = ("hidden_size", "intermediate_size", "layer_sparsity", "head_dim")
    attribute_map = {
        "n_embd": "hidden_size",
        "num_hidden_layers": "n_layer",
        "num_attention_heads": "n_head",
        "max_position_embeddings": "n_positions",
        "n_ctx": "n_positions",
    }

    def __init__(
        self,
        vocab_size: int = 50257,
        n_positions: int = 2048,
        n_layer: int = 12,
        n_head: int = 12,
        dense_hidden_size: int = 768,
        dense_intermediate_size: int | None = None,
        sparsity: float = 0.0,
        width_multiple: int | None = None,
        sparse_layers: list[str] | tuple[str, ...] = BLOCK_LINEARS,
        mask_seed: int = 0,
        sparsity_block: int | list[int] | tuple[int, int] = 1,
        block_fan_in: str = "any",
        block_kernel: str = "auto",
        activation_function: str = "gelu_new",
        resid_pdrop: float = 0.0,
        embd_pdrop: float = 0.0,
        attn_pdrop: float = 0.0,
        layer_norm_epsilon: float = 1e-5,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = True,
        use_cache: bool = True,
        bos_token_id: int | None = 50256,
        eos_token_id: int | None = 50256,
        pad_token_id: int | None = None,
        sparse_format: dict | None = None,
        **kwargs,
    ):
        derived = {k: kwargs.pop(k) for k in self.derived_keys if k in kwargs}
        # GPT-2 style aliases (n_embd, num_hidden_layers, ...) may appear in configs written by other tools:
        # they must agree with the value they stand for, like the derived sizes. Checked first, so that the first
        # error names the value the caller set (num_attention_heads=2, not the default n_head it disagrees with).
        aliases = {k: kwargs.pop(k) for k in self.attribute_map if k in kwargs}
        _check_aliases(self, aliases, {"n_layer": n_layer, "n_head": n_head, "n_positions": n_positions})
        _warn_near_misses(kwargs)

        self._set_architecture(
            vocab_size,
            n_positions,
            n_layer,
            n_head,
            dense_hidden_size,
            dense_intermediate_size,
            activation_function,
            layer_norm_epsilon,
            initializer_range,
        )
        self._set_sparsity(sparsity, width_multiple, sparse_layers, mask_seed)
        self._set_blocks(sparsity_block, block_fan_in)
        if block_kernel not in BLOCK_KERNELS:
            _fail("block_kernel", block_kernel, f"expected one of {list(BLOCK_KERNELS)}")
        self.block_kernel = block_kernel
        self.sparse_format = _storage_format(sparse_format)
        self.resid_pdrop = _prob("resid_pdrop", resid_pdrop)
        self.embd_pdrop = _prob("embd_pdrop", embd_pdrop)
        self.attn_pdrop = _prob("attn_pdrop", attn_pdrop)
        self.use_cache = use_cache
        self._derive_widths()
        if self.width_multiple is not None and self.sparsity and set(derived) != set(self.derived_keys):
            check_iso_flop(self.dense_shape(), self.shape())  # calibrated here; a checkpoint's stored sizes load as is
        _check_given(self, derived)
        _check_aliases(self, aliases, {key: getattr(self, key) for key in self.derived_keys})
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    # ------------------------------------------------------------------------------------------
    def _set_architecture(
        self,
        vocab_size,
        n_positions,
        n_layer,
        n_head,
        dense_hidden_size,
        dense_intermediate_size,
        activation_function,
        layer_norm_epsilon,
        initializer_range,
    ) -> None:
        from transformers.activations import ACT2FN

        self.vocab_size = _int_at_least("vocab_size", vocab_size, 1)
        self.n_positions = _int_at_least("n_positions", n_positions, 1)
        self.n_layer = _int_at_least("n_layer", n_layer, 1)
        self.n_head = _int_at_least("n_head", n_head, 1)
        self.dense_hidden_size = _int_at_least("dense_hidden_size", dense_hidden_size, 1)
        if dense_intermediate_size is None:
            dense_intermediate_size = 4 * dense_hidden_size
        self.dense_intermediate_size = _int_at_least("dense_intermediate_size", dense_intermediate_size, 1)
        if dense_hidden_size % n_head:
            _fail("n_head", n_head, f"must divide dense_hidden_size={dense_hidden_size}")
        if activation_function not in ACT2FN:
            _fail("activation_function", activation_function, f"expected one of {sorted(ACT2FN)}")
        self.activation_function = activation_function
        self.layer_norm_epsilon = _positive("layer_norm_epsilon", layer_norm_epsilon)
        self.initializer_range = _positive("initializer_range", initializer_range)

    def _set_sparsity(self, sparsity, width_multiple, sparse_layers, mask_seed) -> None:
        self.sparsity = _prob("sparsity", sparsity)
        self.width_multiple = None if width_multiple is None else _int_at_least("width_multiple", width_multiple, 1)
        sparse_layers = list(sparse_layers)
        bad = [name for name in sparse_layers if name not in BLOCK_LINEARS]
        if bad or len(set(sparse_layers)) != len(sparse_layers):
            _fail("sparse_layers", sparse_layers, f"expected distinct names from {list(BLOCK_LINEARS)}")
        if self.sparsity > 0 and not sparse_layers:
            _fail("sparse_layers", sparse_layers, "must name at least one layer when sparsity > 0")
        self.sparse_layers = [name for name in BLOCK_LINEARS if name in sparse_layers]
        self.mask_seed = _int_at_least("mask_seed", mask_seed, 0)

    def _set_blocks(self, sparsity_block, block_fan_in) -> None:
        rows, cols = _block(sparsity_block)
        self.sparsity_block = rows if rows == cols else [rows, cols]
        if block_fan_in not in BLOCK_FAN_INS:
            _fail("block_fan_in", block_fan_in, f"expected one of {list(BLOCK_FAN_INS)}")
        if block_fan_in == "constant" and (rows, cols) == (1, 1):
            _fail(
                "block_fan_in",
                block_fan_in,
                "a constant block fan-in needs sparsity_block > 1 (for unstructured masks with a constant fan-in, "
                "train with the DST method srigl)",
            )
        self.block_fan_in = block_fan_in
        if self.sparsity == 0 or (rows, cols) == (1, 1):
            return
        # Every width is both the input of one sparse layer and the output of another: whole blocks both ways.
        multiple = math.lcm(rows, cols)
        if self.width_multiple is None:
            self.width_multiple = multiple
        elif self.width_multiple % multiple:
            _fail(
                "width_multiple",
                self.width_multiple,
                f"must be a multiple of the sparsity block {self.sparsity_block} (here {multiple}), so that the "
                f"widths are whole blocks",
            )

    @property
    def block_shape(self) -> tuple[int, int]:
        """``sparsity_block`` as (rows, cols); (1, 1) for unstructured masks."""
        return _block(self.sparsity_block)

    @property
    def uses_blocks(self) -> bool:
        """Whether the sparse layers are `BlockSparseLinear` (block masks) rather than `SparseLinear`."""
        return self.sparsity > 0 and self.block_shape != (1, 1)

    def _derive_widths(self) -> None:
        """Widths k = sqrt(1/(1-s)) times the dense ones; with a width multiple, the layer sparsity that keeps
        the sparse layers' FLOPs those of the dense model."""
        self.hidden_size, self.intermediate_size = sparse_wide_widths(
            self.dense_hidden_size, self.dense_intermediate_size, self.n_head, self.sparsity, self.width_multiple
        )
        self.head_dim = self.hidden_size // self.n_head
        if self.width_multiple is None or self.sparsity == 0.0:
            self.layer_sparsity = self.sparsity
        else:
            self.layer_sparsity = calibrate_sparsity(
                self.dense_shape(), self.shape(layer_sparsity=0.0), scope="sparse_layers"
            )

    # ------------------------------------------------------------------------------------------
    @classmethod
    def arguments(cls) -> tuple[str, ...]:
        """The arguments of the config, in the order of its signature (derived sizes are not arguments)."""
        params = inspect.signature(cls.__init__).parameters
        return tuple(n for n, p in params.items() if n != "self" and p.kind is p.POSITIONAL_OR_KEYWORD)

    def dense_arguments(self) -> dict:
        """The arguments that describe the dense model (its architecture, width rounding and which layers may be
        sparse), with this config's values: every argument but the sparsification, run-time and storage ones."""
        skip = self.sparsification_arguments + self.runtime_arguments + self.storage_arguments
        values = {key: getattr(self, key) for key in self.arguments() if key not in skip}
        values["sparse_layers"] = list(values["sparse_layers"])
        return values

    def replace(self, **changes) -> SparseWideGPTConfig:
        """A new config with this one's arguments and `changes`; derived sizes are derived anew, and the storage
        format (how a checkpoint was saved) is not carried over."""
        values = {key: getattr(self, key) for key in self.arguments() if key not in self.storage_arguments}
        unknown = sorted(set(changes) - set(values))
        if unknown:
            _fail(unknown[0], changes[unknown[0]], f"not an argument of SparseWideGPTConfig: {list(self.arguments())}")
        return type(self)(**{**values, **changes})

    def shape(self, seq_len: int | None = None, layer_sparsity: float | None = None) -> GPTShape:
        """Sizes of this (widened) model for the FLOP counter in `iso_flop`."""
        return GPTShape(
            n_layer=self.n_layer,
            d_model=self.hidden_size,
            d_ff=self.intermediate_size,
            vocab_size=self.vocab_size,
            seq_len=seq_len or self.n_positions,
            layer_sparsity=self.layer_sparsity if layer_sparsity is None else layer_sparsity,
            sparse_layers=tuple(self.sparse_layers) if self.sparsity > 0 else (),
            sparsity_block=self.block_shape,
            block_fan_in=self.block_fan_in,
        )

    def dense_shape(self, seq_len: int | None = None) -> GPTShape:
        """Sizes of the dense model this one is iso-FLOP with."""
        return GPTShape(
            n_layer=self.n_layer,
            d_model=self.dense_hidden_size,
            d_ff=self.dense_intermediate_size,
            vocab_size=self.vocab_size,
            seq_len=seq_len or self.n_positions,
            layer_sparsity=0.0,
            sparse_layers=tuple(self.sparse_layers),
        )


def _check_given(config: SparseWideGPTConfig, derived: dict) -> None:
    """Derived sizes given alone must agree with what was derived; a saved config's derived sizes are used as stored."""
    if derived.keys() == set(config.derived_keys):
        _use_stored(config, derived)
        return
    for key, value in derived.items():
        mine = getattr(config, key)
        if (abs(mine - value) > 1e-12) if isinstance(mine, float) else mine != value:
            _fail(key, value, f"it is derived from the dense sizes and sparsity, which give {mine!r}")


def _use_stored(config: SparseWideGPTConfig, stored: dict) -> None:
    """A saved config.json holds every derived size: they are what the checkpoint's tensors were built with, so they
    are used as stored, even where this code's rounding or calibration gives other numbers (the weights' shapes are
    checked when they load). A warning names both FLOP figures when the stored sizes put the sparse layers' FLOPs more
    than `STORED_FLOPS_RTOL` from the derived ones."""
    derived = config.shape()
    config.hidden_size = _int_at_least("hidden_size", stored["hidden_size"], 1)
    config.intermediate_size = _int_at_least("intermediate_size", stored["intermediate_size"], 1)
    if config.hidden_size % config.n_head:
        _fail("hidden_size", config.hidden_size, f"must be a multiple of n_head={config.n_head}")
    if stored["head_dim"] != config.hidden_size // config.n_head:
        _fail("head_dim", stored["head_dim"], f"expected hidden_size / n_head = {config.hidden_size // config.n_head}")
    config.head_dim = stored["head_dim"]
    config.layer_sparsity = _prob("layer_sparsity", stored["layer_sparsity"])
    mismatch = stored_flops_mismatch(config.shape(), derived)
    if mismatch:
        logger.warning(f"SparseWideGPTConfig: {mismatch}. Using the stored sizes, which the checkpoint was built with.")


def _check_aliases(config: SparseWideGPTConfig, aliases: dict, targets: dict) -> None:
    """GPT-2 style aliases whose targets are in `targets` must agree with them."""
    for key, value in aliases.items():
        target = config.attribute_map[key]
        if target in targets and targets[target] != value:
            instead = "dense_hidden_size and sparsity" if target in config.derived_keys else target
            _fail(key, value, f"it is an alias of {target}={targets[target]!r}; set {instead} instead")


def _warn_near_misses(extra: dict) -> None:
    """Warn about extra keys that look like typos of our own arguments (``sparsty`` for ``sparsity``).

    They are kept as extra attributes like any other unknown key, never refused: tools set generic attributes on
    every config (transformers' `set_config_for_less_flaky_test` sets ``layer_norm_eps``), and a config that went
    through one must still save and load.
    """
    own = SparseWideGPTConfig.arguments() + SparseWideGPTConfig.derived_keys
    for key in sorted(extra):
        if not isinstance(key, str):
            continue
        close = difflib.get_close_matches(key, own, n=1, cutoff=_TYPO_CUTOFF)
        if close:
            logger.warning(
                f"SparseWideGPTConfig got unknown option {key!r}, kept as an extra attribute that the model does "
                f"not read: did you mean {close[0]!r}?"
            )


__all__ = ["SparseWideGPTConfig"]
