"""Sparse Wide GPT against what transformers checks of its own models.

Shaped like transformers' per-model tests: a model tester (after `CausalLMModelTester`) builds tiny configs and
inputs, and the checks (after `ModelTesterMixin` / `GenerationTesterMixin`) run for a sparse config and for a
dense-width one (sparsity 0: plain `nn.Linear` block layers). Checks that need two processes are in
`test_modeling_parallel.py`.
"""

import copy
import logging
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.nn.attention import SDPBackend
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, set_seed
from transformers.initialization import no_init_weights
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, eager_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
from transformers.testing_utils import (
    CaptureLogger,
    LoggingLevel,
    set_config_for_less_flaky_test,
    set_model_for_less_flaky_test,
)
from transformers.utils import logging as hf_logging

from hf_sparse_ift import SparseWideGPTConfig, SparseWideGPTForCausalLM, SparseWideGPTModel
from hf_sparse_ift.models.sparse_wide_gpt import modeling_sparse_wide_gpt as modeling
from hf_sparse_ift.models.sparse_wide_gpt import sparse_checkpoint
from hf_sparse_ift.models.sparse_wide_gpt.convert_gpt2 import gpt2_to_sparse_wide
from hf_sparse_ift.sparsity import sparse_layers


def ids_tensor(shape, vocab_size, generator):
    return torch.randint(0, vocab_size, shape, generator=generator)


