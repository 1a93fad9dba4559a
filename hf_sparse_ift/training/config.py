"""Pretraining configuration: one YAML file (``configs/pretrain-*.yaml``) plus dotted overrides.

    model:  a preset from configs/models (``preset: gpt3-small-sw75``) and/or SparseWideGPTConfig fields
    data:   dataset, tokenizer, context length, validation stream
    optim:  AdamW and the learning-rate schedule (warm-up in tokens, cosine to a fraction of peak)
    dst:    dynamic sparse training (`hf_sparse_ift.dst.DSTConfig`)
    train:  batch sizes, length, precision, logging, evaluation and checkpoint cadence

Every key is checked before any work starts: an unknown key or an impossible value raises
ValueError naming it (``train.micro_batch_size=0 is invalid: ...``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import yaml

from ..models.sparse_wide_gpt.configuration_sparse_wide_gpt import SparseWideGPTConfig
from ..sparsity.dst import DSTConfig
from ..resources import load_yaml, resolve_config_path

BUILTIN = "builtin"


def _bad(key: str, value, allowed: str):
    raise ValueError(f"{key}={value!r} is invalid: {allowed}")


def _positive_int(key, value, allow_none=False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        _bad(key, value, "expected an integer >= 1" + (" or null" if allow_none else ""))


def _number(key, value, low=None, high=None, low_open=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        _bad(key, value, "expected a number")
    if low is not None and (value < low or (low_open and value == low)):
        _bad(key, value, f"expected a number {'>' if low_open else '>='} {low}")
    if high is not None and value > high:
        _bad(key, value, f"expected a number <= {high}")


@dataclass
class DataConfig:
    """dataset: ``builtin`` (the corpus shipped in hf_sparse_ift/builtin), a Hub dataset name streamed
    with `datasets` (e.g. monology/pile-uncopyrighted), or a loader name (json, parquet, text) with
    ``data_files``. tokenizer: ``builtin`` or any tokenizer name/path (GPT-2 BPE:
    openai-community/gpt2). offline_fallback: when a Hub dataset cannot be reached (offline), train on
    the built-in corpus and tokenizer instead, with a warning, rather than fail. prefetch_batches:
    micro-batches packed ahead in a background thread so the accelerator never waits for the tokenizer
    (0: pack on demand)."""

    dataset: str = BUILTIN
    dataset_config: str | None = None
    data_files: str | list[str] | dict | None = None
    text_column: str = "text"
    train_split: str = "train"
    validation_split: str | None = "validation"
    tokenizer: str = BUILTIN
    seq_len: int = 128
    shuffle_buffer: int = 0
    offline_fallback: bool = True
    prefetch_batches: int = 32

    def validate(self):
        _positive_int("data.seq_len", self.seq_len)
        if isinstance(self.shuffle_buffer, bool) or not isinstance(self.shuffle_buffer, int) or self.shuffle_buffer < 0:
            _bad("data.shuffle_buffer", self.shuffle_buffer, "expected an integer >= 0")
        if isinstance(self.prefetch_batches, bool) or not isinstance(self.prefetch_batches, int) \
                or self.prefetch_batches < 0:
            _bad("data.prefetch_batches", self.prefetch_batches, "expected an integer >= 0 (0: no background thread)")
        for key in ("dataset", "text_column", "train_split", "tokenizer"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                _bad(f"data.{key}", getattr(self, key), "expected a non-empty string")


@dataclass
class OptimConfig:
    """AdamW and the schedule of the paper's Appendix D: linear warm-up over `warmup_tokens`, then
    cosine decay to `min_lr_ratio` × lr at the end of training."""

    lr: float = 6e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    warmup_tokens: float = 375e6
    min_lr_ratio: float = 0.1

    def validate(self):
        _number("optim.lr", self.lr, low=0, low_open=True)
        if not isinstance(self.betas, (list, tuple)) or len(self.betas) != 2 or not all(
                isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas):
            _bad("optim.betas", self.betas, "expected two numbers in [0, 1)")
        self.betas = tuple(float(b) for b in self.betas)
        _number("optim.eps", self.eps, low=0, low_open=True)
        _number("optim.weight_decay", self.weight_decay, low=0)
        _number("optim.grad_clip", self.grad_clip, low=0)
        _number("optim.warmup_tokens", self.warmup_tokens, low=0)
        _number("optim.min_lr_ratio", self.min_lr_ratio, low=0, high=1)


@dataclass
class TrainLoopConfig:
    """global_batch_size: sequences per optimizer step (all ranks; reached by gradient accumulation).
    total_tokens or max_steps: training length (max_steps wins when both are set).
    mixed_precision: auto (bf16 on GPU, fp32 on CPU), bf16, fp16 or no. peak_tflops: the accelerator's
    dense bf16 peak, for MFU (auto: 989 on H100, unset on CPU). attention_backend: restrict PyTorch's SDPA to
    one kernel family on GPUs (auto keeps PyTorch's order; see benchmarks/results for which is faster)."""

    output_dir: str = "outputs/run"
    seed: int = 0
    global_batch_size: int = 16
    micro_batch_size: int = 16
    total_tokens: float | None = None
    max_steps: int | None = 200
    mixed_precision: str = "auto"
    compile: bool = False
    gradient_checkpointing: bool = False
    log_interval: int = 10
    eval_interval: int = 50
    eval_batches: int = 8
    checkpoint_interval: int = 100
    keep_checkpoints: int = 2
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    project_name: str = "hf-sparse-ift"
    peak_tflops: float | str = "auto"
    attention_backend: str = "auto"
    progress_bar: bool = True

    def validate(self):
        for key in ("global_batch_size", "micro_batch_size", "log_interval", "eval_interval", "eval_batches",
                    "checkpoint_interval", "keep_checkpoints"):
            _positive_int(f"train.{key}", getattr(self, key))
        _positive_int("train.max_steps", self.max_steps, allow_none=True)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            _bad("train.seed", self.seed, "expected an integer >= 0")
        if self.total_tokens is not None:
            _number("train.total_tokens", self.total_tokens, low=0, low_open=True)
        if self.max_steps is None and self.total_tokens is None:
            _bad("train.max_steps", None, "set train.max_steps or train.total_tokens")
        if self.mixed_precision not in ("auto", "bf16", "fp16", "no"):
            _bad("train.mixed_precision", self.mixed_precision, "expected auto, bf16, fp16 or no")
        if self.global_batch_size % self.micro_batch_size:
            _bad("train.global_batch_size", self.global_batch_size,
                 f"must be a multiple of train.micro_batch_size={self.micro_batch_size}")
        if not isinstance(self.trackers, list):
            _bad("train.trackers", self.trackers, "expected a list such as [tensorboard] or []")
        if self.attention_backend not in ("auto", "flash", "cudnn", "efficient", "math"):
            _bad("train.attention_backend", self.attention_backend, "expected auto, flash, cudnn, efficient or math")
        if self.peak_tflops != "auto" and self.peak_tflops is not None:
            _number("train.peak_tflops", self.peak_tflops, low=0, low_open=True)


@dataclass
class PretrainConfig:
    model: dict
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    dst: DSTConfig = field(default_factory=DSTConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)

    def model_config(self) -> SparseWideGPTConfig:
        values = dict(self.model)
        preset = values.pop("preset", None)
        if preset is not None:
            values = {**load_yaml(resolve_config_path(preset, "models")), **values}
        values.setdefault("n_positions", self.data.seq_len)
        try:
            return SparseWideGPTConfig(**values)
        except ValueError as err:
            raise ValueError(f"model: {err}") from None

    def validate(self) -> PretrainConfig:
        self.data.validate()
        self.optim.validate()
        self.train.validate()
        config = self.model_config()
        if self.data.seq_len > config.n_positions:
            _bad("data.seq_len", self.data.seq_len, f"must be <= model n_positions={config.n_positions}")
        return self

    def steps(self) -> int:
        """Optimizer steps: max_steps, else total_tokens / tokens per step (rounded up)."""
        if self.train.max_steps is not None:
            return self.train.max_steps
        return math.ceil(self.train.total_tokens / (self.train.global_batch_size * self.data.seq_len))

    def warmup_steps(self) -> int:
        return min(self.steps(), round(self.optim.warmup_tokens / (self.train.global_batch_size * self.data.seq_len)))

    def to_dict(self) -> dict:
        return {"model": dict(self.model), "data": asdict(self.data), "optim": asdict(self.optim),
                "dst": asdict(self.dst), "train": asdict(self.train)}

    def to_yaml(self) -> str:
        d = self.to_dict()
        d["optim"]["betas"] = list(d["optim"]["betas"])
        return yaml.safe_dump(d, sort_keys=False)


SECTIONS = {"data": DataConfig, "optim": OptimConfig, "dst": DSTConfig, "train": TrainLoopConfig}


def parse_override(text: str) -> tuple[list[str], object]:
    """``train.max_steps=100`` -> (["train", "max_steps"], 100); values are parsed as YAML."""
    if "=" not in text:
        raise ValueError(f"override {text!r} is invalid: expected section.key=value, e.g. train.max_steps=100")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw)


