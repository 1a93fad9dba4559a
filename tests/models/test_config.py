import pytest
from transformers.testing_utils import CaptureLogger, set_config_for_less_flaky_test
from transformers.utils import logging as hf_logging

from hf_sparse_ift import SparseWideGPTConfig
from hf_sparse_ift.models.sparse_wide_gpt import configuration_sparse_wide_gpt
from hf_sparse_ift.resources import model_config


@pytest.mark.parametrize(
    "preset, d_model, d_ff, layer_s",
    [
        ("gpt3-small-dense", 768, 3072, 0.0),
        ("gpt3-small-sw50", 1092, 4344, 0.5),
        ("gpt3-small-sw75", 1536, 6144, 0.75),
        ("gpt3-small-sw90", 2436, 9715, 0.9),
    ],
)
def test_presets_reproduce_table14(preset, d_model, d_ff, layer_s):
    c = model_config(preset)
    assert (c.hidden_size, c.intermediate_size, c.layer_sparsity) == (d_model, d_ff, layer_s)
    assert (c.num_hidden_layers, c.num_attention_heads, c.max_position_embeddings, c.vocab_size) == (
        12,
        12,
        2048,
        50257,
    )
    assert c.n_embd == c.hidden_size and c.head_dim * c.n_head == c.hidden_size


def test_width_multiple_recalibrates_to_stay_iso_flop():
    c = model_config("gpt3-small-sw50-w64")
    assert (c.hidden_size, c.intermediate_size, c.head_dim) == (1152, 4352, 96)
    from hf_sparse_ift.models.sparse_wide_gpt.iso_flop import count_flops

    dense_blocks = count_flops(c.dense_shape()).sparse_matmul
    assert abs(count_flops(c.shape()).sparse_matmul / dense_blocks - 1) < 1e-6
    assert 0.53 < c.layer_sparsity < 0.54


def test_default_sparse_layers_and_roundtrip(tmp_path):
    c = SparseWideGPTConfig(sparsity=0.5, width_multiple=64)
    assert c.sparse_layers == ["q_proj", "k_proj", "v_proj", "o_proj", "fc_in", "fc_out"]
    c.save_pretrained(tmp_path)
    again = SparseWideGPTConfig.from_pretrained(tmp_path)
    assert again.to_dict() == c.to_dict()


@pytest.mark.parametrize(
    "field, value",
    [
        ("sparsity", 1.0),
        ("sparsity", -0.01),
        ("sparsity", "half"),
        ("n_head", 5),
        ("n_head", 0),
        ("n_layer", -1),
        ("dense_hidden_size", 0),
        ("vocab_size", 2.5),
        ("dense_intermediate_size", -3),
        ("width_multiple", 0),
        ("sparse_layers", ["lm_head"]),
        ("sparse_layers", ["q_proj", "q_proj"]),
        ("mask_seed", -1),
        ("activation_function", "swishy"),
        ("resid_pdrop", 1.5),
        ("layer_norm_epsilon", 0.0),
        ("initializer_range", -1.0),
    ],
)
def test_invalid_values_name_the_field_and_the_value(field, value):
    with pytest.raises(ValueError) as err:
        SparseWideGPTConfig(**{field: value})
    assert field in str(err.value) and repr(value) in str(err.value)


def test_a_near_miss_of_an_own_argument_warns_and_is_kept(tmp_path):
    logger = hf_logging.get_logger(configuration_sparse_wide_gpt.__name__)
    with CaptureLogger(logger) as captured:
        config = SparseWideGPTConfig(sparsty=0.5)
    assert captured.out == (
        "SparseWideGPTConfig got unknown option 'sparsty', kept as an extra attribute that the model does not read: "
        "did you mean 'sparsity'?\n"
    )
    assert config.sparsty == 0.5 and config.sparsity == 0.0
    config.save_pretrained(tmp_path)
    with CaptureLogger(logger) as captured:
        assert SparseWideGPTConfig.from_pretrained(tmp_path).sparsty == 0.5
    assert "did you mean 'sparsity'?" in captured.out