class SparseWideGPTModelTester:
    """Tiny configs and inputs, after transformers' `CausalLMModelTester`."""

    config_class = SparseWideGPTConfig
    base_model_class = SparseWideGPTModel
    causal_lm_class = SparseWideGPTForCausalLM

    def __init__(
        self,
        sparsity,
        batch_size=3,
        seq_length=7,
        vocab_size=99,
        dense_hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=32,
        seed=0,
    ):
        self.sparsity = sparsity
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.vocab_size = vocab_size
        self.dense_hidden_size = dense_hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def all_model_classes(self):
        return (self.base_model_class, self.causal_lm_class)

    @property
    def hidden_size(self):
        return self.get_config().hidden_size

    def get_config(self, **overrides):
        values = dict(
            vocab_size=self.vocab_size,
            n_positions=self.max_position_embeddings,
            n_layer=self.num_hidden_layers,
            n_head=self.num_attention_heads,
            dense_hidden_size=self.dense_hidden_size,
            sparsity=self.sparsity,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
        values.update(overrides)
        return self.config_class(**values)

    def prepare_config_and_inputs(self):
        input_ids = ids_tensor((self.batch_size, self.seq_length), self.vocab_size, self.generator)
        input_mask = torch.ones_like(input_ids)
        input_mask[0, :2] = 0  # one left-padded row
        token_labels = ids_tensor((self.batch_size, self.seq_length), self.vocab_size, self.generator)
        return self.get_config(), input_ids, input_mask, token_labels

    def prepare_config_and_inputs_for_common(self):
        config, input_ids, input_mask, _ = self.prepare_config_and_inputs()
        return config, {"input_ids": input_ids, "attention_mask": input_mask}

    def model(self, model_class, config=None, seed=0):
        torch.manual_seed(seed)
        return model_class(config or self.get_config()).eval()

    def create_and_check_model(self, config, input_ids, input_mask, token_labels):
        model = self.model(self.base_model_class, config)
        result = model(input_ids, attention_mask=input_mask)
        assert result.last_hidden_state.shape == (self.batch_size, self.seq_length, config.hidden_size)
        lm = self.model(self.causal_lm_class, config)
        out = lm(input_ids, attention_mask=input_mask, labels=token_labels)
        assert out.logits.shape == (self.batch_size, self.seq_length, self.vocab_size) and out.loss.ndim == 0


@pytest.fixture(params=[0.75, 0.0], ids=["sparse", "dense-width"])
def tester(request):
    return SparseWideGPTModelTester(sparsity=request.param)


def outputs_of(model, inputs, **kwargs):
    with torch.no_grad():
        return model(**inputs, **kwargs)


# ----------------------------------------------------------------------------------------------
# ModelTesterMixin basics
# ----------------------------------------------------------------------------------------------
def test_model(tester):
    tester.create_and_check_model(*tester.prepare_config_and_inputs())


def test_sparse_config_really_is_sparse(tester):
    model = tester.model(tester.causal_lm_class)
    assert bool(sparse_layers(model)) == (tester.sparsity > 0)


# ---------------------------------------------------------------------- issue 13.1: recorded outputs
@pytest.mark.parametrize("from_config", [False, True])
def test_hidden_states_output(tester, from_config):
    config, inputs = tester.prepare_config_and_inputs_for_common()
    config.output_hidden_states = from_config
    for model_class in tester.all_model_classes:
        model = tester.model(model_class, config)
        for implementation in ("eager", "sdpa"):
            model.set_attn_implementation(implementation)
            out = outputs_of(model, inputs, **({} if from_config else {"output_hidden_states": True}))
            hidden = out.hidden_states
            assert len(hidden) == tester.num_hidden_layers + 1
            assert all(h.shape == (tester.batch_size, tester.seq_length, config.hidden_size) for h in hidden)
            base = outputs_of(model.base_model, inputs)
            torch.testing.assert_close(hidden[-1], base.last_hidden_state)  # after ln_f, as GPT-2 / Llama
        assert outputs_of(model, inputs, output_hidden_states=False).hidden_states is None


@pytest.mark.parametrize("from_config", [False, True])
def test_attention_outputs(tester, from_config):
    config, inputs = tester.prepare_config_and_inputs_for_common()
    config._attn_implementation = "eager"
    config.output_attentions = from_config
    for model_class in tester.all_model_classes:
        model = tester.model(model_class, config)
        out = outputs_of(model, inputs, **({} if from_config else {"output_attentions": True}))
        attentions = out.attentions
        assert len(attentions) == tester.num_hidden_layers
        shape = (tester.batch_size, tester.num_attention_heads, tester.seq_length, tester.seq_length)
        assert all(a.shape == shape for a in attentions)
        torch.testing.assert_close(attentions[0].sum(-1)[1:], torch.ones(shape[:-1])[1:])  # rows are softmaxes
        assert torch.all(attentions[0][1:, :, 0, 1:] == 0)  # causal (row 0 is left-padded)
        assert outputs_of(model, inputs, output_attentions=False).attentions is None
        # Attention is always last, hidden states before it (the tuple order of ModelTesterMixin)
        both = outputs_of(model, inputs, output_attentions=True, output_hidden_states=True, return_dict=False)
        assert len(both[-1]) == tester.num_hidden_layers and len(both[-2]) == tester.num_hidden_layers + 1


def test_outputs_are_those_of_the_in_tree_gpt2():
    """At sparsity 0 the model is GPT-2: the recorded outputs must be GPT-2's, eager and SDPA alike."""
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=99, n_positions=32, n_embd=16, n_layer=2, n_head=2)).eval()
    ours = gpt2_to_sparse_wide(gpt2).eval()
    x = torch.randint(0, 99, (2, 9))
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    for implementation in ("eager", "sdpa"):
        gpt2.set_attn_implementation(implementation)
        ours.set_attn_implementation(implementation)
        kwargs = dict(attention_mask=mask, output_hidden_states=True, output_attentions=True)
        theirs, mine = outputs_of(gpt2, {"input_ids": x}, **kwargs), outputs_of(ours, {"input_ids": x}, **kwargs)
        assert set(mine.keys()) == set(theirs.keys()) - {"cross_attentions"}
        assert len(mine.hidden_states) == len(theirs.hidden_states) == 3
        for a, b in zip(mine.hidden_states, theirs.hidden_states):
            torch.testing.assert_close(a[1:], b[1:], rtol=0, atol=1e-5)  # row 0 is left-padded
        assert len(mine.attentions) == len(theirs.attentions) == (2 if implementation == "eager" else 0)
        for a, b in zip(mine.attentions, theirs.attentions):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_retain_grad_hidden_states_attentions(tester):
    config, inputs = tester.prepare_config_and_inputs_for_common()
    config._attn_implementation = "eager"
    model = tester.model(tester.causal_lm_class, config)
    out = model(**inputs, output_hidden_states=True, output_attentions=True)
    out.hidden_states[0].retain_grad()
    out.attentions[0].retain_grad()
    out.logits.flatten()[0].backward()
    assert out.hidden_states[0].grad is not None and out.attentions[0].grad is not None


