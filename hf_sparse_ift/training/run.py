"""The resolved run config: every value a run really uses, built once before any work.

`PretrainConfig` is what the user wrote. `RunConfig` adds what follows from it and from the machine: the
model's derived sizes, the data source actually read (a fallback or a held-out split included), processes,
accumulation, tokens per step, steps, warm-up, precision, the memory estimate, and every decision the package
took on the user's behalf. It is saved with each checkpoint (``run_config.yaml``) and is the source of every
record: the summary, the tracker's hparams, the exported ``training_config.yaml`` and the model card.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import yaml

from ..data.pipeline import DataSource, load_tokenizer, resolve_data_source
from ..errors import UsageError
from ..models.sparse_wide_gpt.configuration_sparse_wide_gpt import SparseWideGPTConfig
from ..models.sparse_wide_gpt.iso_flop import model_summary
from .config import PretrainConfig, build_pretrain_config
from .hardware import available_memory_bytes, resolve_block_kernel, resolve_cpu_allocator, resolve_mixed_precision

# Keys that may differ on --resume: they change how the run is watched or how fast it goes, or extend it.
# Any other difference is refused: the checkpointed optimizer, schedule, masks and data would not match it.
RESUME_MAY_CHANGE = frozenset(
    {
        "train.max_steps",
        "train.total_tokens",
        "train.log_interval",
        "train.eval_interval",
        "train.checkpoint_interval",
        "train.keep_checkpoints",
        "train.trackers",
        "train.progress_bar",
        "train.compile",
        "train.gradient_checkpointing",
        "train.attention_backend",
        "train.cpu_allocator",
        "train.peak_tflops",
        "train.check_memory",
        "data.prefetch_batches",
    }
)


@dataclass
class RunConfig:
    config: PretrainConfig
    model_config: SparseWideGPTConfig
    data: DataSource
    processes: int
    accumulation: int
    mixed_precision: str
    total_steps: int
    warmup_steps: int
    memory_estimate_bytes: int
    block_kernel: dict[str, str] | None = None  # the block-sparse layers' kernel by device type; None: no block layers
    cpu_allocator: str = "unchanged"  # hardware.CPU_ALLOCATORS, resolved
    tokenizer: object = field(default=None, repr=False)  # loaded once here, so a bad one fails before any work
    decisions: list[str] = field(default_factory=list)
    resume_changes: list[str] = field(default_factory=list)

    @functools.cached_property
    def model_summary(self) -> dict:
        """`iso_flop.model_summary` of the model at the run's context length: computed once (setup, every record and
        checkpoint read it)."""
        return model_summary(self.model_config, self.data.seq_len)

    @property
    def tokens_per_step(self) -> int:
        return self.config.train.global_batch_size * self.data.seq_len

    @property
    def total_tokens(self) -> int:
        return self.total_steps * self.tokens_per_step

    def to_dict(self) -> dict:
        return {
            **self.config.to_dict(),
            "resolved": {
                "model": self.model_summary,
                "data": self.data.to_dict(),
                "processes": self.processes,
                "accumulation": self.accumulation,
                "micro_batch_size": self.config.train.micro_batch_size,
                "mixed_precision": self.mixed_precision,
                "block_kernel": self.block_kernel,
                "cpu_allocator": self.cpu_allocator,
                "tokens_per_step": self.tokens_per_step,
                "total_steps": self.total_steps,
                "total_tokens": self.total_tokens,
                "warmup_steps": self.warmup_steps,
                "memory_estimate_gb": round(self.memory_estimate_bytes / 1e9, 3),
                "decisions": list(self.decisions),
                "resume_changes": list(self.resume_changes),
            },
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def flat(self) -> dict:
        """Scalars by dotted key (tracker hparams)."""
        out = {}

        def walk(prefix, node):
            if isinstance(node, dict):
                for key, value in node.items():
                    walk(f"{prefix}.{key}" if prefix else str(key), value)
            else:
                out[prefix] = node if isinstance(node, (int, float, str, bool)) else str(node)

        walk("", self.to_dict())
        return out


def training_memory_bytes(model: SparseWideGPTConfig, seq_len: int) -> int:
    """A lower bound of what training takes: fp32 weights, gradients and two Adam moments (16 bytes per
    parameter) and 1 byte per mask entry. Activations are left out on purpose: they depend on precision, the
    attention kernel and recomputation, and a lower bound must never refuse a run that fits. A block-sparse model
    stores only its active blocks (and a small block index), so only its active parameters count."""
    summary = model_summary(model, seq_len)
    if model.uses_blocks:  # block-sparse layers store their active blocks only, and no mask
        return 16 * summary["parameters_active"]
    return 16 * summary["parameters_total"] + summary["sparse_weights"]


def _cpu_block_kernel_decision(block_shape: tuple[int, int]) -> str:
    """Which code the "cpu" block kernel runs here for blocks of `block_shape`: the built native library (and the
    threads it shares work on) or the torch path. Decided by what is built and by the blocks, so every record says it."""
    from hf_sparse_ift.models.sparse_wide_gpt import block_sparse_cpu

    refused = block_sparse_cpu.native_refuses(tuple(block_shape))
    if refused is not None:
        return (
            f"block-sparse layers on CPU compute with the torch path: the native kernel does not take them ({refused})"
        )
    info = block_sparse_cpu.kernel_info()
    if info is None:
        return "block-sparse layers on CPU compute with the torch path (no usable native kernel built here)"
    return (
        f"block-sparse layers on CPU compute with the native kernel {info['path']} (sha256 "
        f"{info.get('library_sha256', '?')[:16]}, built {info.get('built_at')}), on {info.get('threads')} threads"
    )


def resolve_run(
    cfg: PretrainConfig, processes: int, previous: dict | None = None, saved_model: dict | None = None
) -> RunConfig:
    """Everything the run will use, checked before any work. `previous`: the run config of the checkpoint a
    --resume continues from (differences are applied and recorded, or refused, per `RESUME_MAY_CHANGE`);
    `saved_model`: that checkpoint's model config.json (the resolved model must not differ from it)."""
    accumulation = cfg.accumulation_steps(processes)
    _, decisions = cfg.model_values()
    model = cfg.model_config()
    cfg.dst.check_model(model)
    memory = training_memory_bytes(model, cfg.data.seq_len)
    if cfg.train.check_memory:
        available, where = available_memory_bytes()
        if memory > available:
            raise UsageError(
                f"the model needs about {memory / 1e9:,.1f} GB to train ({model_summary(model)['parameters_total']:,} "
                f"parameters; weights, gradients and Adam state alone) but the {where} is "
                f"{available / 1e9:,.1f} GB: choose a smaller model (model.sparsity={model.sparsity} widens it "
                f"to d_model {model.hidden_size}) or micro-batch, or set train.check_memory=false to try anyway"
            )
    data = resolve_data_source(cfg.data)
    tokenizer = load_tokenizer(data.tokenizer)
    if len(tokenizer) > model.vocab_size:
        raise UsageError(
            f"data.tokenizer={data.tokenizer!r} has {len(tokenizer)} tokens but model.vocab_size is "
            f"{model.vocab_size}: set model.vocab_size >= {len(tokenizer)}"
        )
    if data.fallback:
        decisions.append(data.fallback)
    if data.holdout_every:
        decisions.append(
            f"validation: {data.describe_validation()}, because the source has no split {cfg.data.validation_split!r}"
        )
    precision = resolve_mixed_precision(cfg.train.mixed_precision)
    if precision != cfg.train.mixed_precision:
        decisions.append(f"train.mixed_precision=auto: {precision}")
    block_kernel = resolve_block_kernel(model, precision)
    if block_kernel is not None and model.block_kernel == "auto":
        decisions.append(
            "model.block_kernel=auto: " + ", ".join(f"{kernel} on {device}" for device, kernel in block_kernel.items())
        )
    if block_kernel is not None and block_kernel.get("cpu") == "cpu":
        decisions.append(_cpu_block_kernel_decision(model.block_shape))
    if cfg.train.attention_backend != "auto" and not _cuda_available():
        decisions.append(
            f"train.attention_backend={cfg.train.attention_backend} selects among CUDA kernels and has no effect "
            "without a GPU: attention runs PyTorch's CPU kernel"
        )
    cpu_allocator, allocator_decision = resolve_cpu_allocator(cfg.train.cpu_allocator, _cuda_available())
    if allocator_decision:
        decisions.append(allocator_decision)
    total_steps = cfg.steps()
    no_update = dst_without_updates(cfg.dst, total_steps)
    if no_update:
        decisions.append(no_update)
    warmup = cfg.warmup_steps()
    run = RunConfig(
        config=cfg,
        model_config=model,
        data=data,
        processes=processes,
        accumulation=accumulation,
        mixed_precision=precision,
        total_steps=total_steps,
        warmup_steps=warmup,
        memory_estimate_bytes=memory,
        block_kernel=block_kernel,
        cpu_allocator=cpu_allocator,
        tokenizer=tokenizer,
        decisions=decisions,
    )
    if previous is not None:
        run.resume_changes = resume_changes(previous, cfg, saved_model)
    return run


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def dst_without_updates(dst, total_steps: int) -> str | None:
    """A sentence for the records when `dst.method` updates masks but this run's schedule holds no update (the first
    update step is not before the last), else None: the masks then stay as initialised, as with static."""
    from ..sparsity.dst.methods import METHODS

    if not METHODS[dst.method].updates_masks:
        return None
    last = int(dst.stop_fraction * total_steps)
    if dst.drop_fraction == 0:
        why, fix = "dst.drop_fraction=0 replaces no weight", "raise dst.drop_fraction"
    elif dst.update_interval >= last:
        why = (
            f"its first update would be at step dst.update_interval={dst.update_interval}, and updates stop before "
            f"step {last} (dst.stop_fraction={dst.stop_fraction} x {total_steps} steps)"
        )
        fix = f"set dst.update_interval below {last} or raise dst.stop_fraction" if last > 1 else "train longer"
    else:
        return None
    return (
        f"dst.method={dst.method} makes no mask update in this run: {why}; the masks stay as initialised, as with "
        f"dst.method=static ({fix} for updates)"
    )


