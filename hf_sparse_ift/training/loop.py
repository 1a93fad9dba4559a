"""The pretraining loop: accelerate for devices / precision / accumulation / checkpoints / trackers,
`DSTEngine` for the masks, `PackedStream` for the data, a cosine schedule for the lr.

    pretrain(cfg)            resolve the run (config, data, memory, resume) -> lock the output folder ->
      setup(run)             accelerator, model, optimizer, schedule, DST engine, data, trackers
      fit(session)           for each step: train_step -> record -> DST update -> evaluate -> checkpoint
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed

from ..data.pipeline import Batches, PackedStream, validation_batches
from ..errors import InputNotFoundError, OutputExistsError
from ..models.sparse_wide_gpt.modeling_sparse_wide_gpt import SparseWideGPTForCausalLM
from ..sparsity import parameter_counts
from ..sparsity.dst import DSTEngine, summarize
from .checkpoint import (
    RUN_CONFIG,
    DataPosition,
    RunLock,
    TrainingProgress,
    checkpoint_step,
    ensure_writable,
    list_checkpoints,
    load_newest_checkpoint,
    newest_complete_checkpoint,
    save_checkpoint,
)
from .config import PretrainConfig
from .hardware import apply_cpu_allocator, peak_flops, set_sdpa_backend
from .optimizer import build_optimizer, build_scheduler
from .run import RunConfig, resolve_run

logger = logging.getLogger("hf_sparse_ift.pretrain")
SUMMARY = "train_summary.json"


class NonFiniteLossError(RuntimeError):
    pass


def pretrain(cfg: PretrainConfig, resume: bool = False) -> dict:
    """Train as `cfg` says; returns the summary (steps, tokens, losses, checkpoints, the resolved run config)."""
    out_dir = Path(cfg.train.output_dir)
    previous = _resume_point(out_dir, resume)
    run = resolve_run(
        cfg,
        int(os.environ.get("WORLD_SIZE", "1")),
        previous=yaml.safe_load((previous / RUN_CONFIG).read_text()) if previous else None,
        saved_model=_saved_model(previous),
    )
    finished = previous is not None and checkpoint_step(previous) >= run.total_steps
    if finished and (out_dir / SUMMARY).exists():
        print(
            f"hf-sparse-ift pretrain: {out_dir} already finished at step {checkpoint_step(previous)} "
            f"(train.max_steps / total_tokens give {run.total_steps} steps); nothing changed. Raise "
            "train.max_steps to continue it."
        )
        return json.loads((out_dir / SUMMARY).read_text())
    ensure_writable(out_dir)
    with RunLock(out_dir, enabled=int(os.environ.get("RANK", "0")) == 0):
        session = setup(run, resume)
        try:
            if finished:  # killed after its last checkpoint, before its summary: write it from the checkpoint
                logger.warning(
                    "%s finished at step %d but has no %s: writing it from the checkpoint",
                    out_dir,
                    session.progress.step,
                    SUMMARY,
                )
                return _write_summary(session)
            return fit(session)
        finally:
            session.train_batches.close()


def _saved_model(checkpoint: Path | None) -> dict | None:
    """The model config.json of a checkpoint (None without one)."""
    path = checkpoint / "hf" / "config.json" if checkpoint else None
    return json.loads(path.read_text()) if path and path.is_file() else None


def _resume_point(out_dir: Path, resume: bool) -> Path | None:
    """The checkpoint a --resume continues from; without --resume, an output folder with checkpoints is refused."""
    if not resume:
        if list_checkpoints(out_dir):
            raise OutputExistsError(
                f"{out_dir} already holds checkpoints: pass --resume to continue, or choose another train.output_dir"
            )
        return None
    found = newest_complete_checkpoint(out_dir)
    if found is None:
        raise InputNotFoundError(f"--resume: no complete checkpoint-<step> folder in {out_dir}")
    return found


# ----------------------------------------------------------------------------------------------
# Set-up
# ----------------------------------------------------------------------------------------------
@dataclass
class Session:
    """Everything a running pretraining job holds."""

    run: RunConfig
    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    engine: DSTEngine
    tokenizer: object
    train_batches: Batches
    val_batches: list
    progress: TrainingProgress
    out_dir: Path
    model_summary: dict = field(default_factory=dict)
    peak: float | None = None
    mask_checks: int = 0
    last_tokens_per_s: float | None = None


def setup(run: RunConfig, resume: bool) -> Session:
    cfg = run.config
    apply_cpu_allocator(run.cpu_allocator)  # before the model and the first step allocate
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=run.mixed_precision,
        gradient_accumulation_steps=run.accumulation,
        log_with=[t for t in cfg.train.trackers if t] or None,
        project_dir=cfg.train.output_dir,
        dynamo_backend="inductor" if cfg.train.compile else "no",
    )
    _configure_logging(accelerator)
    set_seed(cfg.train.seed)
    set_sdpa_backend(cfg.train.attention_backend)
    tokenizer = run.tokenizer
    model = SparseWideGPTForCausalLM(run.model_config)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.to(accelerator.device)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, run.warmup_steps, run.total_steps)
    # The scheduler steps once per optimizer step: it is not prepared (accelerate would scale it by processes).
    model, optimizer = accelerator.prepare(model, optimizer)
    engine = DSTEngine(model, optimizer, cfg.dst, total_steps=run.total_steps)
    stream = PackedStream(
        run.data, tokenizer, "train", accelerator.process_index, accelerator.num_processes, seed=cfg.train.seed
    )
    batches = Batches(
        stream,
        cfg.train.micro_batch_size,
        prefetch=cfg.data.prefetch_batches,
        pin_memory=accelerator.device.type == "cuda",
    )
    progress = TrainingProgress()
    accelerator.register_for_checkpointing(scheduler, engine, DataPosition(batches, accelerator), progress)
    out_dir = Path(cfg.train.output_dir)
    if resume:
        path = load_newest_checkpoint(accelerator, out_dir)
        engine.total_steps = run.total_steps  # a raised max_steps moves the end of DST updates with it
        logger.info(
            "resumed from %s at step %d%s",
            path,
            progress.step,
            f"; changed on resume: {run.resume_changes}" if run.resume_changes else "",
        )
    val = validation_batches(
        run.data,
        tokenizer,
        cfg.train.micro_batch_size,
        cfg.train.eval_batches,
        accelerator.process_index,
        accelerator.num_processes,
    )
    summary = run.model_summary
    session = Session(
        run=run,
        accelerator=accelerator,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        engine=engine,
        tokenizer=tokenizer,
        train_batches=batches,
        val_batches=val,
        progress=progress,
        out_dir=out_dir,
        model_summary=summary,
        peak=peak_flops(cfg.train.peak_tflops),
    )
    _start_records(session)
    return session


def _configure_logging(accelerator: Accelerator) -> None:
    logging.basicConfig(
        level=logging.INFO if accelerator.is_main_process else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)  # "removed shared tensor" of tied lm_head


def _start_records(s: Session) -> None:
    """Write the resolved run config, start the trackers and log what the run really is."""
    run, accelerator = s.run, s.accelerator
    if accelerator.is_main_process:
        s.out_dir.mkdir(parents=True, exist_ok=True)
        (s.out_dir / RUN_CONFIG).write_text(run.to_yaml())
    if run.config.train.trackers:
        accelerator.init_trackers(run.config.train.project_name, config=run.flat())
    counts = parameter_counts(accelerator.unwrap_model(s.model))
    logger.info(
        "model: %s total / %s active parameters, sparse-layer sparsity %.3f (model sparsity %.3f), "
        "%d steps x %d sequences x %d tokens, accumulation %d, precision %s, data %s (validation: %s)",
        f"{counts['total']:,}",
        f"{counts['active']:,}",
        s.engine.sparsity(),
        counts["inactive"] / counts["total"],
        run.total_steps,
        run.config.train.global_batch_size,
        run.data.seq_len,
        run.accumulation,
        run.mixed_precision,
        run.data.dataset,
        run.data.describe_validation(),
    )
    for decision in run.decisions + run.resume_changes:
        logger.warning("decided for this run: %s", decision)


# ----------------------------------------------------------------------------------------------
# One step, evaluation, records
# ----------------------------------------------------------------------------------------------
def train_step(s: Session) -> torch.Tensor:
    """One optimizer step over `accumulation` micro-batches; returns [loss, grad norm] on the device (no sync)."""
    accumulation, device = s.run.accumulation, s.accelerator.device
    step_loss = torch.zeros((), device=device)
    grad_norm = torch.full((), float("nan"), device=device)
    for _ in range(accumulation):
        x = next(s.train_batches).to(device, non_blocking=True)
        with s.accelerator.accumulate(s.model):
            loss = s.model(input_ids=x, labels=x).loss
            s.accelerator.backward(loss)
            step_loss += loss.detach() / accumulation
            if s.accelerator.sync_gradients and s.run.config.optim.grad_clip > 0:
                grad_norm = s.accelerator.clip_grad_norm_(s.model.parameters(), s.run.config.optim.grad_clip)
            s.optimizer.step()
            s.optimizer.zero_grad(set_to_none=True)
    return torch.stack([s.accelerator.reduce(step_loss, reduction="mean"), grad_norm.detach().float()])


def time_training_steps(cfg: PretrainConfig, steps: int, warmup: int) -> list[float]:
    """Seconds of each of `steps` optimizer steps after `warmup` ones, as a run of `cfg` takes them: `train_step`
    (accelerate, its precision and clipping, the run's data stream), the schedule and the DST update. Nothing is
    evaluated, logged or saved. The study's iso-time calibration times its arms with it."""
    session = setup(resolve_run(cfg, 1), resume=False)
    device = session.accelerator.device
    times = []
    try:
        for i in range(warmup + steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            values = train_step(session)
            session.scheduler.step()
            session.engine.step()
            values.tolist()  # wait for the step to finish
            if i >= warmup:
                times.append(time.perf_counter() - start)
    finally:
        session.train_batches.close()
    return times


@torch.no_grad()
def evaluate(s: Session) -> float | None:
    """Mean loss over the fixed held-out batches (all ranks)."""
    if not s.val_batches:
        return None
    s.model.eval()
    losses = [
        s.model(input_ids=x.to(s.accelerator.device), labels=x.to(s.accelerator.device)).loss.float()
        for x in s.val_batches
    ]
    s.model.train()
    return s.accelerator.gather(torch.stack(losses)).mean().item()


class DeferredScalars:
    """Device scalars read one step late: each push starts a non-blocking copy to pinned host memory and
    returns the previous push's values, by which time the GPU has long produced them."""

    def __init__(self, device: torch.device):
        self.async_copy = device.type == "cuda"
        self.pending = None

    def push(self, values: torch.Tensor, **info) -> dict | None:
        if self.async_copy:
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            host.copy_(values, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = values, None
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
        loss, grad_norm = host.tolist()
        return {**info, "loss": loss, "grad_norm": None if math.isnan(grad_norm) else grad_norm}


class StepLog:
    """Turns finished steps (loss and grad norm of the *same* step) into history, tracker logs and log lines."""

    def __init__(self, s: Session, clock=time.perf_counter):
        self.s = s
        self.clock = clock
        # Throughput is measured over windows of whole steps: from the end of the last recorded step to the end of
        # the step being recorded (recorded one step late, and sometimes two at once), never over an empty window.
        # Evaluation and checkpoint time is no training time: the clock read here leaves it out.
        self.step_ends: dict[int, float] = {}
        self.excluded = 0.0
        self.window_step, self.window_start = s.progress.step, self.now()
        self.bar = None
        if s.accelerator.is_main_process and s.run.config.train.progress_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=s.run.total_steps, initial=s.progress.step, desc="pretrain", unit="step", dynamic_ncols=True
            )

    def _say(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            logger.info(text)

    def record(self, step: int, loss: float, grad_norm: float | None, lr: float) -> None:
        s = self.s
        if not math.isfinite(loss):
            last = list_checkpoints(s.out_dir)
            raise NonFiniteLossError(
                f"loss is {loss} at step {step}: stopping. The last good checkpoint is "
                f"{last[-1] if last else 'none (no checkpoint was written yet)'}; lower optim.lr or check the data."
            )
        if step % s.run.config.train.log_interval and step != s.run.total_steps:
            return
        s.progress.train_loss.append((step, loss))
        end = self.step_ends.get(step, self.now())
        tokens = (step - self.window_step) * s.run.tokens_per_step
        s.last_tokens_per_s = tok_s = tokens / max(end - self.window_start, 1e-9)
        logs = {
            "train/loss": loss,
            "train/lr": lr,
            "train/tokens_seen": step * s.run.tokens_per_step,
            "train/tokens_per_s": tok_s,
            "train/sparsity": s.engine.sparsity(),
        }
        if grad_norm is not None:
            logs["train/grad_norm"] = grad_norm
        mfu = ""
        if s.peak:
            logs["train/mfu_active"] = tok_s * s.model_summary["training_flops_per_token"] / s.peak
            logs["train/mfu_executed"] = tok_s * s.model_summary["training_flops_per_token_executed"] / s.peak
            mfu = f", MFU {logs['train/mfu_active']:.3f} active / {logs['train/mfu_executed']:.3f} executed"
        s.accelerator.log(logs, step=step)
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}", sparsity=f"{logs['train/sparsity']:.3f}"
            )
        else:
            remaining = (s.run.total_steps - step) * s.run.tokens_per_step / max(tok_s, 1e-9)
            logger.info(
                "step %d/%d: loss %.4f, grad norm %s, lr %.3g, %s tokens/s, sparsity %.3f%s, ETA %s",
                step,
                s.run.total_steps,
                loss,
                "-" if grad_norm is None else f"{grad_norm:.3f}",
                lr,
                f"{tok_s:,.0f}",
                logs["train/sparsity"],
                mfu,
                time.strftime("%H:%M:%S", time.gmtime(remaining)),
            )
        self.window_step, self.window_start = step, end
        self.step_ends = {k: v for k, v in self.step_ends.items() if k > step}

    def now(self) -> float:
        """Training time so far on the clock: wall time less the evaluations and checkpoints."""
        return self.clock() - self.excluded

    @contextlib.contextmanager
    def not_training(self):
        begin = self.clock()
        try:
            yield
        finally:
            self.excluded += self.clock() - begin

    def start(self) -> None:
        """Training starts now (after the step-0 evaluation)."""
        self.window_step, self.window_start = self.s.progress.step, self.now()

    def step_done(self, step: int) -> None:
        self.step_ends[step] = self.now()

    def validation(self, step: int, running_seconds: float) -> None:
        """Evaluate; `running_seconds`: the time this run has spent running so far (a stopped and resumed run's
        pause excluded), logged beside the loss so that loss-vs-wall-clock curves need no tracker timestamps."""
        value = evaluate(self.s)
        if value is None:
            return
        self.s.progress.val_loss.append((step, value))
        logs = {"val/loss": value, "val/perplexity": math.exp(value), "val/running_seconds": running_seconds}
        self.s.accelerator.log(logs, step=step)
        self._say(f"step {step}: val loss {value:.4f} (perplexity {math.exp(value):.1f})")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def stop_at_step_boundary():
    """While training, the first Ctrl-C (SIGINT) asks the loop to stop once the current step (and its evaluation
    or checkpoint) is done, then KeyboardInterrupt is raised there; a second Ctrl-C stops at once. Python's own
    handler raises wherever the main thread is, and a KeyboardInterrupt raised while a finalizer runs (`__del__`,
    a weakref callback; common when a checkpoint is written every step) is printed as "Exception ignored" and
    dropped, so the run went on. Only the main thread can set handlers, and a handler someone else installed is
    left alone: the loop then never asks to stop."""
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield lambda: False
        return
    requested = threading.Event()

    def on_sigint(signum, frame):
        if requested.is_set():
            raise KeyboardInterrupt
        requested.set()  # nothing printed here: a write to stderr may be what the signal interrupted

    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield requested.is_set
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def fit(s: Session) -> dict:
    run, progress, accelerator = s.run, s.progress, s.accelerator
    start = time.time()
    log = StepLog(s)
    if progress.step == 0:
        log.validation(0, 0.0)
    log.start()
    pending = DeferredScalars(accelerator.device)
    s.model.train()
    with stop_at_step_boundary() as stop_requested:
        while progress.step < run.total_steps:
            values = train_step(s)
            # Read one step late, so the host prepares the next batch while the GPU still computes this one.
            finished = pending.push(values, step=progress.step + 1, lr=s.scheduler.get_last_lr()[0])
            s.scheduler.step()
            telemetry = s.engine.step()
            progress.step += 1
            progress.tokens += run.tokens_per_step
            log.step_done(progress.step)
            if log.bar is not None:
                log.bar.update(1)
            if finished is not None:
                log.record(**finished)
            if telemetry is not None:
                _check_masks(s)
                accelerator.log(summarize(telemetry), step=progress.step)
            evaluate_now = progress.step % run.config.train.eval_interval == 0 or progress.step == run.total_steps
            save_now = progress.step % run.config.train.checkpoint_interval == 0 or progress.step == run.total_steps
            # never evaluate or checkpoint a step whose loss was not checked
            if (evaluate_now or save_now) and (finished := pending.flush()) is not None:
                log.record(**finished)
            if evaluate_now:
                with log.not_training():
                    log.validation(progress.step, progress.wall_seconds + time.time() - start)
            if save_now:
                progress.wall_seconds += time.time() - start
                start = time.time()
                with log.not_training():
                    save_checkpoint(accelerator, s.model, s.tokenizer, run, s.out_dir, progress.step)
            if stop_requested():
                raise KeyboardInterrupt
    log.close()
    summary = _write_summary(s)  # a collective (the skipped-document counts): before end_training ends the group
    accelerator.end_training()
    return summary


def _check_masks(s: Session) -> None:
    if not s.engine.masks_synchronized():
        raise RuntimeError(f"sparse masks differ between ranks after the DST update at step {s.progress.step}")
    s.mask_checks += s.accelerator.num_processes > 1


def _skipped_documents(s: Session) -> dict:
    """Documents left out for bad text (data.bad_text=skip) by all processes: in training up to the last batch
    trained on, and in the held-out batches."""
    counts = gather_object([(s.train_batches.state_dict().get("skipped", 0), s.val_batches.skipped_documents)])
    return {"train": sum(train for train, _ in counts), "validation": sum(held_out for _, held_out in counts)}


def _write_summary(s: Session) -> dict:
    p = s.progress
    summary = {
        "steps": p.step,
        "tokens": p.tokens,
        "wall_seconds": p.wall_seconds,
        "val_loss": p.val_loss,
        "final_train_loss": p.train_loss[-1][1] if p.train_loss else None,
        "train_loss": p.train_loss,
        "checkpoints": [str(c) for c in list_checkpoints(s.out_dir)],
        "dataset": s.run.data.dataset,
        "tokenizer": s.run.data.tokenizer,
        "validation": s.run.data.describe_validation(),
        "processes": s.accelerator.num_processes,
        "mask_checks": s.mask_checks,
        "tokens_per_s": s.last_tokens_per_s,
        "sparse_layer_sparsity": s.engine.sparsity(),
        "skipped_documents": _skipped_documents(s),
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None,
        "run_config": s.run.to_dict(),
    }
    if s.accelerator.is_main_process:
        tmp = s.out_dir / f"{SUMMARY}.tmp"
        tmp.write_text(json.dumps(summary, indent=1))
        os.replace(tmp, s.out_dir / SUMMARY)
    return summary
