"""Pretraining configuration: one YAML file (``configs/pretrain-*.yaml``) plus dotted overrides.

    model:  a preset from configs/models (``preset: gpt3-small-sw75``) and/or SparseWideGPTConfig fields
    data:   dataset, tokenizer, context length, validation stream
    optim:  AdamW and the learning-rate schedule (warm-up in tokens, cosine to a fraction of peak)
    dst:    dynamic sparse training (`hf_sparse_ift.sparsity.dst.DSTConfig`)
    train:  batch sizes, length, precision, logging, evaluation and checkpoint cadence

Every key is checked before any work starts: an unknown key or an impossible value raises ValueError
naming it (``train.micro_batch_size=0 is invalid: ...``). What the run then really uses, derived values
included, is `hf_sparse_ift.training.run.RunConfig`.
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING

import yaml

from .. import checks
from ..data.config import DataConfig
from ..errors import UsageError
from ..resources import load_yaml, parse_yaml, resolve_config_path
from ..sparsity.dst.config import DSTConfig
from .hardware import ATTENTION_BACKENDS, CPU_ALLOCATORS, MIXED_PRECISION

if TYPE_CHECKING:
    from ..models.sparse_wide_gpt.configuration_sparse_wide_gpt import SparseWideGPTConfig


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
        checks.number("optim.lr", self.lr, low=0, low_open=True)
        if (
            not isinstance(self.betas, (list, tuple))
            or len(self.betas) != 2
            or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in self.betas)
        ):
            checks.invalid("optim.betas", self.betas, "expected two numbers in [0, 1)")
        self.betas = tuple(float(b) for b in self.betas)
        checks.number("optim.eps", self.eps, low=0, low_open=True)
        checks.number("optim.weight_decay", self.weight_decay, low=0)
        checks.number("optim.grad_clip", self.grad_clip, low=0)
        checks.number("optim.warmup_tokens", self.warmup_tokens, low=0)
        checks.number("optim.min_lr_ratio", self.min_lr_ratio, low=0, high=1)


@dataclass
class TrainLoopConfig:
    """How long and how the loop runs.

    global_batch_size: sequences per optimizer step (all ranks; reached by gradient accumulation).
    total_tokens or max_steps: training length (set one; a file or preset that sets only total_tokens leaves
        max_steps unset).
    mixed_precision: auto (bf16 on GPU, fp32 on CPU), bf16, fp16 or no.
    peak_tflops: the accelerator's dense bf16 peak for MFU (auto: known GPUs, none on CPU).
    attention_backend: restrict PyTorch's SDPA to one kernel family on GPUs (auto keeps PyTorch's order).
    cpu_allocator: auto (on CPU with glibc, keep freed memory for the next step: keep-freed), keep-freed or
        unchanged (leave the process's C allocator as it is).
    check_memory: refuse, before allocating anything, a model whose estimated training memory exceeds the
        machine's (set false to try anyway).
    """

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
    peak_tflops: float | str | None = "auto"
    attention_backend: str = "auto"
    cpu_allocator: str = "auto"
    progress_bar: bool = True
    check_memory: bool = True

    def validate(self):
        for key in (
            "global_batch_size",
            "micro_batch_size",
            "log_interval",
            "eval_interval",
            "eval_batches",
            "checkpoint_interval",
            "keep_checkpoints",
        ):
            checks.integer(f"train.{key}", getattr(self, key))
        checks.integer("train.max_steps", self.max_steps, allow_none=True)
        checks.integer("train.seed", self.seed, low=0)
        if self.total_tokens is not None:
            checks.number("train.total_tokens", self.total_tokens, low=0, low_open=True)
        if self.max_steps is None and self.total_tokens is None:
            checks.invalid("train.max_steps", None, "set train.max_steps or train.total_tokens")
        if self.max_steps is not None and self.total_tokens is not None:
            checks.invalid(
                "train.total_tokens",
                self.total_tokens,
                f"train.max_steps={self.max_steps} is set too, and the two disagree about the length of training; "
                "set one: train.max_steps=null to train for train.total_tokens, or train.total_tokens=null",
            )
        checks.choice("train.mixed_precision", self.mixed_precision, MIXED_PRECISION)
        checks.choice("train.attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        checks.choice("train.cpu_allocator", self.cpu_allocator, CPU_ALLOCATORS)
        if not isinstance(self.trackers, list):
            checks.invalid("train.trackers", self.trackers, "expected a list such as [tensorboard] or []")
        if self.peak_tflops not in ("auto", None):
            checks.number("train.peak_tflops", self.peak_tflops, low=0, low_open=True)
        for key in ("compile", "gradient_checkpointing", "progress_bar", "check_memory"):
            if not isinstance(getattr(self, key), bool):
                checks.invalid(f"train.{key}", getattr(self, key), "expected true or false")
        checks.text("train.output_dir", self.output_dir)


SECTIONS = {"data": DataConfig, "optim": OptimConfig, "dst": DSTConfig, "train": TrainLoopConfig}


@dataclass
class PretrainConfig:
    """The run as the user wrote it (YAML plus overrides), validated."""

    model: dict
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    dst: DSTConfig = field(default_factory=DSTConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)

    def model_values(self) -> tuple[dict, list[str]]:
        """SparseWideGPTConfig arguments (preset merged with explicit fields) and the decisions taken."""
        values = dict(self.model)
        preset = values.pop("preset", None)
        if preset is not None:
            values = {**load_yaml(resolve_config_path(preset, "models")), **values}
        decisions = []
        if "n_positions" not in values:
            values["n_positions"] = self.data.seq_len
            decisions.append(f"model.n_positions was not given: set to data.seq_len={self.data.seq_len}")
        return values, decisions

    def model_config(self) -> SparseWideGPTConfig:
        from ..models.sparse_wide_gpt.configuration_sparse_wide_gpt import SparseWideGPTConfig

        try:
            return SparseWideGPTConfig(**self.model_values()[0])
        except (TypeError, ValueError) as err:
            raise UsageError(f"model: {err}") from None

    def validate(self) -> PretrainConfig:
        self.data.validate()
        self.optim.validate()
        self.train.validate()
        config = self.model_config()
        if self.data.seq_len > config.n_positions:
            checks.invalid("data.seq_len", self.data.seq_len, f"must be <= model n_positions={config.n_positions}")
        self.accumulation_steps(processes=1)
        return self

    def accumulation_steps(self, processes: int) -> int:
        """Micro-batches per optimizer step on each of `processes` ranks (the global batch must divide evenly)."""
        per_step = self.train.micro_batch_size * processes
        if self.train.global_batch_size % per_step:
            checks.invalid(
                "train.global_batch_size",
                self.train.global_batch_size,
                f"must be a multiple of train.micro_batch_size x processes = "
                f"{self.train.micro_batch_size} x {processes}",
            )
        return self.train.global_batch_size // per_step

    def steps(self) -> int:
        """Optimizer steps: max_steps, else total_tokens / tokens per step (rounded up)."""
        if self.train.max_steps is not None:
            return self.train.max_steps
        return -(-int(self.train.total_tokens) // (self.train.global_batch_size * self.data.seq_len))

    def plan(self, mfu: float, peak_tflops: float) -> dict:
        """`iso_flop.training_plan` of this run: parameters, FLOPs, tokens and GPU-hours (``hf-sparse-ift plan``)."""
        from ..models.sparse_wide_gpt.iso_flop import training_plan

        return training_plan(
            self.model_config(), self.data.seq_len, self.steps(), self.train.global_batch_size, mfu, peak_tflops
        )

    def warmup_steps(self) -> int:
        return min(self.steps(), round(self.optim.warmup_tokens / (self.train.global_batch_size * self.data.seq_len)))

    def to_dict(self) -> dict:
        tree = {"model": dict(self.model), **{name: asdict(getattr(self, name)) for name in SECTIONS}}
        tree["optim"]["betas"] = list(tree["optim"]["betas"])
        return tree

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def section_keys() -> dict[str, list[str]]:
    """Every settable key of the data, optim, dst and train sections, read off their dataclasses (the CLI's help lists
    these without importing torch)."""
    return {name: [f.name for f in fields(cls)] for name, cls in SECTIONS.items()}


def config_keys() -> dict[str, list[str]]:
    """Every settable key, by section: ``model`` (a preset and the `SparseWideGPTConfig` arguments) and the others."""
    from ..models.sparse_wide_gpt.configuration_sparse_wide_gpt import SparseWideGPTConfig

    model = [p for p in inspect.signature(SparseWideGPTConfig.__init__).parameters if p not in ("self", "kwargs")]
    return {"model": ["preset", *model], **section_keys()}


def parse_override(text: str) -> tuple[list[str], object]:
    """``train.max_steps=100`` -> (["train", "max_steps"], 100); values are parsed as YAML (``1e-4`` is a float)."""
    if "=" not in text:
        raise UsageError(f"override {text!r} is invalid: expected section.key=value, e.g. train.max_steps=100")
    key, raw = text.split("=", 1)
    where = f"override {text!r}: the value {raw!r}"
    try:
        return key.strip().split("."), parse_yaml(raw, where=where)
    except ValueError as err:
        raise UsageError(f"{err}; quote text values and close brackets, e.g. optim.betas=[0.9,0.95]") from None


def _set_dotted(tree: dict, path: list[str], value) -> None:
    if len(path) != 2 or path[0] not in ("model", *SECTIONS):
        raise UsageError(
            f"unknown config key {'.'.join(path)!r}: expected section.key with a section of "
            f"{['model', *SECTIONS]}, e.g. train.max_steps"
        )
    section = tree.setdefault(path[0], {})
    if section is None:
        section = tree[path[0]] = {}
    section[path[1]] = value


def load_pretrain_config(name_or_path, overrides: list[str] | None = None) -> PretrainConfig:
    """Read a pretraining YAML (path or preset name), apply ``key=value`` overrides, validate."""
    tree = load_yaml(resolve_config_path(name_or_path)) if name_or_path else {}
    for text in overrides or []:
        _set_dotted(tree, *parse_override(text))
    return build_pretrain_config(tree)


def build_pretrain_config(tree: dict) -> PretrainConfig:
    unknown = sorted(set(tree) - {"model", *SECTIONS})
    if unknown:
        raise UsageError(f"unknown config section(s) {unknown}; valid: {['model', *SECTIONS]}")
    if not isinstance(tree.get("model"), dict):
        raise UsageError("model: expected a mapping with a preset name and/or SparseWideGPTConfig fields")
    sections = {}
    for name, cls in SECTIONS.items():
        values = tree.get(name) or {}
        if not isinstance(values, dict):
            raise UsageError(f"{name}: expected a mapping of keys, got {values!r}")
        known = {f.name for f in fields(cls)}
        bad = sorted(set(values) - known)
        if bad:
            raise UsageError(
                f"unknown config key(s) {[f'{name}.{k}' for k in bad]}; valid keys in {name}: {sorted(known)}"
            )
        if name == "train" and values.get("total_tokens") is not None and "max_steps" not in values:
            values = {**values, "max_steps": None}  # the length given is total_tokens, not the default max_steps
        sections[name] = cls(**values)
    return PretrainConfig(model=tree["model"], **sections).validate()