# ---------------------------------------------------------------------- issue 13.2: return_dict
def test_model_outputs_equivalence(tester):
    """`return_dict=False` (call or config) gives `to_tuple()` of the dict output, for both classes."""
    config, inputs = tester.prepare_config_and_inputs_for_common()
    config._attn_implementation = "eager"
    for model_class in tester.all_model_classes:
        model = tester.model(model_class, config)
        for extra in ({}, {"output_hidden_states": True, "output_attentions": True}):
            as_dict = outputs_of(model, inputs, **extra).to_tuple()
            as_tuple = outputs_of(model, inputs, return_dict=False, **extra)
            model.config.return_dict = False
            from_config = outputs_of(model, inputs, **extra)
            model.config.return_dict = True
            for got in (as_tuple, from_config):
                assert type(got) is tuple and len(got) == len(as_dict)
                torch.testing.assert_close(got[0], as_dict[0])
                for a, b in zip(got, as_dict):
                    if isinstance(a, tuple):
                        assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
        assert not isinstance(outputs_of(model, inputs, return_dict=True), tuple)


# ---------------------------------------------------------------------- issue 13.4: packed sequences
def packed_documents(vocab_size, lengths=(5, 7, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(0, vocab_size, (n,), generator=g) for n in lengths]
    input_ids = torch.cat(docs)[None]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]  # as DataCollatorWithFlattening makes
    return docs, input_ids, position_ids


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_packed_sequences_match_separate_forwards(tester, implementation):
    model = tester.model(tester.causal_lm_class, tester.get_config(attn_implementation=implementation))
    docs, input_ids, position_ids = packed_documents(tester.vocab_size)
    with torch.no_grad():
        separate = torch.cat([model(d[None]).logits[0] for d in docs])
        for use_cache in (False, True):
            packed = model(input_ids, position_ids=position_ids, use_cache=use_cache).logits[0]
            torch.testing.assert_close(packed, separate, rtol=0, atol=1e-5)
    model.train()  # the training path (no cache), with the loss as DataCollatorWithFlattening labels it
    labels = input_ids.clone()
    labels[position_ids == 0] = -100
    packed = model(input_ids, position_ids=position_ids, labels=labels)
    torch.testing.assert_close(packed.logits[0], separate, rtol=0, atol=1e-5)
    per_doc = [(logits[:-1], d[1:]) for logits, d in zip(separate.split([len(d) for d in docs]), docs)]
    expected = torch.nn.functional.cross_entropy(
        torch.cat([logits for logits, _ in per_doc]), torch.cat([t for _, t in per_doc])
    )
    torch.testing.assert_close(packed.loss, expected, rtol=0, atol=1e-5)
    batch = {"input_ids": input_ids.expand(2, -1), "position_ids": position_ids}  # unexpanded position_ids
    torch.testing.assert_close(model(**batch).logits[1], separate, rtol=0, atol=1e-5)


def test_sdpa_builds_a_mask_only_for_padding_or_packing(monkeypatch):
    """The fast path stays: no explicit mask for SDPA when the batch has neither padding nor packed positions."""
    model = SparseWideGPTModelTester(0.75).model(SparseWideGPTForCausalLM).train()
    model.set_attn_implementation("sdpa")
    masks = []
    real = modeling.create_causal_mask
    monkeypatch.setattr(modeling, "create_causal_mask", lambda **kw: masks.append(real(**kw)) or masks[-1])
    x = torch.randint(0, 99, (2, 8))
    model(x, labels=x)
    model(x, position_ids=torch.arange(8)[None])  # monotonic positions: not packed
    assert masks == []
    model(x, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]]))
    assert len(masks) == 1 and masks[0].shape == (2, 1, 8, 8) and not masks[0][0, 0, 3, 2]


