import torch
import torch.nn.functional as F
from helpers import tiny_config
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, pipeline

from hf_sparse_ift import SparseLinear, SparseWideGPTForCausalLM
from hf_sparse_ift.models.sparse_wide_gpt.convert_gpt2 import gpt2_to_sparse_wide, sparse_wide_to_gpt2
from hf_sparse_ift.sparsity import parameter_counts, sparse_layers


def test_masks_have_exactly_round_s_n_inactive_weights_and_zeros():
    model = SparseWideGPTForCausalLM(tiny_config(sparsity=0.6, width_multiple=8))
    sparse = sparse_layers(model)
    assert len(sparse) == 2 * 6
    for name, m in sparse.items():
        n = m.weight.numel()
        assert int((~m.weight_mask).sum()) == round(model.config.layer_sparsity * n), name
        assert m.weight_mask.dtype == torch.bool
        assert torch.count_nonzero(m.weight[~m.weight_mask]) == 0
        assert torch.count_nonzero(m.weight[m.weight_mask]) == m.weight_mask.sum()


def test_masks_are_seeded_and_differ_between_layers():
    a = sparse_layers(SparseWideGPTForCausalLM(tiny_config()))
    b = sparse_layers(SparseWideGPTForCausalLM(tiny_config()))
    c = sparse_layers(SparseWideGPTForCausalLM(tiny_config(mask_seed=1)))
    assert all(torch.equal(a[k].weight_mask, b[k].weight_mask) for k in a)
    assert not any(torch.equal(a[k].weight_mask, c[k].weight_mask) for k in a)
    q0, q1 = a["transformer.h.0.attn.q_proj"].weight_mask, a["transformer.h.1.attn.q_proj"].weight_mask
    assert not torch.equal(q0, q1)


def test_only_block_linears_listed_are_sparse():
    model = SparseWideGPTForCausalLM(tiny_config(sparse_layers=["fc_in", "fc_out"]))
    assert sorted({n.rsplit(".", 1)[-1] for n in sparse_layers(model)}) == ["fc_in", "fc_out"]
    assert not isinstance(model.transformer.h[0].attn.q_proj, SparseLinear)
    assert not isinstance(model.lm_head, SparseLinear)


def test_labels_give_the_shifted_lm_loss(tiny_model):
    x = torch.randint(0, 97, (3, 12))
    out = tiny_model(x, labels=x)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, 97), x[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)


def test_inactive_weights_get_zero_gradient_and_stay_zero_under_adamw(tiny_model):
    tiny_model.train()
    opt = torch.optim.AdamW(tiny_model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        x = torch.randint(0, 97, (4, 16))
        tiny_model(x, labels=x).loss.backward()
        for m in sparse_layers(tiny_model).values():
            assert torch.count_nonzero(m.weight.grad[~m.weight_mask]) == 0
            assert torch.count_nonzero(m.weight.grad[m.weight_mask]) > 0
        opt.step()
        opt.zero_grad()
    for m in sparse_layers(tiny_model).values():
        assert torch.count_nonzero(m.weight[~m.weight_mask]) == 0


def test_sdpa_and_eager_attention_agree():
    torch.manual_seed(0)
    model = SparseWideGPTForCausalLM(tiny_config()).eval()
    x = torch.randint(0, 97, (2, 20))
    mask = torch.ones_like(x)
    mask[0, :5] = 0  # left padding
    model.set_attn_implementation("sdpa")
    sdpa = model(x, attention_mask=mask).logits
    model.set_attn_implementation("eager")
    eager = model(x, attention_mask=mask).logits
    torch.testing.assert_close(sdpa[:, 5:], eager[:, 5:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sdpa[1], eager[1], rtol=1e-5, atol=1e-5)
    model.train()  # no mask and no cache: SDPA's own is_causal path
    no_mask_eager = model(x).logits
    model.set_attn_implementation("sdpa")
    torch.testing.assert_close(model(x).logits, no_mask_eager, rtol=1e-5, atol=1e-5)
    changed = x.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 97  # the future must not leak into earlier positions
    torch.testing.assert_close(model(changed).logits[:, :10], no_mask_eager[:, :10], rtol=1e-5, atol=1e-5)


def test_kv_cache_matches_full_forward_and_generate_with_cache_equals_without(tiny_model):
    x = torch.randint(1, 97, (2, 6))
    full = tiny_model(x).logits
    first = tiny_model(x[:, :4], use_cache=True)
    step = tiny_model(x[:, 4:], cache=first.cache, use_cache=True)
    torch.testing.assert_close(step.logits, full[:, 4:], rtol=1e-5, atol=1e-5)
    kwargs = dict(max_new_tokens=10, do_sample=False, attention_mask=torch.ones_like(x), pad_token_id=0)
    with_cache = tiny_model.generate(x, use_cache=True, **kwargs)
    without = tiny_model.generate(x, use_cache=False, **kwargs)
    assert with_cache.shape == (2, 16)
    assert torch.equal(with_cache, without)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = SparseWideGPTForCausalLM(tiny_config()).train()
    x = torch.randint(0, 97, (2, 16))
    model(x, labels=x).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    assert model.transformer.h[0].gradient_checkpointing
    model(x, labels=x).loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[n], rtol=1e-5, atol=1e-6, msg=n)


def test_gpt2_parity_both_ways():
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=32, n_embd=16, n_layer=2, n_head=2)).eval()
    ours = gpt2_to_sparse_wide(gpt2).eval()
    x = torch.randint(0, 97, (2, 20))
    torch.testing.assert_close(ours(x).logits, gpt2(x).logits, rtol=0, atol=1e-5)
    back = sparse_wide_to_gpt2(ours).eval()
    torch.testing.assert_close(back(x).logits, gpt2(x).logits, rtol=0, atol=1e-5)


