import json

import pytest
import torch

from hf_sparse_ift.data.config import DataConfig
from hf_sparse_ift.data.pipeline import (
    DataSource,
    PackedStream,
    load_tokenizer,
    resolve_data_source,
    validation_batches,
)


def source(**values) -> DataSource:
    return resolve_data_source(DataConfig(**values))


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("builtin")


@pytest.fixture
def corpus(tmp_path):
    docs = [f"Document {i}: " + " ".join(f"word{i * 7 + j}" for j in range(i % 13 + 1)) for i in range(101)]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    return docs, str(path)


def one_epoch(stream):
    return list(iter(stream))


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_packing_and_sharding_lose_and_repeat_no_token(corpus, tokenizer, world_size):
    docs, path = corpus
    cfg = source(data_files=path, text_column="body", seq_len=16, validation_split=None)
    eos = tokenizer.eos_token_id
    for rank in range(world_size):
        stream = PackedStream(cfg, tokenizer, "train", rank=rank, world_size=world_size, endless=False)
        sequences = one_epoch(stream)
        assert all(s.shape == (16,) and s.dtype == torch.long for s in sequences)
        # This rank's documents are every world_size-th one (a single file is split by example).
        expected = []
        for doc in docs[rank::world_size]:
            expected += tokenizer(doc, add_special_tokens=False)["input_ids"] + [eos]
        got = torch.cat(sequences).tolist()
        assert got == expected[: len(got)]  # in order, nothing skipped or repeated
        assert len(expected) - len(got) < 16  # only the epoch's last partial sequence is left out


def test_stream_resumes_exactly_from_its_state(corpus, tokenizer):
    _, path = corpus
    cfg = source(data_files=path, text_column="body", seq_len=16, validation_split=None)
    stream = PackedStream(cfg, tokenizer, "train")
    it = iter(stream)
    for _ in range(37):
        next(it)
    state = stream.state_dict()
    expected = [next(it) for _ in range(60)]  # crosses into the second epoch
    again = PackedStream(cfg, tokenizer, "train")
    again.load_state_dict(state)
    it2 = iter(again)
    assert all(torch.equal(a, next(it2)) for a in expected)


def test_unknown_text_column_is_named_before_any_work(corpus, tokenizer):
    _, path = corpus
    with pytest.raises(ValueError, match=r"data\.text_column='text' is not a column"):
        source(data_files=path, text_column="text", seq_len=16)


def test_builtin_corpus_and_validation_batches(tokenizer):
    cfg = source(seq_len=64)
    first = next(iter(PackedStream(cfg, tokenizer, "train")))
    assert first.shape == (64,) and int(first.max()) < len(tokenizer)
    val = validation_batches(cfg, tokenizer, batch_size=4, num_batches=3, rank=0, world_size=1)
    assert len(val) == 3 and all(b.shape == (4, 64) for b in val)
    again = validation_batches(cfg, tokenizer, batch_size=4, num_batches=3, rank=0, world_size=1)
    assert all(torch.equal(a, b) for a, b in zip(val, again))


def test_local_text_files(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("line one of text\nline two of text\n" * 50)
    cfg = source(data_files=str(tmp_path / "a.txt"), seq_len=8, validation_split=None)
    assert cfg.dataset == "text"
    assert next(iter(PackedStream(cfg, tokenizer, "train"))).shape == (8,)


def test_prefetched_batches_equal_on_demand_ones_and_resume_exactly(corpus, tokenizer):
    from hf_sparse_ift.data.pipeline import Batches

    _, path = corpus
    cfg = source(data_files=path, text_column="body", seq_len=16, validation_split=None)
    on_demand = Batches(PackedStream(cfg, tokenizer, "train"), batch_size=8, prefetch=0)
    ahead = Batches(PackedStream(cfg, tokenizer, "train"), batch_size=8, prefetch=4)
    for _ in range(25):  # 200 sequences: crosses into the second epoch (the corpus packs into 190)
        assert torch.equal(next(on_demand), next(ahead))
    # The position is that of the last batch handed out, although the thread has made more by now.
    state = ahead.state_dict()
    assert state == on_demand.state_dict() and state["epoch"] == 1
    following = [next(ahead) for _ in range(10)]
    resumed = Batches(PackedStream(cfg, tokenizer, "train"), batch_size=8, prefetch=4)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, next(resumed)) for a in following)
    for batches in (on_demand, ahead, resumed):
        batches.close()
    assert not ahead.producing and not resumed.producing
    with pytest.raises(RuntimeError, match="closed"):
        next(ahead)
    with pytest.raises(RuntimeError, match="before the first batch"):
        on_demand.load_state_dict(state)


def test_prefetch_thread_errors_reach_the_training_loop(corpus, tokenizer):
    from hf_sparse_ift.data.pipeline import Batches

    _, path = corpus
    cfg = DataSource(
        dataset="json",
        data_files={"train": [path]},
        dataset_config=None,
        text_column="text",
        train_split="train",
        validation_split=None,
        holdout_every=None,
        tokenizer="builtin",
        seq_len=16,
    )
    batches = Batches(PackedStream(cfg, tokenizer, "train"), batch_size=2, prefetch=4)
    with pytest.raises(ValueError, match=r"data\.text_column='text' is not a column"):
        next(batches)
    assert not batches.producing