def test_packed_sequences_with_flex_attention():
    """Flex attention (compiled by torch, even on CPU, hence slow) gets its BlockMask from masking_utils too."""
    tester = SparseWideGPTModelTester(0.75)
    model = tester.model(SparseWideGPTForCausalLM)
    docs, input_ids, position_ids = packed_documents(tester.vocab_size)
    with torch.no_grad():
        separate = torch.cat([model(d[None]).logits[0] for d in docs])
        model.set_attn_implementation("flex_attention")
        packed = model(input_ids, position_ids=position_ids, use_cache=False).logits[0]
    torch.testing.assert_close(packed, separate, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------- issue 13.5: attention interface
def test_set_attn_implementation_switches_the_kernel():
    tester = SparseWideGPTModelTester(0.75)
    config, inputs = tester.prepare_config_and_inputs_for_common()
    model = tester.model(SparseWideGPTForCausalLM, config)
    assert model.config._attn_implementation == "sdpa"
    reference = outputs_of(model, inputs).logits
    calls = []

    def counting_eager(module, *args, **kwargs):
        calls.append(module.layer_idx)
        return modeling.eager_attention_forward(module, *args, **kwargs)

    AttentionInterface.register("counting_eager", counting_eager)  # registered after the model was built
    AttentionMaskInterface.register("counting_eager", eager_mask)
    try:
        model.set_attn_implementation("eager")
        assert len(outputs_of(model, inputs, output_attentions=True).attentions) == tester.num_hidden_layers
        model.set_attn_implementation("counting_eager")
        torch.testing.assert_close(
            outputs_of(model, {"input_ids": inputs["input_ids"]}).logits[1:], reference[1:], rtol=0, atol=1e-5
        )
        assert calls == [0, 1]
        model.set_attn_implementation("sdpa")
        assert outputs_of(model, inputs, output_attentions=True).attentions == ()  # SDPA gives no weights
        assert calls == [0, 1]
    finally:
        del ALL_ATTENTION_FUNCTIONS._global_mapping["counting_eager"]
        del ALL_MASK_ATTENTION_FUNCTIONS._global_mapping["counting_eager"]
    with pytest.raises(ValueError, match='attn_implementation="no-such-kernel"'):
        model.set_attn_implementation("no-such-kernel")
    model.config._attn_implementation_internal = "no-such-kernel"  # bypassing the setter: the lookup refuses it
    with pytest.raises(KeyError, match="no-such-kernel"):
        model(inputs["input_ids"])


def test_wrapped_or_hooked_projections_are_called():
    """The fused q/k/v matmul must not bypass what wraps a projection (a PEFT-style adapter, a forward hook)."""
    tester = SparseWideGPTModelTester(0.75)
    model = tester.model(SparseWideGPTForCausalLM)
    x = torch.randint(0, 99, (2, 6))
    reference = outputs_of(model, {"input_ids": x}).logits
    attn = model.transformer.h[0].attn
    seen = []
    handle = attn.v_proj.register_forward_hook(lambda module, args, out: seen.append(out.shape) or out + 1.0)
    hooked = outputs_of(model, {"input_ids": x}).logits
    assert seen == [(2, 6, model.config.hidden_size)]
    with torch.no_grad():
        attn.v_proj.bias += 1.0  # what the hook does, done to the weights
    handle.remove()
    torch.testing.assert_close(hooked, outputs_of(model, {"input_ids": x}).logits, rtol=0, atol=1e-6)
    assert (hooked - reference).abs().max() > 1e-3
    with torch.no_grad():
        attn.v_proj.bias -= 1.0

    class LoraLike(torch.nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base, self.delta = base, torch.nn.Linear(base.in_features, base.out_features, bias=False)
            torch.nn.init.zeros_(self.delta.weight)

        def forward(self, x):
            return self.base(x) + self.delta(x)

    attn.q_proj = LoraLike(attn.q_proj)
    torch.testing.assert_close(outputs_of(model, {"input_ids": x}).logits, reference, rtol=0, atol=1e-6)
    with torch.no_grad():
        attn.q_proj.delta.weight.normal_(0, 1.0)
    adapted = outputs_of(model, {"input_ids": x}).logits
    with torch.no_grad():  # merged into the base weight, the adapter gives the same logits
        attn.q_proj.base.weight += attn.q_proj.delta.weight
        attn.q_proj.delta.weight.zero_()
    torch.testing.assert_close(adapted, outputs_of(model, {"input_ids": x}).logits, rtol=0, atol=1e-5)
    assert (adapted - reference).abs().max() > 1e-3


# ---------------------------------------------------------------------- issue 13.6: masks that skip init
def seeded_masks(config):
    torch.manual_seed(123)
    return {k: m.weight_mask.clone() for k, m in sparse_layers(SparseWideGPTForCausalLM(config)).items()}


def test_masks_under_no_init_weights_and_meta_init():
    from accelerate import init_empty_weights

    config = SparseWideGPTModelTester(0.75).get_config()
    expected = seeded_masks(config)
    assert len(expected) == 12 and all(int((~m).sum()) == round(0.75 * m.numel()) for m in expected.values())
    with no_init_weights():
        skipped = SparseWideGPTForCausalLM(config)
    with init_empty_weights():  # weights on meta, buffers real (accelerate's default)
        empty = SparseWideGPTForCausalLM(config)
    with torch.device("meta"):
        meta = SparseWideGPTForCausalLM(config)
    meta.to_empty(device="cpu")
    meta.init_weights()
    for model in (skipped, empty, meta):
        got = {k: m.weight_mask for k, m in sparse_layers(model).items()}
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    for m in sparse_layers(meta).values():
        assert torch.count_nonzero(m.weight[~m.weight_mask]) == 0 and torch.count_nonzero(m.weight[m.weight_mask]) > 0


def test_loading_keeps_the_saved_masks_not_the_seeded_ones(tmp_path):
    """Masks changed after construction (as dynamic sparse training does) are what a load gives back."""
    config = SparseWideGPTModelTester(0.75).get_config()
    model = SparseWideGPTForCausalLM(config)
    with torch.no_grad():
        for m in sparse_layers(model).values():
            m.weight_mask.copy_(m.weight_mask.flip(0))
            m.weight.mul_(m.weight_mask)
    saved = {k: m.weight_mask.clone() for k, m in sparse_layers(model).items()}
    model.save_pretrained(tmp_path)
    seeded = seeded_masks(config)
    assert not any(torch.equal(saved[k], seeded[k]) for k in saved)
    for kwargs in ({}, {"device_map": "cpu"}, {"dtype": torch.bfloat16}):
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path, **kwargs)
        assert all(torch.equal(m.weight_mask, saved[k]) for k, m in sparse_layers(loaded).items())


# ---------------------------------------------------------------------- issue 12.4: missing / broken masks
@pytest.fixture
def checkpoint(tmp_path):
    tester = SparseWideGPTModelTester(0.75)
    model = tester.model(SparseWideGPTForCausalLM)
    model.save_pretrained(tmp_path, sparse_format="plain")  # weights and masks as separate tensors, to tamper with
    return model, tmp_path, load_file(tmp_path / "model.safetensors")


def rewrite(path, tensors):
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_a_checkpoint_without_masks_is_an_error_unless_rebuilt_from_weights(checkpoint):
    model, path, tensors = checkpoint
    rewrite(path, {k: v for k, v in tensors.items() if not k.endswith("weight_mask")})
    with pytest.raises(
        ValueError,
        match=r"weights of 12 sparse layer\(s\) but not their masks "
        r"\(transformer\.h\.0\.attn\.q_proj\.weight_mask.*rebuild_masks='from_weights'",
    ):
        AutoModelForCausalLM.from_pretrained(path)
    with pytest.raises(ValueError, match="rebuild_masks='from_wieghts' is invalid"):
        AutoModelForCausalLM.from_pretrained(path, rebuild_masks="from_wieghts")
    logger = hf_logging.get_logger(sparse_checkpoint.__name__)
    with LoggingLevel(logging.WARNING), CaptureLogger(logger) as captured:
        rebuilt = AutoModelForCausalLM.from_pretrained(path, rebuild_masks="from_weights")
    assert "Rebuilt the masks of 12 sparse layer(s)" in captured.out and "cannot be recovered" in captured.out
    for name, m in sparse_layers(rebuilt).items():
        assert torch.equal(m.weight_mask, tensors[name + ".weight"] != 0)  # exactly the non-zero pattern
        assert torch.equal(m.weight, tensors[name + ".weight"])  # and the trained weights untouched
    x = torch.randint(0, 99, (2, 6))
    assert torch.equal(outputs_of(rebuilt, {"input_ids": x}).logits, outputs_of(model, {"input_ids": x}).logits)


def test_nonzero_weights_at_masked_positions_are_zeroed_and_counted(checkpoint):
    _model, path, tensors = checkpoint
    tampered = dict(tensors)
    for name, n in (("transformer.h.0.mlp.fc_in", 5), ("transformer.h.1.attn.k_proj", 2)):
        weight = tampered[name + ".weight"].clone()
        inactive = (~tampered[name + ".weight_mask"]).nonzero()[:n]
        weight[inactive[:, 0], inactive[:, 1]] = 0.5
        tampered[name + ".weight"] = weight
    rewrite(path, tampered)
    logger = hf_logging.get_logger(sparse_checkpoint.__name__)
    with LoggingLevel(logging.WARNING), CaptureLogger(logger) as captured:
        loaded = AutoModelForCausalLM.from_pretrained(path)
    assert (
        "Zeroed 7 weights that were non-zero at inactive (masked) positions "
        "(transformer.h.0.mlp.fc_in: 5, transformer.h.1.attn.k_proj: 2)"
    ) in captured.out
    for name, m in sparse_layers(loaded).items():
        assert torch.count_nonzero(m.weight[~m.weight_mask]) == 0
        assert torch.equal(m.weight, tensors[name + ".weight"])
    with pytest.raises(ValueError, match=r"strict_masks=True: 7 weights are non-zero at inactive"):
        AutoModelForCausalLM.from_pretrained(path, strict_masks=True)
    rewrite(path, tensors)
    with LoggingLevel(logging.WARNING), CaptureLogger(logger) as captured:
        clean = AutoModelForCausalLM.from_pretrained(path, strict_masks=True)
    assert captured.out == "" and isinstance(clean, SparseWideGPTForCausalLM)


# ---------------------------------------------------------------------- issue 13.7: no warnings of ours
def test_training_and_generation_raise_no_warnings():
    tester = SparseWideGPTModelTester(0.75)
    model = tester.model(SparseWideGPTForCausalLM)
    x = torch.randint(3, 99, (2, 6))
    with (
        warnings.catch_warnings(record=True) as caught,
        LoggingLevel(logging.INFO),
        CaptureLogger(hf_logging.get_logger("transformers")) as captured,
    ):
        warnings.simplefilter("always")
        model.train()
        model(x, labels=x).loss.backward()
        model.eval()
        model(x, attention_mask=torch.ones_like(x))
        model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=3, do_sample=False)
    assert [str(w.message) for w in caught] == []
    assert "deprecated" not in captured.out


