"""The pretraining loop: accelerate for devices / precision / accumulation / checkpoints / trackers,
`DSTEngine` for the masks, `PackedStream` for the data, transformers' cosine schedule for the lr.

Checkpoints (``<output_dir>/checkpoint-<step>``) hold the full training state written by
``accelerator.save_state`` (model with masks, optimizer, scheduler, RNG, the DST engine and every rank's
data position) plus ``hf/``, a `save_pretrained` export with tokenizer and model card. Each is written
to a ``.tmp`` folder and renamed into place, so a crash while saving leaves the previous one intact.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from .data import Batches, PackedStream, load_tokenizer, resolve_data_config, validation_batches
from ..sparsity import parameter_counts
from ..sparsity.dst import DSTEngine, summarize
from ..models.sparse_wide_gpt.iso_flop import count_flops
from ..models.sparse_wide_gpt.modeling_sparse_wide_gpt import SparseWideGPTForCausalLM
from .optimizer import build_optimizer, peak_flops, set_sdpa_backend
from .config import PretrainConfig

logger = logging.getLogger("hf_sparse_ift.pretrain")
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class NonFiniteLossError(RuntimeError):
    pass


class DataPosition:
    """Every rank's data position (after the last batch it trained on), saved by the main process in one
    checkpoint object."""

    def __init__(self, batches: Batches, accelerator: Accelerator):
        self.batches, self.accelerator = batches, accelerator

    def state_dict(self) -> dict:
        return {"ranks": gather_object([self.batches.state_dict()])}

    def load_state_dict(self, state: dict) -> None:
        ranks = state["ranks"]
        if len(ranks) != self.accelerator.num_processes:
            raise ValueError(f"checkpoint was written by {len(ranks)} processes, this run has "
                             f"{self.accelerator.num_processes}: data positions cannot be matched")
        self.batches.load_state_dict(ranks[self.accelerator.process_index])


class DeferredScalars:
    """Device scalars read one step late: each push starts a non-blocking copy to pinned host memory and
    returns the previous push's value, by which time the GPU has long produced it."""

    def __init__(self, device: torch.device):
        self.async_copy = device.type == "cuda"
        self.pending = None

    def push(self, value: torch.Tensor, **info) -> dict | None:
        if self.async_copy:
            host = torch.empty((), dtype=value.dtype, pin_memory=True)
            host.copy_(value, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = value, None
        previous, self.pending = self.pending, (host, event, info)
        return self._read(previous)

    def flush(self) -> dict | None:
        previous, self.pending = self.pending, None
        return self._read(previous)

    @staticmethod
    def _read(item) -> dict | None:
        if item is None:
            return None
        host, event, info = item
        if event is not None:
            event.synchronize()
        return {**info, "loss": float(host)}


class TrainingProgress:
    """Step counter and tokens seen, checkpointed with the rest."""

    def __init__(self):
        self.step = 0
        self.tokens = 0

    def state_dict(self):
        return {"step": self.step, "tokens": self.tokens}

    def load_state_dict(self, state):
        self.step, self.tokens = state["step"], state["tokens"]


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (a ``.tmp`` folder is an interrupted save and is ignored)."""
    root = Path(output_dir)
    found = [(int(m.group(1)), p) for p in root.glob("checkpoint-*") if (m := CHECKPOINT.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def pretrain(cfg: PretrainConfig, resume: bool = False) -> dict:
    """Train as `cfg` says; returns a summary (final step, losses, checkpoint paths, wall time)."""
    start_time = time.time()
    out_dir = Path(cfg.train.output_dir)
    precision = cfg.train.mixed_precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_step = cfg.train.micro_batch_size * world
    if cfg.train.global_batch_size % per_step:
        raise ValueError(f"train.global_batch_size={cfg.train.global_batch_size} is invalid: must be a multiple of "
                         f"micro_batch_size x processes = {cfg.train.micro_batch_size} x {world}")
    accumulation = cfg.train.global_batch_size // per_step
    trackers = [t for t in cfg.train.trackers if t]
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=precision,
                              gradient_accumulation_steps=accumulation,
                              log_with=trackers or None, project_dir=str(out_dir),
                              dynamo_backend="inductor" if cfg.train.compile else "no")
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)  # "removed shared tensor" of tied lm_head
    set_seed(cfg.train.seed)
    set_sdpa_backend(cfg.train.attention_backend)

    data_cfg = resolve_data_config(cfg.data)
    tokenizer = load_tokenizer(data_cfg.tokenizer)
    model_config = cfg.model_config()
    if len(tokenizer) > model_config.vocab_size:
        raise ValueError(f"tokenizer {data_cfg.tokenizer!r} has {len(tokenizer)} tokens but model vocab_size is "
                         f"{model_config.vocab_size}: set model.vocab_size >= {len(tokenizer)}")
    model = SparseWideGPTForCausalLM(model_config)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.to(accelerator.device)
    total_steps = cfg.steps()
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=cfg.warmup_steps(), num_training_steps=total_steps,
        min_lr_rate=cfg.optim.min_lr_ratio)
    # The scheduler steps once per optimizer step; accelerate must not multiply it by the process count.
    model, optimizer = accelerator.prepare(model, optimizer)
    engine = DSTEngine(model, optimizer, cfg.dst, total_steps=total_steps)
    stream = PackedStream(data_cfg, tokenizer, data_cfg.train_split, accelerator.process_index,
                          accelerator.num_processes, seed=cfg.train.seed)
    train_batches = Batches(stream, cfg.train.micro_batch_size, prefetch=data_cfg.prefetch_batches,
                            pin_memory=accelerator.device.type == "cuda")
    progress = TrainingProgress()
    accelerator.register_for_checkpointing(scheduler, engine, DataPosition(train_batches, accelerator), progress)

    if resume:
        found = list_checkpoints(out_dir)
        if not found:
            raise FileNotFoundError(f"--resume: no complete checkpoint-<step> folder in {out_dir}")
        accelerator.load_state(str(found[-1]))
        logger.info("resumed from %s at step %d", found[-1], progress.step)
    elif list_checkpoints(out_dir):
        raise FileExistsError(f"{out_dir} already holds checkpoints: pass --resume to continue, or choose "
                              "another train.output_dir")

    val = validation_batches(data_cfg, tokenizer, cfg.train.micro_batch_size, cfg.train.eval_batches,
                             accelerator.process_index, accelerator.num_processes)
    unwrapped = accelerator.unwrap_model(model)
    flops_per_token = count_flops(model_config.shape(seq_len=data_cfg.seq_len))
    peak = peak_flops(cfg.train.peak_tflops)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "pretrain_config.yaml").write_text(cfg.to_yaml())
    if trackers:
        flat = {f"{s}.{k}": (v if isinstance(v, (int, float, str, bool)) else str(v))
                for s, d in cfg.to_dict().items() for k, v in d.items()}
        accelerator.init_trackers(cfg.train.project_name, config=flat)

    counts = parameter_counts(unwrapped)
    logger.info("model: %s total / %s active parameters, sparsity %.3f, %d steps x %d sequences x %d tokens, "
                "accumulation %d, precision %s, data %s", f"{counts['total']:,}", f"{counts['active']:,}",
                engine.sparsity(), total_steps, cfg.train.global_batch_size, data_cfg.seq_len, accumulation,
                precision, data_cfg.dataset)

    def evaluate() -> float | None:
        if not val:
            return None
        model.eval()
        losses = []
        with torch.no_grad():
            for x in val:
                x = x.to(accelerator.device)
                losses.append(model(input_ids=x, labels=x).loss.float())
        model.train()
        return accelerator.gather(torch.stack(losses)).mean().item()

    history = {"train_loss": [], "val_loss": []}
    if progress.step == 0:
        v = evaluate()
        if v is not None:
            history["val_loss"].append((0, v))
            accelerator.log({"val/loss": v, "val/perplexity": math.exp(v)}, step=0)
            logger.info("step 0: val loss %.4f", v)

    bar = None
    if accelerator.is_main_process and cfg.train.progress_bar:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=progress.step, desc="pretrain", unit="step", dynamic_ncols=True)
    tokens_per_step = cfg.train.global_batch_size * data_cfg.seq_len
    window_start, window_tokens = time.perf_counter(), 0
    model.train()
    grad_norm = None
    mask_checks = 0  # DST updates after which all ranks were verified to hold the same masks
    last_tok_s = None
    losses = DeferredScalars(accelerator.device)

    def record(step: int, loss: float, lr: float) -> None:
        """Book-keeping of a finished step, run once its loss has reached the host."""
        nonlocal window_start, window_tokens, last_tok_s
        if not math.isfinite(loss):
            last = list_checkpoints(out_dir)
            raise NonFiniteLossError(
                f"loss is {loss} at step {step}: stopping. The last good checkpoint is "
                f"{last[-1] if last else 'none (no checkpoint was written yet)'}; lower optim.lr or check the data.")
        history["train_loss"].append((step, loss))
        if step % cfg.train.log_interval and step != total_steps:
            return
        elapsed = time.perf_counter() - window_start
        last_tok_s = tok_s = window_tokens / max(elapsed, 1e-9)
        logs = {"train/loss": loss, "train/lr": lr, "train/tokens_seen": step * tokens_per_step,
                "train/tokens_per_s": tok_s, "train/sparsity": engine.sparsity()}
        if grad_norm is not None:
            logs["train/grad_norm"] = float(grad_norm)
        if peak:
            logs["train/mfu_active"] = tok_s * flops_per_token.training / peak
            logs["train/mfu_executed"] = tok_s * flops_per_token.training_executed / peak
        accelerator.log(logs, step=step)
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}", sparsity=f"{logs['train/sparsity']:.3f}")
        else:
            logger.info("step %d/%d: loss %.4f, lr %.3g, %s tokens/s, sparsity %.3f%s", step, total_steps, loss, lr,
                        f"{tok_s:,.0f}", logs["train/sparsity"],
                        f", MFU {logs['train/mfu_active']:.3f} active / {logs['train/mfu_executed']:.3f} executed"
                        if peak else "")
        window_start, window_tokens = time.perf_counter(), 0

    try:
        while progress.step < total_steps:
            step_loss = torch.zeros((), device=accelerator.device)
            for _ in range(accumulation):
                x = next(train_batches).to(accelerator.device, non_blocking=True)
                with accelerator.accumulate(model):
                    loss = model(input_ids=x, labels=x).loss
                    accelerator.backward(loss)
                    step_loss += loss.detach() / accumulation
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip) \
                            if cfg.optim.grad_clip > 0 else None
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            # The loss is read one step late, so the host prepares the next batch while the GPU still computes.
            finished = losses.push(accelerator.reduce(step_loss, reduction="mean"),
                                   step=progress.step + 1, lr=scheduler.get_last_lr()[0])
            scheduler.step()
            telemetry = engine.step()
            progress.step += 1
            progress.tokens += tokens_per_step
            window_tokens += tokens_per_step
            if finished is not None:
                record(**finished)
            if telemetry is not None:
                if not engine.masks_synchronized():
                    raise RuntimeError("sparse masks differ between ranks after the DST update at step "
                                       f"{progress.step}")
                mask_checks += accelerator.num_processes > 1
                accelerator.log(summarize(telemetry), step=progress.step)
            evaluate_now = progress.step % cfg.train.eval_interval == 0 or progress.step == total_steps
            save_now = progress.step % cfg.train.checkpoint_interval == 0 or progress.step == total_steps
            if evaluate_now or save_now:  # never evaluate or checkpoint a step whose loss was not checked
                finished = losses.flush()
                if finished is not None:
                    record(**finished)
            if bar is not None:
                bar.update(1)
            if evaluate_now:
                v = evaluate()
                if v is not None:
                    history["val_loss"].append((progress.step, v))
                    accelerator.log({"val/loss": v, "val/perplexity": math.exp(v)}, step=progress.step)
                    if bar is not None:
                        bar.write(f"step {progress.step}: val loss {v:.4f} (perplexity {math.exp(v):.1f})")
                    else:
                        logger.info("step %d: val loss %.4f (perplexity %.1f)", progress.step, v, math.exp(v))
            if save_now:
                save_checkpoint(accelerator, model, tokenizer, cfg, out_dir, progress.step)
    finally:
        train_batches.close()
    if bar is not None:
        bar.close()
    accelerator.end_training()
    summary = {"steps": progress.step, "tokens": progress.tokens, "wall_seconds": time.time() - start_time,
               "val_loss": history["val_loss"], "final_train_loss": history["train_loss"][-1][1] if history["train_loss"] else None,
               "checkpoints": [str(p) for p in list_checkpoints(out_dir)], "dataset": data_cfg.dataset,
               "processes": accelerator.num_processes, "mask_checks": mask_checks, "tokens_per_s": last_tok_s,
               "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None}
    if accelerator.is_main_process:
        (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def save_checkpoint(accelerator: Accelerator, model, tokenizer, cfg: PretrainConfig, out_dir: Path, step: int) -> Path:
    """Write ``checkpoint-<step>`` atomically (``.tmp`` then rename) and keep the newest K."""
    final = out_dir / f"checkpoint-{step}"
    tmp = out_dir / f"checkpoint-{step}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every rank has written its RNG state into tmp before it is renamed
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        export = tmp / "hf"
        unwrapped.save_pretrained(export, state_dict=accelerator.get_state_dict(model, unwrap=True)
                                  if accelerator.distributed_type.name.startswith("FSDP") else None)
        tokenizer.save_pretrained(export)
        (export / "training_config.yaml").write_text(cfg.to_yaml())
        from ..evaluation.model_card import write_model_card

        write_model_card(export, repo_id=out_dir.name, training_config=cfg.to_dict())
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(out_dir)[:-cfg.train.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _fsync_tree(root: Path) -> None:
    """Flush every file of a checkpoint to disk before it is renamed into place."""
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
