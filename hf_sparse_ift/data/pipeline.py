"""Pretraining data: find out what will really be read, stream documents, tokenise on the fly, pack.

* `resolve_data_source` turns the ``data:`` config into a `DataSource` before any work: the loader (from the
  file names when only ``data_files`` is given), the files (checked to exist), the validation stream (a split,
  or a deterministic slice of training documents held out), the tokenizer, and — only when a Hub dataset
  cannot be reached because the machine is offline — the built-in fallback with its reason. It reads the
  first document of each stream, so a missing column or an empty file is an error before training starts.
* Bad text: a document whose text is not a string (a JSON null, an empty CSV cell, a number) stops the run with
  its file, column and row (`bad_texts` finds them by reading the split's files in order; the first
  `CHECKED_DOCUMENTS` of each split are read before training), or, with ``data.bad_text: skip``, is left out and
  counted (`PackedStream.skipped`, saved with the stream position).
* Sharding: ``datasets.distributed.split_dataset_by_node`` gives each rank a disjoint part.
* Packing: documents are joined with EOS and cut into ``seq_len`` tokens; the remainder carries over to the
  next sequence, so no token is lost or repeated within an epoch.
* Resume: `PackedStream.state_dict` holds the `datasets` stream position, the carried-over tokens and the
  epoch, so training continues on exactly the sequence where it stopped.
* Never starving the GPU: `Batches` packs batches ahead in a background thread (the tokenizer runs in Rust
  without the GIL) and tokenises 64 documents per call, so there is no long burst to wait for.
"""

from __future__ import annotations

import glob
import logging
import os
import queue
import threading
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from datasets import IterableDataset, load_dataset
from datasets.distributed import split_dataset_by_node

from ..errors import InputNotFoundError, UsageError
from ..resources import builtin_dir
from .config import BUILTIN, LOCAL_LOADERS, DataConfig

logger = logging.getLogger(__name__)
TOKENIZE_BATCH_DOCS = 64
CHECKED_DOCUMENTS = 1000  # documents of each split whose text is checked before training starts
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst", ".lz4", ".zip")
_LOADER_BY_SUFFIX = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".csv": "csv"}


@dataclass(frozen=True)
class DataSource:
    """What a run actually reads; written into every record of the run."""

    dataset: str  # builtin, a Hub dataset name, or the loader of local files
    data_files: dict | None  # {split: [paths]} for local files
    dataset_config: str | None
    text_column: str
    train_split: str
    validation_split: str | None  # a split of its own; None with holdout_every: held out of train_split
    holdout_every: int | None  # every n-th training document is held out for validation (never trained on)
    tokenizer: str
    seq_len: int
    shuffle_buffer: int = 0
    fallback: str | None = None  # why the built-in corpus replaced what the config asked for
    bad_text: str = "error"  # or "skip": documents whose text is not a string are left out and counted

    def describe_validation(self) -> str:
        if self.holdout_every:
            return (
                f"every {_ordinal(self.holdout_every)} document of split {self.train_split!r} held out "
                f"({100 / self.holdout_every:.2g}% of documents; not trained on)"
            )
        return f"split {self.validation_split!r}" if self.validation_split else "none"

    def to_dict(self) -> dict:
        return {**asdict(self), "validation": self.describe_validation()}


# ----------------------------------------------------------------------------------------------
# Resolving the config into a source
# ----------------------------------------------------------------------------------------------
def load_tokenizer(name: str, key: str = "data.tokenizer"):
    """The tokenizer `name` (a folder, a Hub name or builtin); errors name it as ``key=name``."""
    from transformers import AutoTokenizer

    path = builtin_dir() / "tokenizer" if name == BUILTIN else name
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as err:
        if _is_offline_error(err):
            raise UsageError(
                f"{key}={name!r}: cannot reach the Hub to load it (offline); pass a local tokenizer folder or builtin"
            ) from None
        raise UsageError(f"{key}={name!r} cannot be loaded: {err}") from None
    if tokenizer.eos_token_id is None:
        raise UsageError(f"tokenizer {name!r} has no EOS token, which packing needs between documents")
    return tokenizer