# ---------------------------------------------------------------------- issue 13.8: declarations, device_map
def test_declares_what_in_tree_models_declare():
    from transformers import LlamaForCausalLM

    tester = SparseWideGPTModelTester(0.75)
    model = tester.model(SparseWideGPTForCausalLM)
    for flag in (
        "_supports_flash_attn",
        "_supports_sdpa",
        "_supports_flex_attn",
        "_supports_attention_backend",
        "_can_compile_fullgraph",
        "supports_gradient_checkpointing",
    ):
        assert getattr(LlamaForCausalLM, flag) is True and getattr(model, flag) is True, flag
    assert set(model._no_split_modules) == {"SparseWideGPTBlock"}
    assert set(model._can_record_outputs) == {"hidden_states", "attentions"}
    modules = dict(model.named_modules())
    for plan in (model.tp_plan, model.pp_plan):
        assert plan
        for pattern in plan:
            concrete = pattern.replace("*", "0")
            assert concrete in modules, pattern
    assert model.tp_plan["lm_head"] == "colwise_gather_output"
    assert model.tp_plan["transformer.h.*.attn.o_proj"] == "rowwise"
    assert model.supports_tp_plan and model.supports_pp_plan
    for pattern in model.config.base_model_fsdp_plan:
        assert pattern.replace("*", "0") in dict(model.transformer.named_modules()), pattern


