"""Pretraining data: stream documents with `datasets`, tokenise on the fly, pack into sequences.

* Source: the built-in corpus (shipped, offline), a Hub dataset streamed (the Pile mirror
  ``monology/pile-uncopyrighted`` in the paper configs), or local json / jsonl / parquet / txt files.
* Sharding: ``datasets.distributed.split_dataset_by_node`` gives each rank a disjoint part (whole
  files when their count divides the world size, else every world_size-th document).
* Packing: documents are joined with EOS and cut into ``seq_len`` tokens; the remainder carries over
  to the next sequence, so no token is lost or repeated within an epoch.
* Resume: `PackedStream.state_dict` holds the `datasets` stream position, the carried-over tokens
  and the epoch, so training continues on exactly the sequence where it stopped.
* Never starving the GPU: `Batches` packs batches ahead in a background thread (the tokenizer runs in
  Rust without the GIL) and tokenises 64 documents per call, so there is no long burst to wait for.
"""

from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path

import torch
from datasets import IterableDataset, load_dataset
from datasets.distributed import split_dataset_by_node

from ..resources import builtin_dir
from .config import BUILTIN, DataConfig

logger = logging.getLogger(__name__)
TOKENIZE_BATCH_DOCS = 64


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    path = builtin_dir() / "tokenizer" if name == BUILTIN else name
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {name!r} has no EOS token, which packing needs between documents")
    return tokenizer


def _local_loader(files) -> str | None:
    """`datasets` loader for local files, from their extension (None when `files` is not local)."""
    first = files if isinstance(files, str) else (next(iter(files.values())) if isinstance(files, dict) else files[0])
    first = first[0] if isinstance(first, list) else first
    suffixes = Path(first).suffixes
    for ext, loader in ((".jsonl", "json"), (".json", "json"), (".parquet", "parquet"), (".txt", "text")):
        if ext in suffixes:
            return loader
    return None


def load_documents(cfg: DataConfig, split: str) -> IterableDataset:
    """A streaming dataset of documents for `split` (the built-in corpus offers train / validation)."""
    if cfg.dataset == BUILTIN:
        files = {s: str(builtin_dir() / f"corpus-{s}.jsonl.gz") for s in ("train", "validation")}
        if split not in files:
            raise ValueError(f"the built-in corpus has splits {sorted(files)}, not {split!r}")
        return load_dataset("json", data_files={split: files[split]}, split=split, streaming=True)
    if cfg.data_files is not None:
        loader = cfg.dataset if cfg.dataset in ("json", "parquet", "text", "csv") else _local_loader(cfg.data_files)
        if loader is None:
            raise ValueError(f"data.data_files={cfg.data_files!r}: cannot tell the format; set data.dataset to "
                             "json, parquet, text or csv")
        files = cfg.data_files if isinstance(cfg.data_files, dict) else {split: cfg.data_files}
        return load_dataset(loader, data_files=files, split=split, streaming=True)
    return load_dataset(cfg.dataset, cfg.dataset_config, split=split, streaming=True)


def resolve_data_config(cfg: DataConfig) -> DataConfig:
    """`cfg`, or the built-in corpus and tokenizer when a Hub dataset cannot be reached and
    ``offline_fallback`` allows it (the run says so loudly: it is not the data you asked for)."""
    if cfg.dataset == BUILTIN or cfg.data_files is not None or not cfg.offline_fallback:
        return cfg
    try:
        next(iter(load_documents(cfg, cfg.train_split)))
        return cfg
    except Exception as err:  # offline, no such dataset, no network: all end in the same fallback
        logger.warning("Cannot stream dataset %r (%s: %s); training on the BUILT-IN corpus and tokenizer instead "
                       "(set data.offline_fallback=false to fail instead).", cfg.dataset, type(err).__name__, err)
        return DataConfig(**{**cfg.__dict__, "dataset": BUILTIN, "tokenizer": BUILTIN, "data_files": None,
                             "validation_split": "validation"})