def _is_offline_error(err: BaseException) -> bool:
    """True when `err` (or what caused it) says the Hub could not be reached, not that something is missing."""
    names = {
        "ConnectionError",
        "ConnectTimeout",
        "ConnectError",
        "TimeoutException",
        "ReadTimeout",
        "OfflineModeIsEnabled",
        "LocalEntryNotFoundError",
    }
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (ConnectionError, TimeoutError)) or type(err).__name__ in names:
            return True
        err = err.__cause__ or err.__context__
    return False


def _local_files(cfg: DataConfig) -> dict[str, list[str]]:
    """{split: [existing paths]}, globs expanded; a missing file is an error naming it."""
    files = cfg.data_files if isinstance(cfg.data_files, dict) else {cfg.train_split: cfg.data_files}
    resolved = {}
    for split, patterns in files.items():
        paths = []
        for pattern in [patterns] if isinstance(patterns, str) else list(patterns):
            found = sorted(glob.glob(os.path.expanduser(str(pattern))))
            if not found:
                raise InputNotFoundError(f"data.data_files: {pattern!r} (split {split!r}) matches no file")
            paths += found
        resolved[split] = paths
    return resolved


def _infer_loader(files: dict[str, list[str]]) -> str:
    loaders = set()
    for path in (p for paths in files.values() for p in paths):
        suffixes = [s.lower() for s in Path(path).suffixes]
        while suffixes and suffixes[-1] in _COMPRESSION:
            suffixes.pop()
        loader = _LOADER_BY_SUFFIX.get(suffixes[-1] if suffixes else "")
        if loader is None:
            raise UsageError(
                f"data.data_files: cannot tell the format of {path!r} from its name; expected "
                f"{sorted(_LOADER_BY_SUFFIX)} (optionally compressed {list(_COMPRESSION)}), or set "
                f"data.dataset to one of {list(LOCAL_LOADERS)}"
            )
        loaders.add(loader)
    if len(loaders) > 1:
        raise UsageError(f"data.data_files mixes formats {sorted(loaders)}; use files of one format")
    return loaders.pop()


def _source(cfg: DataConfig, **where) -> DataSource:
    """The source `cfg` describes, read from `where` (dataset, data_files, dataset_config); the validation split is
    settled by the caller once it knows which splits exist."""
    return DataSource(
        **where,
        text_column=cfg.text_column,
        train_split=cfg.train_split,
        validation_split=None,
        holdout_every=None,
        tokenizer=cfg.tokenizer,
        seq_len=cfg.seq_len,
        shuffle_buffer=cfg.shuffle_buffer,
        bad_text=cfg.bad_text,
    )


def _builtin_source(cfg: DataConfig, fallback: str | None = None) -> DataSource:
    return DataSource(
        dataset=BUILTIN,
        data_files=None,
        dataset_config=None,
        text_column="text",
        train_split="train",
        validation_split="validation" if cfg.validation_split else None,
        holdout_every=None,
        tokenizer=BUILTIN if fallback else cfg.tokenizer,
        seq_len=cfg.seq_len,
        shuffle_buffer=cfg.shuffle_buffer,
        fallback=fallback,
        bad_text=cfg.bad_text,
    )


