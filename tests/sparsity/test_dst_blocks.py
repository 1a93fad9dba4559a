"""DST on block-sparse layers: the invariants of tests/sparsity/test_dst.py, with blocks as the units."""

import copy

import pytest
import torch
from helpers import tiny_config, train_step

from hf_sparse_ift import BlockSparseLinear, SparseWideGPTForCausalLM
from hf_sparse_ift.sparsity import sparse_layers
from hf_sparse_ift.sparsity.dst import DSTConfig, DSTEngine


def make(method, seed=0, interval=2, total=16, fan_in="any", **dst):
    """Widths 64/256 in 8x8 blocks: attention layers have 8x8 blocks (16 active), MLP layers 32x8 / 8x32."""
    torch.manual_seed(seed)
    model = SparseWideGPTForCausalLM(tiny_config(dense_hidden_size=32, sparsity_block=8, block_fan_in=fan_in))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    engine = DSTEngine(model, opt, DSTConfig(method=method, update_interval=interval, **dst), total_steps=total)
    return model, opt, engine


def block_masks(model):
    return {k: m.block_mask.clone() for k, m in sparse_layers(model).items()}


def dense_state(layer, opt):
    """The layer's weight and Adam moments as dense (out, in) matrices, zero at inactive blocks."""
    state = opt.state[layer.weight_blocks]
    return {
        "weight": layer.dense_weight().detach().clone(),
        **{key: layer.dense_weight(state[key]).clone() for key in ("exp_avg", "exp_avg_sq")},
    }


@pytest.mark.parametrize("fan_in", ["any", "constant"])
@pytest.mark.parametrize("method", ["set", "rigl"])
def test_block_budget_zero_regrown_blocks_and_moved_optimizer_state(method, fan_in):
    model, opt, engine = make(method, fan_in=fan_in)
    layers = sparse_layers(model)
    assert all(isinstance(m, BlockSparseLinear) for m in layers.values())
    budgets = {k: m.n_active for k, m in layers.items()}
    row_counts = {k: m.block_mask.sum(dim=1) for k, m in layers.items()}
    g = torch.Generator().manual_seed(0)
    updates = grown_blocks = 0
    for _ in range(8):
        before_masks = block_masks(model)
        x = torch.randint(0, 97, (4, 16), generator=g)
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
        before = {k: dense_state(m, opt) for k, m in layers.items()}
        telemetry = engine.step()
        updates += telemetry is not None
        for name, layer in layers.items():
            mask = layer.block_mask
            assert int(mask.sum()) == budgets[name] == layer.n_active
            if fan_in == "constant":
                assert torch.equal(mask.sum(dim=1), row_counts[name])
            kept = layer.weight_mask & before_masks[name].repeat_interleave(8, 0).repeat_interleave(8, 1)
            grown = layer.weight_mask & ~kept
            after = dense_state(layer, opt)
            for key, value in after.items():
                # kept blocks carry their values and moments into their new slots, bit for bit ...
                assert torch.equal(value[kept], before[name][key][kept]), (name, key)
                # ... regrown blocks start at +0.0 with zero moments
                assert torch.count_nonzero(value[grown].view(torch.int32)) == 0, (name, key)
            # the slots follow the new block index (BSR order)
            assert layer.block_col_indices.tolist() == mask.nonzero()[:, 1].tolist()
        if telemetry:
            assert all(s["dropped"] == s["grown"] for s in telemetry["layers"].values())
            grown_blocks += sum(s["grown"] for s in telemetry["layers"].values())
    assert updates == 4  # steps 2, 4, 6, 8 (< 0.75 * 16)
    assert grown_blocks > 0
    assert any(
        not torch.equal(a, b) for a, b in zip(block_masks(model).values(), block_masks(make(method)[0]).values())
    )