class PackedStream(torch.utils.data.IterableDataset):
    """This rank's stream of packed ``seq_len``-token sequences, endless (epochs follow each other)."""

    def __init__(self, cfg: DataConfig, tokenizer, split: str, rank: int = 0, world_size: int = 1, seed: int = 0,
                 endless: bool = True, tokenize_batch_docs: int = TOKENIZE_BATCH_DOCS):
        self.cfg, self.split, self.seed, self.endless = cfg, split, seed, endless
        self.eos = tokenizer.eos_token_id
        docs = load_documents(cfg, split)
        if cfg.shuffle_buffer:
            docs = docs.shuffle(seed=seed, buffer_size=cfg.shuffle_buffer)
        docs = split_dataset_by_node(docs, rank=rank, world_size=world_size)
        column = cfg.text_column

        def tokenize(batch):
            if column not in batch:
                raise ValueError(f"data.text_column={column!r} is not a column of {cfg.dataset!r}; "
                                 f"columns: {sorted(batch)}")
            # verbose=False: documents longer than model_max_length are expected; packing cuts them.
            return {"input_ids": tokenizer(batch[column], add_special_tokens=False, verbose=False)["input_ids"]}

        # 64 documents per tokenizer call instead of datasets' 1000: a call takes tens of milliseconds instead
        # of up to 1.6 s on Pile-sized documents, for 8% less throughput (still 3x what an H100 needs).
        self.tokens = docs.map(tokenize, batched=True, batch_size=tokenize_batch_docs,
                               remove_columns=list(docs.column_names or [column]))
        self.epoch = 0
        self.buffer: list[int] = []
        self._resume_state = None

    def __iter__(self):
        seq_len = self.cfg.seq_len
        while True:
            self.tokens.set_epoch(self.epoch)
            if self._resume_state is not None:
                self.tokens.load_state_dict(self._resume_state)
                self._resume_state = None
            produced = False
            for example in self.tokens:
                self.buffer.extend(example["input_ids"])
                self.buffer.append(self.eos)
                while len(self.buffer) >= seq_len:
                    sequence, self.buffer = self.buffer[:seq_len], self.buffer[seq_len:]
                    produced = True
                    yield torch.tensor(sequence, dtype=torch.long)
            if not produced:
                raise ValueError(f"split {self.split!r} of {self.cfg.dataset!r} gave this rank fewer than "
                                 f"data.seq_len={seq_len} tokens")
            self.epoch += 1
            self.buffer = []  # an epoch's last partial sequence is dropped, not mixed into the next epoch
            if not self.endless:
                return

    # Resuming: the stream position is read right after a sequence was taken, so it is exact.
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "buffer": list(self.buffer), "stream": self.tokens.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = state["epoch"]
        self.buffer = list(state["buffer"])
        self._resume_state = state["stream"]


class Batches:
    """Endless ``(batch_size, seq_len)`` batches of a `PackedStream`, made up to `prefetch` batches ahead
    in a background thread (``prefetch=0``: made on demand in the caller's thread).

    Without the queue the training loop waits for every tokenizer call, and the GPU with it
    (`benchmarks/data_loading.py` measures how much). `state_dict` is the stream position right after
    the last batch handed out, not after the ones made ahead, so a checkpoint resumes exactly.
    """

    def __init__(self, stream: PackedStream, batch_size: int, prefetch: int = 32, pin_memory: bool = False):
        self.stream, self.batch_size, self.prefetch, self.pin_memory = stream, batch_size, prefetch, pin_memory
        self._position = None  # stream state after the last batch handed out (None: nothing handed out yet)
        self._iterator = None
        self._thread = None
        self._queue = queue.Queue(maxsize=max(prefetch, 1))
        self._stop = threading.Event()

    def _make(self):
        """The next batch and the stream state right after it (run by the producer)."""
        if self._iterator is None:
            self._iterator = iter(self.stream)
        batch = torch.stack([next(self._iterator) for _ in range(self.batch_size)])
        if self.pin_memory:
            batch = batch.pin_memory()  # so that .to(device, non_blocking=True) really is asynchronous
        return batch, self.stream.state_dict()

    def _produce(self):
        while not self._stop.is_set():
            try:
                item = self._make()
            except BaseException as err:  # handed to the consumer, which raises it
                item = err
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        if self._stop.is_set():
            raise RuntimeError("these Batches were closed")
        if self.prefetch == 0:
            batch, self._position = self._make()
            return batch
        if self._thread is None:
            self._thread = threading.Thread(target=self._produce, name="hf_sparse_ift-batches", daemon=True)
            self._thread.start()
        item = self._queue.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        batch, self._position = item
        return batch

    def close(self) -> None:
        """Stop the producer thread. It is a daemon, so a process that forgets this still exits, and one
        stuck reading a stalled network stream is left behind after a minute rather than waited for."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def state_dict(self) -> dict:
        return self.stream.state_dict() if self._position is None else self._position

    def load_state_dict(self, state: dict) -> None:
        if self._thread is not None or self._iterator is not None:
            raise RuntimeError("Batches.load_state_dict must come before the first batch is taken")
        self.stream.load_state_dict(state)
        self._position = None


def validation_batches(cfg: DataConfig, tokenizer, batch_size: int, num_batches: int, rank: int, world_size: int):
    """A fixed list of held-out batches (the same at every evaluation, so losses compare).

    At most `num_batches`; fewer when one pass over the held-out split gives fewer sequences.
    """
    if cfg.validation_split is None:
        return []
    sequences = []
    for sequence in PackedStream(cfg, tokenizer, cfg.validation_split, rank, world_size, endless=False):
        sequences.append(sequence)
        if len(sequences) == batch_size * num_batches:
            break
    usable = len(sequences) - len(sequences) % batch_size
    return [torch.stack(sequences[i:i + batch_size]) for i in range(0, usable, batch_size)]