def resolve_data_source(cfg: DataConfig) -> DataSource:
    """What the run will read, checked by reading the first document of every stream (before any work)."""
    if cfg.data_files is not None:
        if cfg.dataset not in (BUILTIN, *LOCAL_LOADERS):
            raise UsageError(
                f"data.dataset={cfg.dataset!r} with data.data_files: data_files are local files; set "
                f"data.dataset to one of {list(LOCAL_LOADERS)} or leave it at its default to infer "
                "the format from the file names"
            )
        files = _local_files(cfg)
        loader = cfg.dataset if cfg.dataset in LOCAL_LOADERS else _infer_loader(files)
        if cfg.train_split not in files:
            raise UsageError(
                f"data.train_split={cfg.train_split!r} is not among the splits of data.data_files: {sorted(files)}"
            )
        source = _source(cfg, dataset=loader, data_files=files, dataset_config=None)
        has_validation = cfg.validation_split in files
    elif cfg.dataset == BUILTIN:
        for key, value, allowed in (
            ("train_split", cfg.train_split, ("train",)),
            ("validation_split", cfg.validation_split, ("validation", None)),
        ):
            if value not in allowed:
                raise UsageError(
                    f"data.{key}={value!r}: the built-in corpus has splits ['train', 'validation'] "
                    f"(data.{key} may be {' or '.join(map(repr, allowed))})"
                )
        return _check(_builtin_source(cfg))
    else:
        source = _source(cfg, dataset=cfg.dataset, data_files=None, dataset_config=cfg.dataset_config)
        try:
            _first_document(source, cfg.train_split)
        except Exception as err:
            if not _is_offline_error(err):
                raise UsageError(f"data.dataset={cfg.dataset!r} cannot be read: {type(err).__name__}: {err}") from None
            if not cfg.offline_fallback:
                raise UsageError(
                    f"data.dataset={cfg.dataset!r}: cannot reach the Hub (offline) and "
                    "data.offline_fallback is false; pass local data.data_files or builtin"
                ) from None
            reason = (
                f"data.dataset={cfg.dataset!r} could not be reached (offline: {type(err).__name__}); the run "
                "uses the BUILT-IN corpus and tokenizer instead (data.offline_fallback=true)"
            )
            logger.warning(reason)
            return _check(_builtin_source(cfg, fallback=reason))
        has_validation = cfg.validation_split is not None and _has_split(source, cfg.validation_split)
    if cfg.validation_split is None:
        return _check(source)
    if has_validation:
        return _check(replace(source, validation_split=cfg.validation_split))
    logger.warning(
        "%s has no split %r: holding out every %s training document for validation",
        source.dataset,
        cfg.validation_split,
        _ordinal(cfg.holdout_every),
    )
    return _check(replace(source, holdout_every=cfg.holdout_every))


def _ordinal(n: int) -> str:
    """2 -> 2nd, 3 -> 3rd, 11 -> 11th, 100 -> 100th."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _has_split(source: DataSource, split: str) -> bool:
    try:
        _first_document(source, split, raw=True)
        return True
    except ValueError as err:
        if "split" in str(err).lower():
            return False
        raise


def _first_document(source: DataSource, split: str, raw: bool = False) -> dict:
    stream = iter(_load_split(source, split))
    try:
        return next(stream)
    except StopIteration:
        raise UsageError(
            f"split {split!r} of {source.dataset!r} has no documents"
            + (f" (files {source.data_files.get(split)})" if source.data_files else "")
        ) from None


def _check(source: DataSource) -> DataSource:
    """Read the first document of every stream the run will use: column present, text non-empty."""
    roles = ["train"] + (["validation"] if source.validation_split or source.holdout_every else [])
    for role in roles:
        try:
            document = next(iter(load_documents(source, role)))
        except StopIteration:
            what = source.describe_validation() if role == "validation" else f"split {source.train_split!r}"
            if source.data_files:
                what += f", files {source.data_files[source.train_split if role == 'train' or source.holdout_every else source.validation_split]}"
            hint = (
                f": the source has fewer than data.holdout_every={source.holdout_every} documents; lower it or "
                "give a validation split"
                if role == "validation" and source.holdout_every
                else ""
            )
            raise UsageError(f"the {role} stream of {source.dataset!r} ({what}) has no documents{hint}") from None
        except Exception as err:
            if isinstance(err, UsageError):
                raise
            raise UsageError(
                f"the {role} data of {source.dataset!r} cannot be read: {type(err).__name__}: {err}"
            ) from None
        if source.text_column not in document:
            raise UsageError(
                f"data.text_column={source.text_column!r} is not a column of {source.dataset!r}; "
                f"columns: {sorted(document)}"
            )
    if source.bad_text == "error":
        for split in dict.fromkeys(s for s in (source.train_split, source.validation_split) if s):
            found = next(bad_texts(source, split, CHECKED_DOCUMENTS), None)
            if found is not None:
                raise BadTextError(bad_text_message(source, split, *found))
    return source


# ----------------------------------------------------------------------------------------------
# Documents whose text is not a string
# ----------------------------------------------------------------------------------------------
class BadTextError(UsageError):
    pass


def split_files(source: DataSource, split: str) -> tuple[str, list[str]] | None:
    """(loader, files) that `_load_split` streams for `split`, in stream order; None when they cannot be listed."""
    if source.dataset == BUILTIN:
        return "json", [str(builtin_dir() / f"corpus-{split}.jsonl.gz")]
    if source.data_files is not None:
        return source.dataset, list(source.data_files.get(split, []))
    from datasets import load_dataset_builder

    try:
        builder = load_dataset_builder(source.dataset, source.dataset_config)
        return builder.name, list(builder.config.data_files[split])
    except Exception:  # a dataset with a loading script, or an unreachable Hub: no file list
        return None


def bad_texts(source: DataSource, split: str, limit: int | None = None):
    """``(file, row, value)`` of each document of `split` whose text is not a string, in stream order (row: 1-based
    within its file). Reads the split's files one by one, at most `limit` documents in all."""
    listed = split_files(source, split)
    if listed is None:
        return
    loader, files = listed
    read = 0
    for file in files:
        rows = load_dataset(loader, data_files={split: [file]}, split=split, streaming=True)
        for row, document in enumerate(rows, 1):
            if limit is not None and read == limit:
                return
            read += 1
            value = document.get(source.text_column)
            if not isinstance(value, str):
                yield file, row, value


