"""Running a study: data hygiene check, iso-time calibration, every (arm, seed) as an ordinary pretraining run.

Folder layout (``study.output_dir``)::

    study_config.yaml            the validated study (a resumed study must match it)
    calibration.json             interleaved timing of dense vs masked-dense Sparse Wide steps (iso-time)
    data_check.json              tokens needed vs tokens in one epoch of the training split
    runs/<arm>/seed-<n>/         an ordinary pretraining run: checkpoint-*/, train_summary.json, TensorBoard
    results.json, results.md, loss_vs_flops.png, final_loss_vs_sparsity.png, spectral_gap.png

Every run of a study uses the same ``data.*``, global batch and sequence length, so the packed stream gives
every arm the same sequences in the same order (with ``data.shuffle_buffer: 0`` also across seeds; with a
shuffle buffer the order depends on ``train.seed`` and so differs between seeds, never between arms).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
import yaml

from ..training.checkpoint import list_checkpoints
from ..training.config import PretrainConfig
from ..training.loop import pretrain
from .arms import Arm, build_arms, flop_accounting, iso_time_reference
from .config import StudyConfig

logger = logging.getLogger("hf_sparse_ift.study")


class RepeatedDataError(ValueError):
    pass


# ----------------------------------------------------------------------------------------------
# Data: how many tokens one epoch holds, and which sequences come first
# ----------------------------------------------------------------------------------------------
def _stream(cfg: PretrainConfig, seed: int, endless: bool):
    from ..training.data import PackedStream, load_tokenizer, resolve_data_source

    source = resolve_data_source(cfg.data)  # what the runs read, held-out slice excluded
    tokenizer = load_tokenizer(source.tokenizer)
    return source, PackedStream(source, tokenizer, "train", 0, 1, seed=seed, endless=endless)


def epoch_tokens(cfg: PretrainConfig, stop_after: int) -> tuple[int, bool]:
    """Tokens of packed sequences in one epoch of the training split, counted until `stop_after` is passed:
    (count, complete). complete=False means the split holds more than `stop_after` tokens (not read further)."""
    data_cfg, stream = _stream(cfg, cfg.train.seed, endless=False)
    count = 0
    for _ in stream:
        count += data_cfg.seq_len
        if count > stop_after:
            return count, False
    return count, True


def data_fingerprint(cfg: PretrainConfig, sequences: int) -> str:
    """sha256 of the first `sequences` packed training sequences this config's stream yields."""
    _, stream = _stream(cfg, cfg.train.seed, endless=True)
    h = hashlib.sha256()
    for i, seq in enumerate(stream):
        h.update(seq.numpy().tobytes())
        if i + 1 == sequences:
            break
    return h.hexdigest()[:16]


def check_data(study: StudyConfig, arms: list[Arm]) -> dict:
    """Refuse (or, with study.allow_repeated_data, warn loudly) when some arm would read past one epoch."""
    base = study.base
    needed = max(a.steps for a in arms) * base.train.global_batch_size * base.data.seq_len
    if study.study.corpus_tokens is not None:
        available, complete, source = study.study.corpus_tokens, True, "study.corpus_tokens (asserted by the user)"
    else:
        available, complete = epoch_tokens(base, needed)
        source = "counted (packed sequences of one epoch of the training split)"
    repeated = complete and needed > available
    report = {
        "tokens_needed_max_arm": needed,
        "tokens_in_one_epoch": available if complete else None,
        "tokens_in_one_epoch_at_least": available,
        "count_source": source,
        "repeated_epochs": repeated,
        "epochs_max_arm": needed / available if complete else None,
        "dataset": base.data.dataset,
        "data_files": base.data.data_files,
    }
    if repeated:
        message = (
            f"the largest arm trains on {needed:,} tokens but one epoch of {base.data.dataset!r} "
            f"(split {base.data.train_split!r}) holds only {available:,}: {needed / available:.2f} epochs. "
            "Repeated epochs reward regularisation, not capacity, so no claim about Sparse Wide can rest on "
            "this. Use a larger corpus (scripts/make_english_corpus.py) or fewer steps"
        )
        if not study.study.allow_repeated_data:
            raise RepeatedDataError(message + "; or set study.allow_repeated_data: true to run anyway.")
        banner = "!" * 100
        logger.warning("\n%s\nREPEATED DATA: %s (study.allow_repeated_data is true).\n%s", banner, message, banner)
        report["warning"] = message
    return report


# ----------------------------------------------------------------------------------------------
# Iso-time calibration
# ----------------------------------------------------------------------------------------------
def _timed_steps(cfg: PretrainConfig, steps: int, warmup: int, device: torch.device) -> list[float]:
    from ..models.sparse_wide_gpt.modeling_sparse_wide_gpt import SparseWideGPTForCausalLM
    from ..sparsity.dst import DSTEngine
    from ..training.optimizer import build_optimizer

    torch.manual_seed(cfg.train.seed)
    model = SparseWideGPTForCausalLM(cfg.model_config()).to(device)
    optimizer = build_optimizer(model, cfg.optim)
    engine = DSTEngine(model, optimizer, cfg.dst, total_steps=cfg.steps())
    micro = cfg.train.micro_batch_size
    accumulation = cfg.train.global_batch_size // micro
    vocab = cfg.model_config().vocab_size
    x = torch.randint(0, vocab, (micro, cfg.data.seq_len), device=device)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(accumulation):
            with autocast:
                loss = model(input_ids=x, labels=x).loss / accumulation
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or 1e9)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        engine.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    del model, optimizer, engine
    return times