def model_changes(saved: dict, model: SparseWideGPTConfig) -> list[str]:
    """``model.<key>: old -> new`` for every SparseWideGPTConfig argument in which `model` differs from `saved`, the
    config.json of a checkpoint's model: what the config resolves to now (a preset file may have been edited since),
    not how it is written."""
    import inspect

    keys = [k for k in inspect.signature(SparseWideGPTConfig.__init__).parameters if k not in ("self", "kwargs")]
    keys.remove("sparse_format")  # how the weights are stored, not the model
    # config.json leaves out values equal to the defaults: rebuild the config to read every one
    before = SparseWideGPTConfig(**{k: saved[k] for k in keys if k in saved})
    out = []
    for key in keys:
        old, new = getattr(before, key), getattr(model, key)
        if old != new:
            out.append(f"model.{key}: {old!r} -> {new!r}")
    return out


def resume_changes(previous: dict, cfg: PretrainConfig, saved_model: dict | None = None) -> list[str]:
    """Differences between the checkpoint's config and this one: those in `RESUME_MAY_CHANGE` are listed (they
    apply), any other is refused with every offending key named. `saved_model`: the checkpoint's model config.json,
    compared with the model this config resolves to (the same YAML can name an edited preset file)."""
    before = build_pretrain_config({k: v for k, v in previous.items() if k != "resolved"}).to_dict()
    after = cfg.to_dict()
    changed, refused = [], []
    for section in after:
        for key in sorted(set(before.get(section, {})) | set(after[section])):
            old, new = before.get(section, {}).get(key), after[section].get(key)
            if old == new:
                continue
            dotted = f"{section}.{key}"
            (changed if dotted in RESUME_MAY_CHANGE else refused).append(f"{dotted}: {old!r} -> {new!r}")
    if saved_model is not None:
        named = {change.split(":")[0] for change in refused}
        resolved = [c for c in model_changes(saved_model, cfg.model_config()) if c.split(":")[0] not in named]
        if resolved:
            preset = cfg.model.get("preset")
            refused.append(
                f"the model the config resolves to differs from the checkpoint's ({'; '.join(resolved)}"
                + (f"; model.preset={preset!r} was edited since?" if preset else "")
                + ")"
            )
    if refused:
        raise UsageError(
            f"--resume: {'; '.join(refused)} differ from the checkpoint's run config and cannot change "
            f"mid-run (the checkpointed optimizer, schedule, masks and data position depend on them). "
            f"Keys that may change on resume: {sorted(RESUME_MAY_CHANGE)}. To change the others, start "
            "a new run in another train.output_dir"
        )
    return changed