def bad_text_message(source: DataSource, split: str, file: str | None, row: int | None, value) -> str:
    where = f"{file}, row {row}" if file else f"a document of split {split!r} of {source.dataset!r}"
    return (
        f"{where}: column {source.text_column!r} holds {value!r} ({type(value).__name__}), not text; every "
        f"document's data.text_column must be a string. Fix the data, or set data.bad_text=skip to leave such "
        "documents out (they are counted)"
    )


# ----------------------------------------------------------------------------------------------
# Streams
# ----------------------------------------------------------------------------------------------
def _load_split(source: DataSource, split: str) -> IterableDataset:
    if source.dataset == BUILTIN:
        files = {s: str(builtin_dir() / f"corpus-{s}.jsonl.gz") for s in ("train", "validation")}
        if split not in files:
            raise UsageError(f"the built-in corpus has splits {sorted(files)}, not {split!r}")
        return load_dataset("json", data_files={split: files[split]}, split=split, streaming=True)
    if source.data_files is not None:
        if split not in source.data_files:
            raise UsageError(f"no split {split!r} in data.data_files (splits: {sorted(source.data_files)})")
        return load_dataset(source.dataset, data_files={split: source.data_files[split]}, split=split, streaming=True)
    return load_dataset(source.dataset, source.dataset_config, split=split, streaming=True)


def load_documents(source: DataSource, role: str) -> IterableDataset:
    """The streaming documents of the ``train`` or ``validation`` role (held-out slices never overlap)."""
    if role not in ("train", "validation"):
        raise UsageError(f"role={role!r} is invalid: expected train or validation")
    if role == "validation" and not source.holdout_every:
        if source.validation_split is None:
            raise UsageError(f"{source.dataset!r} has no validation stream (data.validation_split is null)")
        return _load_split(source, source.validation_split)
    docs = _load_split(source, source.train_split)
    if source.holdout_every:
        every = source.holdout_every
        held_out = role == "validation"
        docs = docs.filter(lambda _, index: (index % every == every - 1) == held_out, with_indices=True)
    return docs