def test_a_config_through_transformers_less_flaky_test_setter_saves_and_loads(tmp_path):
    """`set_config_for_less_flaky_test` sets every norm-epsilon name transformers knows (`layer_norm_eps`, a near-miss
    of our `layer_norm_epsilon`, among them) to 1.0; transformers' eager-vs-SDPA tests run it on every config."""
    config = SparseWideGPTConfig(sparsity=0.5)
    set_config_for_less_flaky_test(config)
    config.save_pretrained(tmp_path)
    again = SparseWideGPTConfig.from_pretrained(tmp_path)
    assert again.to_dict() == config.to_dict()
    assert again.layer_norm_epsilon == 1.0 and again.layer_norm_eps == 1.0 and again.rms_norm_eps == 1.0


def test_extra_keys_are_kept_and_round_trip(tmp_path):
    """Like every Hugging Face config: keys added by transformers, a quantizer or the user load and save back."""
    c = SparseWideGPTConfig(sparsity=0.5, width_multiple=64)
    d = c.to_dict()
    d.update(my_field={"a": 1}, forced_eos_token_id=3, quantization_config={"quant_method": "bitsandbytes"})
    again = SparseWideGPTConfig.from_dict(d)
    assert again.my_field == {"a": 1} and again.hidden_size == c.hidden_size
    assert again.to_dict()["quantization_config"] == {"quant_method": "bitsandbytes"}
    assert SparseWideGPTConfig.from_dict(again.to_dict()).to_dict() == again.to_dict()
    again.save_pretrained(tmp_path)
    assert SparseWideGPTConfig.from_pretrained(tmp_path).my_field == {"a": 1}


@pytest.mark.parametrize(
    "alias, value, target",
    [("n_embd", 10, "hidden_size"), ("num_hidden_layers", 4, "n_layer"), ("max_position_embeddings", 7, "n_positions")],
)
def test_gpt2_style_aliases_must_agree_with_what_they_stand_for(alias, value, target):
    with pytest.raises(ValueError, match=rf"{alias}={value} is invalid: it is an alias of {target}="):
        SparseWideGPTConfig(**{alias: value})
    assert SparseWideGPTConfig(n_layer=4, num_hidden_layers=4).num_hidden_layers == 4


def test_inconsistent_derived_size_in_a_saved_config_is_rejected():
    with pytest.raises(ValueError, match="hidden_size=1000"):
        SparseWideGPTConfig(sparsity=0.75, hidden_size=1000)


# --- one declaration of the arguments ---------------------------------------------------------------------------
def test_the_first_error_names_the_value_the_caller_set():
    with pytest.raises(ValueError, match=r"num_attention_heads=2 is invalid: it is an alias of n_head=12; set n_head"):
        SparseWideGPTConfig(num_attention_heads=2, dense_hidden_size=64)
    with pytest.raises(ValueError, match=r"n_embd=99 is invalid: it is an alias of hidden_size=1536"):
        SparseWideGPTConfig(sparsity=0.75, n_embd=99)


def test_arguments_are_read_off_the_signature_and_each_has_one_role():
    import inspect

    arguments = SparseWideGPTConfig.arguments()
    assert arguments == tuple(p for p in inspect.signature(SparseWideGPTConfig.__init__).parameters if p != "self")[:-1]
    roles = (
        SparseWideGPTConfig.sparsification_arguments
        + SparseWideGPTConfig.runtime_arguments
        + SparseWideGPTConfig.storage_arguments
    )
    assert set(roles) <= set(arguments) and len(set(roles)) == len(roles)
    assert not set(SparseWideGPTConfig.derived_keys) & set(arguments)
    dense = SparseWideGPTConfig(sparsity=0.75, sparsity_block=16, mask_seed=3).dense_arguments()
    assert set(dense) == set(arguments) - set(roles)
    assert SparseWideGPTConfig(**dense).sparsity == 0.0  # a dense model of the same architecture


def test_replace_makes_a_changed_copy_with_its_sizes_derived_anew():
    config = SparseWideGPTConfig(sparsity=0.5, mask_seed=7)
    wider = config.replace(sparsity=0.75)
    assert (wider.hidden_size, wider.intermediate_size, wider.mask_seed) == (1536, 6144, 7)
    assert (config.hidden_size, config.sparsity) == (1092, 0.5)  # the original is unchanged
    with pytest.raises(ValueError, match=r"sparsty=0.5 is invalid: not an argument of SparseWideGPTConfig"):
        config.replace(sparsty=0.5)