def _set_dotted(tree: dict, path: list[str], value) -> None:
    if len(path) < 2 or path[0] not in ("model", *SECTIONS):
        raise ValueError(f"unknown config key {'.'.join(path)!r}: expected a key under one of "
                         f"{['model', *SECTIONS]}, e.g. train.max_steps")
    node = tree
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"config key {'.'.join(path)!r} goes through a value that is not a mapping")
    node[path[-1]] = value


def load_pretrain_config(name_or_path, overrides: list[str] | None = None) -> PretrainConfig:
    """Read a pretraining YAML (path or preset name), apply ``key=value`` overrides, validate."""
    tree = load_yaml(resolve_config_path(name_or_path)) if name_or_path else {}
    for text in overrides or []:
        _set_dotted(tree, *parse_override(text))
    return build_pretrain_config(tree)


def build_pretrain_config(tree: dict) -> PretrainConfig:
    unknown = sorted(set(tree) - {"model", *SECTIONS})
    if unknown:
        raise ValueError(f"unknown config section(s) {unknown}; valid: {['model', *SECTIONS]}")
    if not isinstance(tree.get("model"), dict):
        raise ValueError("model: expected a mapping with a preset name and/or SparseWideGPTConfig fields")
    sections = {}
    for name, cls in SECTIONS.items():
        values = tree.get(name) or {}
        known = {f.name for f in fields(cls)}
        bad = sorted(set(values) - known)
        if bad:
            raise ValueError(f"unknown config key(s) {[f'{name}.{k}' for k in bad]}; valid keys in {name}: {sorted(known)}")
        sections[name] = cls(**values)
    return PretrainConfig(model=tree["model"], **sections).validate()