class PackedStream(torch.utils.data.IterableDataset):
    """This rank's stream of packed ``seq_len``-token sequences, endless (epochs follow each other)."""

    def __init__(
        self,
        source: DataSource,
        tokenizer,
        role: str = "train",
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        endless: bool = True,
        tokenize_batch_docs: int = TOKENIZE_BATCH_DOCS,
    ):
        self.source, self.role, self.seed, self.endless = source, role, seed, endless
        self.split = (
            source.validation_split if role == "validation" and not source.holdout_every else source.train_split
        )
        self.eos = tokenizer.eos_token_id
        docs = load_documents(source, role)
        if source.shuffle_buffer:
            docs = docs.shuffle(seed=seed, buffer_size=source.shuffle_buffer)
        docs = split_dataset_by_node(docs, rank=rank, world_size=world_size)
        column, split = source.text_column, self.split

        def tokenize(batch):
            if column not in batch:
                raise UsageError(
                    f"data.text_column={column!r} is not a column of {source.dataset!r}; columns: {sorted(batch)}"
                )
            texts = batch[column]
            good = [i for i, text in enumerate(texts) if isinstance(text, str)]
            if len(good) < len(texts) and source.bad_text == "error":
                value = next(text for text in texts if not isinstance(text, str))
                found = next(bad_texts(source, split), (None, None, value))  # the first one in file order
                raise BadTextError(bad_text_message(source, split, *found))
            # verbose=False: documents longer than model_max_length are expected; packing cuts them.
            ids = tokenizer([texts[i] for i in good], add_special_tokens=False, verbose=False)["input_ids"]
            by_position = dict(zip(good, ids))
            return {"input_ids": [by_position.get(i) for i in range(len(texts))]}  # None: skipped, counted below

        # 64 documents per tokenizer call instead of datasets' 1000: a call takes tens of milliseconds instead
        # of up to 1.6 s on Pile-sized documents, for 8% less throughput (still 3x what an H100 needs).
        self.tokens = docs.map(
            tokenize, batched=True, batch_size=tokenize_batch_docs, remove_columns=list(docs.column_names or [column])
        )
        self.epoch = 0
        self.buffer: list[int] = []
        self.skipped = 0  # documents left out for bad text (data.bad_text=skip), over all epochs
        self._resume_state = None

    def __iter__(self):
        seq_len = self.source.seq_len
        while True:
            self.tokens.set_epoch(self.epoch)
            if self._resume_state is not None:
                self.tokens.load_state_dict(self._resume_state)
                self._resume_state = None
            produced = False
            for example in self.tokens:
                if example["input_ids"] is None:
                    if not self.skipped:
                        logger.warning(
                            "skipping documents whose %r is not text (data.bad_text=skip); train_summary.json "
                            "counts them",
                            self.source.text_column,
                        )
                    self.skipped += 1
                    continue
                self.buffer.extend(example["input_ids"])
                self.buffer.append(self.eos)
                while len(self.buffer) >= seq_len:
                    sequence, self.buffer = self.buffer[:seq_len], self.buffer[seq_len:]
                    produced = True
                    yield torch.tensor(sequence, dtype=torch.long)
            if not produced:
                files = f" (files {self.source.data_files[self.split]})" if self.source.data_files else ""
                raise UsageError(
                    f"the {self.role} stream of {self.source.dataset!r}{files} gave this rank fewer than "
                    f"data.seq_len={seq_len} tokens"
                )
            self.epoch += 1
            self.buffer = []  # an epoch's last partial sequence is dropped, not mixed into the next epoch
            if not self.endless:
                return

    # Resuming: the stream position is read right after a sequence was taken, so it is exact.
    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "buffer": list(self.buffer),
            "skipped": self.skipped,
            "stream": self.tokens.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch = state["epoch"]
        self.buffer = list(state["buffer"])
        self.skipped = state.get("skipped", 0)
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

    @property
    def producing(self) -> bool:
        """True while the background thread is running."""
        return self._thread is not None and self._thread.is_alive()

    def state_dict(self) -> dict:
        return self.stream.state_dict() if self._position is None else self._position

    def load_state_dict(self, state: dict) -> None:
        if self._thread is not None or self._iterator is not None:
            raise RuntimeError("Batches.load_state_dict must come before the first batch is taken")
        self.stream.load_state_dict(state)
        self._position = None


class HeldOutBatches(list):
    """The fixed held-out batches, and how many held-out documents were skipped for bad text."""

    skipped_documents: int = 0


def validation_batches(
    source: DataSource, tokenizer, batch_size: int, num_batches: int, rank: int = 0, world_size: int = 1
) -> HeldOutBatches:
    """A fixed list of held-out batches (the same at every evaluation, so losses compare).

    At most `num_batches`; fewer when one pass over the held-out stream gives fewer sequences.
    """
    batches = HeldOutBatches()
    if source.validation_split is None and not source.holdout_every:
        return batches
    sequences = []
    stream = PackedStream(source, tokenizer, "validation", rank, world_size, endless=False)
    for sequence in stream:
        sequences.append(sequence)
        if len(sequences) == batch_size * num_batches:
            break
    usable = len(sequences) - len(sequences) % batch_size
    batches.extend(torch.stack(sequences[i : i + batch_size]) for i in range(0, usable, batch_size))
    batches.skipped_documents = stream.skipped
    return batches