def test_device_map_with_cpu_and_disk_offload_matches_a_plain_load(checkpoint):
    model, path, tensors = checkpoint
    x = torch.randint(0, 99, (2, 6))
    reference = outputs_of(model, {"input_ids": x}).logits
    for max_memory in ({"cpu": 20_000}, {"cpu": 60_000}):  # everything on disk; embeddings on CPU, blocks on disk
        loaded = AutoModelForCausalLM.from_pretrained(
            path, device_map="auto", max_memory=max_memory, offload_folder=path / "offload"
        )
        assert "disk" in set(loaded.hf_device_map.values())
        assert torch.equal(outputs_of(loaded, {"input_ids": x}).logits, reference)
        assert all(torch.equal(m.weight_mask, tensors[k + ".weight_mask"]) for k, m in sparse_layers(loaded).items())
    tampered = dict(tensors)
    weight = tampered["transformer.h.1.mlp.fc_out.weight"].clone()
    weight[~tampered["transformer.h.1.mlp.fc_out.weight_mask"]] = 1.0
    tampered["transformer.h.1.mlp.fc_out.weight"] = weight
    rewrite(path, tampered)
    with pytest.raises(ValueError, match=r"offloaded, where they cannot be repaired"):
        AutoModelForCausalLM.from_pretrained(
            path, device_map="auto", max_memory={"cpu": 20_000}, offload_folder=path / "offload2"
        )


