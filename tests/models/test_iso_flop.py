import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_sparse_ift.models.sparse_wide_gpt.iso_flop import (
    GPTShape,
    calibrate_sparsity,
    count_flops,
    family_layer_flops,
    flop_ratio,
    sparse_doped_rank,
    sparse_factorized_rank,
    sparse_parallel_branches,
    sparse_wide_factor,
    sparse_wide_widths,
)

GPT3_SMALL = dict(n_layer=12, d_model=768, d_ff=3072, vocab_size=50257, seq_len=2048)


def test_family_formulas_match_the_paper():
    assert sparse_wide_factor(0.75) == 2.0
    assert sparse_wide_factor(0.5) == pytest.approx(math.sqrt(2))
    assert sparse_parallel_branches(0.75) == pytest.approx(4.0)
    # d_sf = Din·Dout / ((Din+Dout)(1-s)); d_sd = s·Din·Dout / (Din+Dout)
    assert sparse_factorized_rank(768, 3072, 0.5) == pytest.approx(768 * 3072 / (3840 * 0.5))
    assert sparse_doped_rank(768, 3072, 0.5) == pytest.approx(0.5 * 768 * 3072 / 3840)


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(["wide", "parallel", "factorized", "doped"]),
    st.integers(1, 4096),
    st.integers(1, 4096),
    st.floats(0.0, 0.99),
)
def test_every_family_member_is_iso_flop(member, d_in, d_out, s):
    assert family_layer_flops(member, d_in, d_out, s) == pytest.approx(2.0 * d_in * d_out, rel=1e-9)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, "0.5", True, float("nan")])
def test_sparsity_out_of_range_is_rejected(bad):
    with pytest.raises(ValueError, match="sparsity"):
        sparse_wide_factor(bad)


@pytest.mark.parametrize("s, d_model, d_ff", [(0.0, 768, 3072), (0.5, 1092, 4344), (0.75, 1536, 6144)])
def test_table14_widths(s, d_model, d_ff):
    assert sparse_wide_widths(768, 3072, 12, s) == (d_model, d_ff)


def test_hardware_friendly_widths():
    assert sparse_wide_widths(768, 3072, 12, 0.5, width_multiple=64) == (1152, 4352)  # head size 96
    assert sparse_wide_widths(768, 3072, 12, 0.75, width_multiple=64) == (1536, 6144)


def test_flop_counter_against_hand_computed_numbers():
    # Dense GPT-3 Small, per token, forward, context 2048:
    #   blocks 12·2·(4·768² + 2·768·3072) = 12·2·7,077,888 = 169,869,312
    #   LM head 2·768·50257 = 77,194,752; attention 12·(2·2·2048·768) = 75,497,472
    dense = count_flops(GPTShape(**GPT3_SMALL))
    assert dense.sparse_matmul == 169_869_312
    assert dense.dense_matmul == 77_194_752
    assert dense.attention == 75_497_472
    assert dense.forward == 322_561_536
    assert dense.training == 3 * 322_561_536
    # Sparse Wide 75%: every block weight matrix is 4× larger and 1/4 active -> same block FLOPs;
    # LM head and attention double with the width.
    sw75 = count_flops(GPTShape(**{**GPT3_SMALL, "d_model": 1536, "d_ff": 6144}, layer_sparsity=0.75))
    assert sw75.sparse_matmul == 169_869_312
    assert sw75.sparse_matmul_executed == 4 * 169_869_312
    assert sw75.dense_matmul == 154_389_504
    assert sw75.attention == 150_994_944
    assert flop_ratio(
        GPTShape(**{**GPT3_SMALL, "d_model": 1536, "d_ff": 6144}, layer_sparsity=0.75), GPTShape(**GPT3_SMALL)
    ) == pytest.approx(475_253_760 / 322_561_536)


def test_dense_linears_in_blocks_are_counted_as_dense():
    shape = GPTShape(
        n_layer=1, d_model=8, d_ff=32, vocab_size=10, seq_len=4, layer_sparsity=0.5, sparse_layers=("fc_in", "fc_out")
    )
    c = count_flops(shape)
    assert c.sparse_matmul == 2 * (256 + 256) * 0.5
    assert c.dense_matmul == 2 * 4 * 64 + 2 * 8 * 10


@pytest.mark.parametrize("scope", ["total", "sparse_layers"])
@pytest.mark.parametrize("widths", [(1152, 4352), (1092, 4344), (1536, 6144), (1000, 5000)])
def test_calibration_is_iso_flop_within_1e6(scope, widths):
    dense = GPTShape(**{**GPT3_SMALL, "vocab_size": 512, "seq_len": 256})
    wide = GPTShape(**{**GPT3_SMALL, "vocab_size": 512, "seq_len": 256, "d_model": widths[0], "d_ff": widths[1]})
    s = calibrate_sparsity(dense, wide, scope=scope)
    calibrated = GPTShape(
        **{**GPT3_SMALL, "vocab_size": 512, "seq_len": 256, "d_model": widths[0], "d_ff": widths[1]}, layer_sparsity=s
    )
    measure = (lambda c: c.forward) if scope == "total" else (lambda c: c.sparse_matmul)
    assert abs(measure(count_flops(calibrated)) / measure(count_flops(dense)) - 1) < 1e-6
    assert 0 < s < 1


def test_calibration_reports_impossible_widths():
    dense = GPTShape(**GPT3_SMALL)
    # At 2048 wide, the dense LM head and attention alone exceed the dense model's total FLOPs.
    with pytest.raises(ValueError, match="no sparsity is iso-FLOP"):
        calibrate_sparsity(dense, GPTShape(**{**GPT3_SMALL, "d_model": 2048, "d_ff": 8192}), scope="total")
    with pytest.raises(ValueError, match="fewer FLOPs"):
        calibrate_sparsity(dense, GPTShape(**{**GPT3_SMALL, "d_model": 512, "d_ff": 2048}))
    with pytest.raises(ValueError, match="scope"):
        calibrate_sparsity(dense, dense, scope="blocks")