def calibrate_iso_time(study: StudyConfig, arms: list[Arm], out: Path) -> dict:
    """Seconds per optimizer step of the dense base and of each masked-dense Sparse Wide reference arm,
    measured interleaved (dense, SW, dense, SW, ...) so that load from other processes hits both alike;
    dense-iso-time steps = SW steps x median(SW s/step) / median(dense s/step). Saved and reused on resume."""
    path = out / "calibration.json"
    if path.exists():
        saved = json.loads(path.read_text())
        for arm in arms:
            if arm.kind == "dense-iso-time":
                arm.steps = saved["arms"][arm.name]["steps"]
        return saved
    c = study.study.calibration
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = {
        "method": f"interleaved timing: {c.rounds} rounds x {c.steps} optimizer steps of each model after "
        f"{c.warmup_steps} warm-up step(s), random tokens (compute only: no data loading, "
        "evaluation or checkpointing), masks applied to dense weights; median per model",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "arms": {},
    }
    for arm in arms:
        if arm.kind != "dense-iso-time":
            continue
        ref = iso_time_reference(study, arm)
        dense_cfg = replace(arm, steps=study.base.steps()).pretrain_config(str(out / "tmp"), 0)
        sw_cfg = ref.pretrain_config(str(out / "tmp"), 0)
        dense_times, sw_times = [], []
        for _ in range(c.rounds):
            dense_times += _timed_steps(dense_cfg, c.steps, c.warmup_steps, device)
            sw_times += _timed_steps(sw_cfg, c.steps, c.warmup_steps, device)
        d, s = statistics.median(dense_times), statistics.median(sw_times)
        arm.steps = max(1, round(ref.steps * s / d))
        result["arms"][arm.name] = {
            "reference_arm": ref.name,
            "reference_steps": ref.steps,
            "steps": arm.steps,
            "dense_seconds_per_step": d,
            "sparse_wide_seconds_per_step": s,
            "ratio": s / d,
            "dense_samples": dense_times,
            "sparse_wide_samples": sw_times,
        }
        logger.info(
            "iso-time %s: dense %.4f s/step, %s %.4f s/step (x%.3f) -> %d steps",
            arm.name,
            d,
            ref.name,
            s,
            s / d,
            arm.steps,
        )
    path.write_text(json.dumps(result, indent=1))
    return result


# ----------------------------------------------------------------------------------------------
# The study
# ----------------------------------------------------------------------------------------------
def _check_folder(study: StudyConfig, out: Path, resume: bool) -> None:
    saved = out / "study_config.yaml"
    current = yaml.safe_dump(study.to_dict(), sort_keys=True)
    if saved.exists():
        if not resume:
            raise FileExistsError(
                f"{out} already holds a study: pass --resume to continue it (finished arms are "
                "skipped, killed ones resumed), or choose another study.output_dir"
            )
        if saved.read_text() != current:
            raise ValueError(
                f"{saved} differs from the study config given now: a resumed study must keep its "
                "config (arms, seeds and budgets would no longer compare); use another study.output_dir"
            )
    out.mkdir(parents=True, exist_ok=True)
    if not saved.exists():  # its time stamp marks the study's start
        saved.write_text(current)


def run_state(study: StudyConfig, arm: Arm, seed: int) -> str:
    """'finished' (train_summary.json at the arm's step count), 'killed' (a checkpoint but no summary) or 'new'."""
    folder = arm.run_dir(study, seed)
    summary = folder / "train_summary.json"
    if summary.exists() and arm.steps is not None and json.loads(summary.read_text()).get("steps") == arm.steps:
        return "finished"
    if list_checkpoints(folder):
        return "killed"
    return "new"


def run_study(study: StudyConfig, resume: bool = False, report: bool = True) -> dict:
    """Train every arm x seed that is not finished yet, then write the results. Returns results.json's content."""
    out = Path(study.study.output_dir)
    _check_folder(study, out, resume)
    arms = build_arms(study)
    check_data(study, [a for a in arms if a.steps is not None])  # refuse before spending time on calibration
    calibration = calibrate_iso_time(study, arms, out) if any(a.kind == "dense-iso-time" for a in arms) else None
    data_check = check_data(study, arms)
    data_check["fingerprints"] = {}
    for seed in study.study.seeds:
        cfg = arms[0].pretrain_config(str(out / "tmp"), seed)
        data_check["fingerprints"][str(seed)] = data_fingerprint(cfg, cfg.train.global_batch_size)
    (out / "data_check.json").write_text(json.dumps(data_check, indent=1))

    total = len(arms) * len(study.study.seeds)
    done = 0
    for seed in study.study.seeds:  # seed-major: an interrupted study has every arm at the first seeds
        for arm in arms:
            done += 1
            folder = arm.run_dir(study, seed)
            state = run_state(study, arm, seed)
            if state == "finished":
                logger.info("[%d/%d] %s seed %d: finished, skipped", done, total, arm.name, seed)
                continue
            if state == "killed" and not resume:
                raise FileExistsError(f"{folder} holds an unfinished run: pass --resume")
            if state == "new" and folder.exists():
                shutil.rmtree(folder)  # a run killed before its first checkpoint starts over
            logger.info(
                "[%d/%d] %s seed %d: %s (%d steps)",
                done,
                total,
                arm.name,
                seed,
                "resuming" if state == "killed" else "training",
                arm.steps,
            )
            cfg = arm.pretrain_config(str(folder), seed)
            pretrain(cfg, resume=state == "killed")
    if not report:
        return {}
    from .report import write_report

    return write_report(study, arms, calibration, data_check)


def accounting_for(arm: Arm, study: StudyConfig) -> dict:
    return flop_accounting(arm.pretrain_config(str(Path(study.study.output_dir) / "tmp"), study.study.seeds[0]))
