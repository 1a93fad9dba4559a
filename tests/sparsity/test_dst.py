import copy
import math

import pytest
import torch
from helpers import make, tiny_config, train_step

from hf_sparse_ift import SparseWideGPTForCausalLM
from hf_sparse_ift.sparsity import sparse_layers
from hf_sparse_ift.sparsity.dst import DSTConfig, DSTEngine, summarize
from hf_sparse_ift.sparsity.masks import select_top_k


def masks(model):
    return {k: m.weight_mask.clone() for k, m in sparse_layers(model).items()}


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_active_count_is_constant_and_inactive_weights_and_state_are_zero(method):
    model, opt, engine = make(method)
    counts = {k: int(m.sum()) for k, m in masks(model).items()}
    g = torch.Generator().manual_seed(0)
    updates = 0
    for _ in range(30):
        telemetry = train_step(model, opt, engine, g)
        updates += telemetry is not None
        for name, m in sparse_layers(model).items():
            assert int(m.weight_mask.sum()) == counts[name]
            assert torch.count_nonzero(m.weight[~m.weight_mask].view(torch.int32)) == 0  # +0.0, bit for bit
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.count_nonzero(opt.state[m.weight][key][~m.weight_mask]) == 0
        if telemetry:
            assert all(s["dropped"] == s["grown"] > 0 for s in telemetry["layers"].values())
    assert updates == 14  # steps 2, 4, ..., 28 (< 0.75 * 40)
    assert any(not torch.equal(a, b) for a, b in zip(masks(model).values(), masks(make(method)[0]).values()))


def test_srigl_keeps_constant_fan_in_and_its_budget():
    model, opt, engine = make("srigl", ablation_threshold=0.6, drop_fraction=0.5)
    g = torch.Generator().manual_seed(0)
    for m in sparse_layers(model).values():  # constant fan-in from the start
        fan_in = m.weight_mask.sum(1)
        assert (fan_in == fan_in[0]).all()
    ablated = 0
    for _ in range(30):
        telemetry = train_step(model, opt, engine, g)
        for name, m in sparse_layers(model).items():
            fan_in = m.weight_mask.sum(1)
            alive = fan_in > 0
            assert (fan_in[alive] == fan_in[alive][0]).all(), name
            budget, total = engine.layer_budget[name], int(m.weight_mask.sum())
            assert budget - int(alive.sum()) < total <= budget  # fan-in = budget // alive neurons
            assert torch.count_nonzero(m.weight[~m.weight_mask]) == 0
            ablated = max(ablated, m.weight_mask.shape[0] - int(alive.sum()))
        if telemetry:
            assert all("active_neurons" in s for s in telemetry["layers"].values())
    assert ablated > 0  # the threshold was chosen so that some neuron is ablated


def test_set_drops_exactly_the_smallest_magnitudes_with_ties_by_index_and_grows_only_at_inactive():
    model, _opt, engine = make("set", drop_fraction=0.5)
    layer = model.transformer.h[0].attn.q_proj
    with torch.no_grad():
        values = torch.arange(layer.weight.numel(), dtype=torch.float32).view_as(layer.weight) % 7 - 3
        layer.weight.copy_(values * layer.weight_mask)  # many ties among |w| (0, 1, 2, 3)
    old_mask = layer.weight_mask.clone()
    active_idx = torch.nonzero(old_mask.view(-1)).squeeze(1)
    k = round(engine.drop_fraction_at(2) * active_idx.numel())
    magnitudes = layer.weight.view(-1)[active_idx].abs()
    expected = active_idx[torch.sort(magnitudes, stable=True).indices[:k]]
    engine.step_count = 1
    engine.step()
    new_mask = layer.weight_mask.view(-1)
    dropped = torch.nonzero(old_mask.view(-1) & ~new_mask).squeeze(1)
    grown = torch.nonzero(~old_mask.view(-1) & new_mask).squeeze(1)
    assert torch.equal(torch.sort(dropped).values, torch.sort(expected).values)
    assert grown.numel() == k and not old_mask.view(-1)[grown].any()
    assert torch.count_nonzero(layer.weight.view(-1)[grown]) == 0  # regrown weights start at zero


def test_rigl_grows_at_the_largest_gradient_inactive_positions():
    model, opt, engine = make("rigl")
    layer = model.transformer.h[1].mlp.fc_in
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 97, (4, 16), generator=g)
    model(x, labels=x).loss.backward()  # step 1 is no update step: nothing captured
    assert not engine.capturing_dense_grad
    opt.step()
    opt.zero_grad()
    engine.step()
    assert engine.capturing_dense_grad  # step 2 is an update step
    model(x, labels=x).loss.backward()
    dense = engine.dense_grads["transformer.h.1.mlp.fc_in"].grad.clone()
    assert torch.count_nonzero(dense[~layer.weight_mask]) > 0
    assert torch.count_nonzero(layer.weight.grad[~layer.weight_mask]) == 0
    old = layer.weight_mask.clone()
    opt.step()
    opt.zero_grad()
    telemetry = engine.step()
    k = telemetry["layers"]["transformer.h.1.mlp.fc_in"]["grown"]
    scores = torch.where(old, torch.tensor(-1.0), dense.abs()).view(-1)
    expected = set(torch.sort(-scores, stable=True).indices[:k].tolist())
    grown = set(torch.nonzero((~old & layer.weight_mask).view(-1)).squeeze(1).tolist())
    assert grown == expected
    assert not engine.capturing_dense_grad and layer.grad_observer is None


