"""The data section of a pretraining config: where the tokens come from (`DataConfig`)."""

from __future__ import annotations

from dataclasses import dataclass

from .. import checks

BUILTIN = "builtin"
LOCAL_LOADERS = ("json", "parquet", "text", "csv")
BAD_TEXT = ("error", "skip")


@dataclass
class DataConfig:
    """Where the tokens come from.

    dataset: ``builtin`` (the corpus shipped in hf_sparse_ift/builtin), a Hub dataset streamed with `datasets`
        (e.g. monology/pile-uncopyrighted), or a loader (json, parquet, text, csv) for ``data_files``.
    data_files: local files (a path, a glob, a list, or {split: files}); the loader follows from the file names
        (.jsonl/.json, .parquet, .txt, .csv, also compressed) unless ``dataset`` names one.
    validation_split: the held-out split; when the source has none (a single local file, say), every
        ``holdout_every``-th document of the training split is held out instead, and never trained on.
    tokenizer: ``builtin`` or any tokenizer name/path (GPT-2 BPE: openai-community/gpt2).
    offline_fallback: when a *Hub* dataset cannot be reached because the machine is offline, train on the
        built-in corpus and tokenizer instead; every record of the run says so. Any other problem is an error.
    prefetch_batches: micro-batches packed ahead in a background thread (0: pack on demand).
    bad_text: what a document whose ``text_column`` is not a string (null, an empty CSV cell, a number) does:
        ``error`` (default) stops, naming the file, column and first bad row (the first 1000 documents of each
        split are checked before training starts); ``skip`` leaves such documents out and counts them in
        ``train_summary.json`` (``skipped_documents``).
    """

    dataset: str = BUILTIN
    dataset_config: str | None = None
    data_files: str | list[str] | dict | None = None
    text_column: str = "text"
    train_split: str = "train"
    validation_split: str | None = "validation"
    holdout_every: int = 100
    tokenizer: str = BUILTIN
    seq_len: int = 128
    shuffle_buffer: int = 0
    offline_fallback: bool = True
    prefetch_batches: int = 32
    bad_text: str = "error"

    def validate(self):
        checks.integer("data.seq_len", self.seq_len)
        checks.integer("data.holdout_every", self.holdout_every, low=2)
        checks.integer("data.shuffle_buffer", self.shuffle_buffer, low=0)
        checks.integer("data.prefetch_batches", self.prefetch_batches, low=0)
        checks.choice("data.bad_text", self.bad_text, BAD_TEXT)
        for key in ("dataset", "text_column", "train_split", "tokenizer"):
            checks.text(f"data.{key}", getattr(self, key))
        if self.validation_split is not None:
            checks.text("data.validation_split", self.validation_split)
        if self.data_files is None and self.dataset in LOCAL_LOADERS:
            checks.invalid(
                "data.dataset",
                self.dataset,
                "a local-file loader needs data.data_files (the files to read); or name a Hub dataset, or builtin",
            )
        if self.data_files is not None and not isinstance(self.data_files, (str, list, dict)):
            checks.invalid("data.data_files", self.data_files, "expected a path, a list of paths or {split: paths}")