# ---------------------------------------------------------------------- what works must keep working
def test_greedy_generation_uses_the_cache_and_matches_step_by_step_argmax(tester):
    model = tester.model(tester.causal_lm_class)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5 * (p != 0))  # a less degenerate tiny model
    x = torch.randint(3, 99, (2, 5), generator=torch.Generator().manual_seed(1))
    expected = x
    for _ in range(6):
        logits = outputs_of(model, {"input_ids": expected}, use_cache=False).logits[:, -1]
        logits[:, 2] = -float("inf")  # eos, which min_new_tokens forbids
        expected = torch.cat([expected, logits.argmax(-1, keepdim=True)], dim=1)
    kwargs = dict(
        attention_mask=torch.ones_like(x), max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0
    )
    assert torch.equal(model.generate(x, **kwargs), expected)
    assert torch.equal(model.generate(x, cache_implementation="static", **kwargs), expected)
    beams = model.generate(x, num_beams=2, **kwargs)
    assert torch.equal(model.generate(x, num_beams=2, use_cache=False, **kwargs), beams)


def test_save_load_tied_weights_and_resizing(tester, tmp_path):
    config, inputs = tester.prepare_config_and_inputs_for_common()
    model = tester.model(tester.causal_lm_class, config)
    model.save_pretrained(tmp_path)
    loaded = SparseWideGPTForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert torch.equal(outputs_of(loaded, inputs).logits, outputs_of(model, inputs).logits)
    base = SparseWideGPTModel.from_pretrained(tmp_path)  # the base model from an LM-head checkpoint
    torch.testing.assert_close(
        outputs_of(base, inputs).last_hidden_state, outputs_of(model.transformer, inputs).last_hidden_state
    )
    model.resize_token_embeddings(tester.vocab_size + 5)
    assert model.config.vocab_size == tester.vocab_size + 5 and model.lm_head.weight is model.transformer.wte.weight
    assert outputs_of(model, inputs).logits.shape[-1] == tester.vocab_size + 5


def test_torch_export_matches_eager():
    tester = SparseWideGPTModelTester(0.75)
    model = tester.model(SparseWideGPTForCausalLM)
    x = torch.randint(0, 99, (2, 6))
    exported = torch.export.export(model, args=(x,), kwargs={"use_cache": False}, strict=False)
    torch.testing.assert_close(
        exported.module()(x, use_cache=False).logits, outputs_of(model, {"input_ids": x}, use_cache=False).logits
    )


# ----------------------------------------------------------------------------------------------
# Eager vs SDPA: transformers' own checks, run the way its model tests run them. The wheel ships no tests folder, so
# these follow huggingface/transformers tests/test_modeling_common.py (`TEST_EAGER_MATCHES_SDPA_INFERENCE_
# PARAMETERIZATION`, `_test_eager_matches_sdpa_inference`: the same cases, inputs, masking and CPU tolerances) and
# tests/generation/test_utils.py (`_test_attention_implementation("sdpa")`, `_check_similar_generate_outputs`).
# ----------------------------------------------------------------------------------------------
EAGER_MATCHES_SDPA_INFERENCE_CASES = [
    (dtype, padding_side, use_attention_mask, False, enable_kernels)
    for dtype in ("fp16", "fp32", "bf16")
    for padding_side in ("left", "right")
    for use_attention_mask in (True, False)
    for enable_kernels in (True, False)
] + [("fp32", "left", True, True, False)]  # output_attentions: SDPA layers fall back to eager's weights or give none
DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}
# transformers' CPU entries, keyed by (kernels enabled, dtype); they are the same with and without kernels.
SDPA_ATOL = {torch.float32: 1e-6, torch.float16: 5e-3, torch.bfloat16: 1e-2}
SDPA_RTOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 1e-2}