@pytest.mark.parametrize("method", ["set", "rigl", "srigl"])
def test_same_seed_same_masks_different_seed_different_masks(method):
    def run(seed):
        model, opt, engine = make(method, seed=seed)
        g = torch.Generator().manual_seed(0)
        for _ in range(10):
            train_step(model, opt, engine, g)
        return masks(model)

    a, b = run(0), run(0)
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = run(1)
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("method", ["set", "rigl", "srigl"])
def test_resume_from_state_dict_gives_the_same_masks_as_never_stopping(method):
    model, opt, engine = make(method)
    g = torch.Generator().manual_seed(0)
    for _ in range(7):
        train_step(model, opt, engine, g)
    saved = (
        copy.deepcopy(model.state_dict()),
        copy.deepcopy(opt.state_dict()),
        copy.deepcopy(engine.state_dict()),
        g.get_state(),
    )
    for _ in range(13):
        train_step(model, opt, engine, g)
    expected = masks(model)

    model2, opt2, _ = make(method, seed=123)  # different init: everything must come from the checkpoint
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    engine2 = DSTEngine(model2, opt2, engine.config, total_steps=40)
    engine2.load_state_dict(saved[2])
    g2 = torch.Generator()
    g2.set_state(saved[3])
    for _ in range(13):
        train_step(model2, opt2, engine2, g2)
    assert all(torch.equal(expected[k], v) for k, v in masks(model2).items())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))


def test_static_never_changes_the_mask():
    model, opt, engine = make("static")
    before = masks(model)
    g = torch.Generator().manual_seed(0)
    assert all(train_step(model, opt, engine, g) is None for _ in range(10))
    assert all(torch.equal(before[k], v) for k, v in masks(model).items())


def test_schedule_cosine_decay_interval_and_stop():
    _, _, engine = make("set", interval=10, total=100, drop_fraction=0.3, stop_fraction=0.75)
    assert [s for s in range(101) if engine.is_update_step(s)] == [10, 20, 30, 40, 50, 60, 70]
    assert engine.drop_fraction_at(0) == pytest.approx(0.3)
    assert engine.drop_fraction_at(37.5) == pytest.approx(0.15)
    assert engine.drop_fraction_at(75) == pytest.approx(0.0)
    assert engine.drop_fraction_at(30) == pytest.approx(0.15 * (1 + math.cos(math.pi * 30 / 75)))


def test_telemetry_summary_has_per_layer_and_total_counts():
    model, opt, engine = make("set")
    g = torch.Generator().manual_seed(0)
    train_step(model, opt, engine, g)
    flat = summarize(train_step(model, opt, engine, g))
    assert flat["dst/total_dropped"] == flat["dst/total_grown"] > 0
    assert 0 < flat["dst/mean_churn"] < 1 and flat["dst/seconds"] > 0
    assert "dst/transformer.h.0.mlp.fc_in/churn" in flat


def test_smallest_k_breaks_ties_by_index():
    scores = torch.tensor([3.0, 1.0, 2.0, 1.0, 1.0, 0.5])
    assert torch.nonzero(select_top_k(scores, 3, largest=False)).squeeze(1).tolist() == [1, 3, 5]  # 0.5, two 1.0s
    assert not select_top_k(scores, 0, largest=False).any()


@pytest.mark.parametrize(
    "field, value",
    [
        ("method", "prune"),
        ("drop_fraction", 1.0),
        ("update_interval", 0),
        ("stop_fraction", 1.5),
        ("ablation_threshold", -0.1),
    ],
)
def test_invalid_dst_settings_are_rejected(field, value):
    with pytest.raises(ValueError, match=f"dst.{field}={value!r}"):
        DSTConfig(**{field: value})
    with pytest.raises(ValueError, match="unknown dst option"):
        DSTConfig.from_dict({"methd": "set"})


def test_engine_refuses_a_dense_model():
    model = SparseWideGPTForCausalLM(tiny_config(sparsity=0.0))
    with pytest.raises(ValueError, match="no SparseLinear"):
        DSTEngine(model, None, DSTConfig(method="set"), total_steps=10)


def test_top_k_orders_negative_and_positive_scores_and_breaks_ties_by_index():
    def top_k(scores, k, largest):
        return torch.nonzero(select_top_k(scores, k, largest)).squeeze(1)

    scores = torch.tensor([-2.0, 5.0, -2.0, 0.0, 5.0, float("inf"), -float("inf"), 0.0])
    assert sorted(top_k(scores, 3, largest=True).tolist()) == [1, 4, 5]
    assert sorted(top_k(scores, 2, largest=True).tolist()) == [1, 5]  # tie 1 vs 4: lower index wins
    assert sorted(top_k(scores, 3, largest=False).tolist()) == [0, 2, 6]
    assert sorted(top_k(scores, 2, largest=False).tolist()) == [0, 6]  # tie 0 vs 2: lower index wins
    assert sorted(top_k(scores, 5, largest=False).tolist()) == [0, 2, 3, 6, 7]
    values = torch.randn(10_000)
    assert torch.equal(
        torch.sort(top_k(values, 100, largest=True)).values, torch.sort(torch.topk(values, 100).indices).values
    )


@pytest.mark.parametrize("method", ["set", "srigl"])
def test_reported_sparsity_matches_the_masks(method):
    model, opt, engine = make(method, ablation_threshold=0.6, drop_fraction=0.5)
    g = torch.Generator().manual_seed(0)
    for _ in range(12):
        train_step(model, opt, engine, g)
        layers = sparse_layers(model).values()
        counted = sum(int((~m.weight_mask).sum()) for m in layers) / sum(m.weight_mask.numel() for m in layers)
        assert engine.sparsity() == pytest.approx(counted, abs=1e-12)