def test_set_drops_the_blocks_of_smallest_norm_and_grows_only_inactive_blocks():
    model, _opt, engine = make("set", drop_fraction=0.5)
    layer = model.transformer.h[0].attn.q_proj
    with torch.no_grad():  # block norms 1, 2, ..., with ties: block i has norm (i % 5 + 1) * 8
        for i in range(layer.n_active):
            layer.weight_blocks[i].fill_(i % 5 + 1)
    old = layer.block_mask.clone()
    positions = old.view(-1).nonzero().squeeze(1)  # BSR order = slot order
    k = round(engine.drop_fraction_at(2) * layer.n_active)
    norms = torch.tensor([float(i % 5 + 1) for i in range(layer.n_active)])
    expected = positions[torch.sort(norms, stable=True).indices[:k]]
    engine.step_count = 1
    engine.step()
    new = layer.block_mask.view(-1)
    dropped = (old.view(-1) & ~new).nonzero().squeeze(1)
    grown = (~old.view(-1) & new).nonzero().squeeze(1)
    assert torch.equal(torch.sort(dropped).values, torch.sort(expected).values)
    assert grown.numel() == k and not old.view(-1)[grown].any()


def test_rigl_grows_the_blocks_of_largest_dense_gradient_norm():
    model, opt, engine = make("rigl")
    name = "transformer.h.1.mlp.fc_in"
    layer = model.get_submodule(name)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 97, (4, 16), generator=g)
    model(x, labels=x).loss.backward()
    assert not engine.capturing_dense_grad
    opt.step()
    opt.zero_grad()
    engine.step()
    assert engine.capturing_dense_grad
    model(x, labels=x).loss.backward()
    dense = engine.dense_grads[name].grad.clone()
    assert dense.shape == (layer.out_features, layer.in_features)
    assert torch.count_nonzero(dense[~layer.weight_mask]) > 0
    old = layer.block_mask.clone()
    opt.step()
    opt.zero_grad()
    telemetry = engine.step()
    k = telemetry["layers"][name]["grown"]
    norms = torch.linalg.vector_norm(dense.view(32, 8, 8, 8), dim=(1, 3))
    scores = torch.where(old, torch.tensor(-1.0), norms).view(-1)
    expected = set(torch.sort(-scores, stable=True).indices[:k].tolist())
    assert set((~old & layer.block_mask).view(-1).nonzero().squeeze(1).tolist()) == expected
    assert layer.grad_observer is None


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_block_resume_from_state_dict_is_exact(method):
    model, opt, engine = make(method, fan_in="constant")
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        train_step(model, opt, engine, g)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), engine.state_dict())) + (g.get_state(),)
    for _ in range(6):
        train_step(model, opt, engine, g)

    model2, opt2, _ = make(method, seed=123, fan_in="constant")
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    engine2 = DSTEngine(model2, opt2, engine.config, total_steps=16)
    engine2.load_state_dict(saved[2])
    g2 = torch.Generator()
    g2.set_state(saved[3])
    for _ in range(6):
        train_step(model2, opt2, engine2, g2)
    assert all(torch.equal(a, b) for a, b in zip(block_masks(model).values(), block_masks(model2).values()))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))


def test_static_keeps_the_blocks_and_reported_sparsity_counts_weights():
    model, opt, engine = make("static")
    before = block_masks(model)
    g = torch.Generator().manual_seed(0)
    assert all(train_step(model, opt, engine, g) is None for _ in range(4))
    assert all(torch.equal(before[k], v) for k, v in block_masks(model).items())
    layers = sparse_layers(model).values()
    inactive = sum(int((~m.weight_mask).sum()) for m in layers)
    assert engine.sparsity() == pytest.approx(inactive / sum(m.weight_mask.numel() for m in layers), abs=1e-12)


def test_srigl_refuses_block_layers():
    with pytest.raises(ValueError, match=r"dst.method='srigl' does not work on block-sparse layers.*'rigl'"):
        make("srigl")


def test_rigl_on_blocks_under_bf16_autocast_updates_masks():
    # a GPU trains in bf16 by default: the dense-gradient observer mixed bf16 gradients with fp32 inputs and
    # crashed at the first update ("expected m1 and m2 to have the same dtype")
    model, opt, engine = make("rigl", interval=1)
    before = block_masks(model)
    x = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x, labels=x).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    telemetry = engine.step()
    assert telemetry is not None and any(not torch.equal(before[k], v) for k, v in block_masks(model).items())