def test_sparse_wide_exports_to_a_gpt2_of_the_widened_size(tiny_model, tmp_path):
    gpt2 = sparse_wide_to_gpt2(tiny_model).eval()
    assert gpt2.config.n_embd == tiny_model.config.hidden_size
    gpt2.save_pretrained(tmp_path / "gpt2")
    again = gpt2_to_sparse_wide(tmp_path / "gpt2").eval()  # from a checkpoint directory
    x = torch.randint(0, 97, (2, 20))
    torch.testing.assert_close(again(x).logits, tiny_model(x).logits, rtol=0, atol=1e-5)


def test_save_load_keeps_masks_zeros_and_logits(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is SparseWideGPTForCausalLM
    x = torch.randint(0, 97, (2, 20))
    assert torch.equal(loaded(x).logits, tiny_model(x).logits)
    for name, m in sparse_layers(loaded).items():
        assert torch.equal(m.weight_mask, sparse_layers(tiny_model)[name].weight_mask)
        assert torch.count_nonzero(m.weight[~m.weight_mask]) == 0


def test_bf16_and_device_map_auto_loading(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    bf16 = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, device_map="auto")
    m = bf16.transformer.h[0].mlp.fc_in
    assert m.weight.dtype == torch.bfloat16 and m.weight_mask.dtype == torch.bool
    assert torch.count_nonzero(m.weight[~m.weight_mask]) == 0
    x = torch.randint(0, 97, (1, 8))
    logits = bf16(x.to(bf16.device)).logits  # device_map="auto" puts it on the GPU when there is one
    torch.testing.assert_close(logits.float().cpu(), tiny_model(x).logits, rtol=0.05, atol=0.05)


def test_text_generation_pipeline(builtin_tokenizer):
    model = SparseWideGPTForCausalLM(tiny_config(vocab_size=len(builtin_tokenizer)))
    generator = pipeline("text-generation", model=model, tokenizer=builtin_tokenizer)
    out = generator("Return the", max_new_tokens=5, do_sample=False)
    assert out[0]["generated_text"].startswith("Return the")
    assert len(builtin_tokenizer(out[0]["generated_text"])["input_ids"]) > len(
        builtin_tokenizer("Return the")["input_ids"]
    )


def test_parameter_counts(tiny_model):
    counts = parameter_counts(tiny_model)
    sparse = sum(m.weight.numel() for m in sparse_layers(tiny_model).values())
    assert counts["inactive"] == round(0.75 * sparse)  # 0.75·n is whole for these sizes
    assert counts["active"] == counts["total"] - counts["inactive"]


def test_parameter_formula_matches_the_model():
    from hf_sparse_ift.models.sparse_wide_gpt.iso_flop import count_parameters

    for overrides in ({}, {"sparsity": 0.0}, {"sparsity": 0.6, "width_multiple": 8, "sparse_layers": ["fc_in"]}):
        model = SparseWideGPTForCausalLM(tiny_config(**overrides))
        c = model.config
        assert count_parameters(c.shape(), c.n_positions) == parameter_counts(model)


def test_head_size_padding_for_fused_attention_is_exact():
    torch.manual_seed(0)
    model = SparseWideGPTForCausalLM(tiny_config(dense_hidden_size=18, n_head=2, sparsity=0.5)).eval()
    assert model.config.head_dim == 13  # 18·sqrt(2) = 25.5 -> 26 wide, 2 heads: padded to 16 for SDPA
    x = torch.randint(0, 97, (2, 12))
    model.set_attn_implementation("sdpa")
    sdpa = model(x).logits
    model.set_attn_implementation("eager")
    torch.testing.assert_close(sdpa, model(x).logits, rtol=1e-5, atol=1e-5)


def test_training_forward_builds_no_kv_cache(tiny_model):
    tiny_model.train()
    x = torch.randint(0, 97, (2, 8))
    assert tiny_model(x, labels=x).cache is None
    tiny_model.eval()
    assert tiny_model(x).cache is not None


def test_an_input_longer_than_the_positions_is_one_sentence_not_an_index_error():
    import pytest

    from hf_sparse_ift.errors import UsageError

    model = SparseWideGPTForCausalLM(tiny_config()).eval()  # 32 positions
    assert model(torch.zeros(1, 32, dtype=torch.long)).logits.shape == (1, 32, 97)
    with pytest.raises(UsageError, match=r"reaches position 40 \(0 cached \+ 40 new tokens\).*n_positions=32"):
        model(torch.zeros(1, 40, dtype=torch.long))