def sdpa_kernel(enable_kernels):
    """transformers' `sdpa_kernel` helper: the math backend always, flash and memory-efficient ones when enabled."""
    backends = [SDPBackend.MATH]
    if enable_kernels:
        backends += [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    return torch.nn.attention.sdpa_kernel(backends)


@pytest.mark.parametrize(
    "dtype, padding_side, use_attention_mask, output_attentions, enable_kernels", EAGER_MATCHES_SDPA_INFERENCE_CASES
)
def test_eager_matches_sdpa_inference(
    tmp_path, dtype, padding_side, use_attention_mask, output_attentions, enable_kernels
):
    dtype = DTYPES[dtype]
    batch_size = 7
    for model_class in SparseWideGPTModelTester(0.75).all_model_classes:
        set_seed(42)
        tester = SparseWideGPTModelTester(0.75)
        config, inputs = tester.prepare_config_and_inputs_for_common()
        set_config_for_less_flaky_test(config)
        model = model_class(config)
        model.save_pretrained(tmp_path / model_class.__name__)
        model_sdpa = model_class.from_pretrained(
            tmp_path / model_class.__name__, dtype=dtype, attn_implementation="sdpa"
        ).eval()
        model_eager = copy.deepcopy(model_sdpa)
        model_eager.set_attn_implementation("eager")
        set_model_for_less_flaky_test(model_eager)
        set_model_for_less_flaky_test(model_sdpa)

        input_ids = inputs["input_ids"]
        extension = torch.randint(
            high=5, size=(batch_size - input_ids.shape[0], input_ids.shape[1]), dtype=input_ids.dtype
        )
        prepared = {
            "input_ids": torch.cat((input_ids, extension)),
            "output_hidden_states": True,
            "output_attentions": output_attentions,
        }
        if use_attention_mask:  # all ones but the last row, padded on `padding_side` by two tokens
            attention_mask = torch.ones(batch_size, input_ids.shape[1], dtype=torch.int64)
            if padding_side == "left":
                attention_mask[-1, :2] = 0
            else:
                attention_mask[-1, -2:] = 0
            prepared["attention_mask"] = attention_mask
        with torch.no_grad(), sdpa_kernel(enable_kernels):
            hidden_eager = model_eager(**prepared).hidden_states[-1]
            hidden_sdpa = model_sdpa(**prepared).hidden_states[-1]

        if use_attention_mask:  # outputs at padded positions may differ: compare the real tokens only
            real = prepared["attention_mask"].bool()[..., None]
            hidden_eager = torch.where(real, hidden_eager, 0)
            hidden_sdpa = torch.where(real, hidden_sdpa, 0)
        atol, rtol = SDPA_ATOL[dtype], SDPA_RTOL[dtype]
        if dtype == torch.bfloat16:  # bf16's precision scales with the magnitude, as transformers allows
            atol = max(atol, float(max(hidden_sdpa.abs().amax(), hidden_eager.abs().amax())) * 3e-2)
        matching_rows = [torch.allclose(s, e, atol=atol, rtol=rtol) for s, e in zip(hidden_sdpa, hidden_eager)]
        assert sum(matching_rows) >= 0.8 * batch_size, (model_class.__name__, matching_rows)  # transformers' 80%


def assert_similar_generate_outputs(output_1, output_2, atol, rtol):
    """transformers' `_check_similar_generate_outputs`: equal sequences, or at the first token where a row differs,
    scores that are close (a near tie decided differently by rounding)."""
    prompt_length = output_1.sequences.shape[1] - len(output_1.scores)
    matches = output_1.sequences == output_2.sequences
    for row in range(matches.shape[0]):
        if not matches[row].all():
            step = int(matches[row].int().argmin()) - prompt_length
            torch.testing.assert_close(output_1.scores[step][row], output_2.scores[step][row], atol=atol, rtol=rtol)


def test_eager_matches_sdpa_generate(tmp_path):
    max_new_tokens = 30
    tester = SparseWideGPTModelTester(0.75)
    config, inputs = tester.prepare_config_and_inputs_for_common()
    config = tester.get_config(n_positions=max_new_tokens + inputs["input_ids"].shape[1] + 1)
    SparseWideGPTForCausalLM(config).save_pretrained(tmp_path)
    kwargs = dict(
        max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True, output_scores=True, use_cache=True
    )
    results = {}
    for implementation in ("eager", "sdpa"):
        model = SparseWideGPTForCausalLM.from_pretrained(
            tmp_path, dtype=torch.float16, attn_implementation=implementation
        )
        results[implementation] = model.generate(**inputs, **kwargs)
    assert results["eager"].sequences.shape == (tester.batch_size, inputs["input_ids"].shape[1] + max_new_tokens)
    assert_similar_generate_outputs(results["eager"], results["sdpa"], atol=1e-3, rtol=1e-3)
