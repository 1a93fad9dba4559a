"""Running a study: data hygiene check, iso-time calibration, every (arm, seed) as an ordinary pretraining run.

Folder layout (``study.output_dir``)::

    .lock                        the process working on the study (a second one is refused, naming it)
    study_config.yaml            the validated study (a resumed study must match it)
    calibration.json             interleaved timing of dense vs masked-dense Sparse Wide training steps (iso-time)
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
from dataclasses import replace
from pathlib import Path

import torch
import yaml

from ..errors import InputNotFoundError, OutputExistsError, UsageError
from ..training import PretrainConfig, RunLock, list_checkpoints, pretrain, time_training_steps
from .arms import Arm, build_arms, iso_time_reference
from .config import ArmKind, StudyConfig, build_study_config

logger = logging.getLogger("hf_sparse_ift.study")


class RepeatedDataError(UsageError):
    pass


# ----------------------------------------------------------------------------------------------
# Data: how many tokens one epoch holds, and which sequences come first
# ----------------------------------------------------------------------------------------------
def _stream(cfg: PretrainConfig, seed: int, endless: bool):
    from ..data.pipeline import PackedStream, load_tokenizer, resolve_data_source

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
def _calibration_warnings(arm: Arm, ratio: float, dense_seconds: float, sw_seconds: float) -> list[str]:
    """A masked Sparse Wide step runs the dense base's matmuls at k² = 1/(1-s) times the block-layer size: it
    cannot be faster than the dense step. A measured ratio below 1 means the timing is noise (too few steps,
    no warm-up, a loaded machine), and the iso-time arm's steps would be wrong."""
    if ratio >= 1:
        return []
    return [
        f"implausible iso-time calibration for {arm.name}: masked Sparse Wide took {sw_seconds:.4f} s/step and "
        f"dense {dense_seconds:.4f} s/step (ratio {ratio:.3f} < 1), but masked Sparse Wide runs more FLOPs than "
        "dense. Raise study.calibration.warmup_steps / steps / rounds, or calibrate on an idle machine"
    ]


def calibrate_iso_time(study: StudyConfig, arms: list[Arm], out: Path) -> dict:
    """Seconds per optimizer step of the dense base and of each masked-dense Sparse Wide reference arm,
    measured interleaved (dense, SW, dense, SW, ...) so that load from other processes hits both alike;
    dense-iso-time steps = SW steps x median(SW s/step) / median(dense s/step). Saved and reused on resume."""
    path = out / "calibration.json"
    if path.exists():
        saved = json.loads(path.read_text())
        for arm in arms:
            if arm.kind is ArmKind.DENSE_ISO_TIME:
                arm.steps = saved["arms"][arm.name]["steps"]
        return saved
    settings = study.study.calibration
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = {
        "method": f"interleaved timing: {settings.rounds} rounds x {settings.steps} optimizer steps of each model "
        f"after {settings.warmup_steps} warm-up step(s) per round, through the training loop's train_step "
        "(accelerate, the run's precision, clipping and data stream) with the schedule and DST update; no "
        "evaluation, logging or checkpointing; masks applied to dense weights; median per model",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "arms": {},
        "warnings": [],
    }
    scratch = out / "calibration-runs"
    for arm in arms:
        if arm.kind is not ArmKind.DENSE_ISO_TIME:
            continue
        reference = iso_time_reference(study, arm)
        dense_cfg = replace(arm, steps=study.base.steps()).pretrain_config(str(scratch / "dense"), 0)
        sw_cfg = reference.pretrain_config(str(scratch / reference.name), 0)
        for cfg in (dense_cfg, sw_cfg):
            cfg.train.trackers = []
        dense_times, sw_times = [], []
        for _ in range(settings.rounds):
            dense_times += time_training_steps(dense_cfg, settings.steps, settings.warmup_steps)
            sw_times += time_training_steps(sw_cfg, settings.steps, settings.warmup_steps)
        dense_seconds, sw_seconds = statistics.median(dense_times), statistics.median(sw_times)
        ratio = sw_seconds / dense_seconds
        arm.steps = max(1, round(reference.steps * ratio))
        result["arms"][arm.name] = {
            "reference_arm": reference.name,
            "reference_steps": reference.steps,
            "steps": arm.steps,
            "dense_seconds_per_step": dense_seconds,
            "sparse_wide_seconds_per_step": sw_seconds,
            "ratio": ratio,
            "dense_samples": dense_times,
            "sparse_wide_samples": sw_times,
        }
        logger.info(
            "iso-time %s: dense %.4f s/step, %s %.4f s/step (x%.3f) -> %d steps",
            arm.name,
            dense_seconds,
            reference.name,
            sw_seconds,
            ratio,
            arm.steps,
        )
        for warning in _calibration_warnings(arm, ratio, dense_seconds, sw_seconds):
            logger.warning(warning)
            result["warnings"].append(warning)
    if scratch.exists():  # the timed sessions' run configs
        shutil.rmtree(scratch)
    path.write_text(json.dumps(result, indent=1))
    return result


# ----------------------------------------------------------------------------------------------
# The study folder
# ----------------------------------------------------------------------------------------------
STUDY_CONFIG = "study_config.yaml"


def _flatten(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def differing_keys(saved: dict, current: dict) -> list[str]:
    """Dotted keys whose values differ between two study trees. study.output_dir is not compared: the folder
    holding study_config.yaml is the study (``X``, ``./X``, ``X/`` and a copy of X alike)."""
    old, new = _flatten(saved), _flatten(current)
    keys = (set(old) | set(new)) - {"study.output_dir"}
    return sorted(key for key in keys if old.get(key, "<absent>") != new.get(key, "<absent>"))


def check_same_study(study: StudyConfig, out: Path) -> None:
    """Refuse when `out` holds a study whose config differs from `study` (naming the keys that differ)."""
    saved = out / STUDY_CONFIG
    # through the config builder, so that a setting added since the study was saved counts at its default
    keys = differing_keys(build_study_config(yaml.safe_load(saved.read_text())).to_dict(), study.to_dict())
    if keys:
        raise UsageError(
            f"{saved} differs from the study config given now in {keys}: the runs in {out} were made with "
            "the saved config (arms, seeds and budgets would no longer compare); give that config, or use "
            "another study.output_dir"
        )


def study_lock(out: Path) -> RunLock:
    """One process per study folder: a second is refused naming the first's PID; a stale lock is taken over."""
    return RunLock(out, option="study.output_dir (or --output-dir)")


def _check_folder(study: StudyConfig, out: Path, resume: bool) -> None:
    saved = out / STUDY_CONFIG
    if saved.exists():
        if not resume:
            raise OutputExistsError(
                f"{out} already holds a study: pass --resume to continue it (finished arms are "
                "skipped, killed ones resumed), or choose another study.output_dir"
            )
        check_same_study(study, out)
    out.mkdir(parents=True, exist_ok=True)
    if not saved.exists():  # its time stamp marks the study's start
        saved.write_text(yaml.safe_dump(study.to_dict(), sort_keys=True))


def run_state(study: StudyConfig, arm: Arm, seed: int) -> str:
    """'finished' (train_summary.json at the arm's step count), 'killed' (a checkpoint but no summary) or 'new'."""
    folder = arm.run_dir(study, seed)
    summary = folder / "train_summary.json"
    if summary.exists() and arm.steps is not None and json.loads(summary.read_text()).get("steps") == arm.steps:
        return "finished"
    if list_checkpoints(folder):
        return "killed"
    return "new"


def _clear_run_folder(folder: Path) -> None:
    """Empty a run folder killed before its first checkpoint, under the run's own lock: a folder that a live
    process (a pretrain started by hand, another study) still writes is refused, never deleted."""
    with RunLock(folder, option="study.output_dir (or --output-dir)"):
        for path in folder.iterdir():
            if path.name != ".lock":
                shutil.rmtree(path) if path.is_dir() else path.unlink()


def run_study(study: StudyConfig, resume: bool = False, report: bool = True) -> dict:
    """Train every arm x seed that is not finished yet, then write the results. Returns results.json's content."""
    out = Path(study.study.output_dir)
    with study_lock(out):
        _check_folder(study, out, resume)
        return _run_locked(study, out, resume, report)


def _run_locked(study: StudyConfig, out: Path, resume: bool, report: bool) -> dict:
    arms = build_arms(study)
    check_data(study, [a for a in arms if a.steps is not None])  # refuse before spending time on calibration
    needs_calibration = any(a.kind is ArmKind.DENSE_ISO_TIME for a in arms)
    calibration = calibrate_iso_time(study, arms, out) if needs_calibration else None
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
                raise OutputExistsError(f"{folder} holds an unfinished run: pass --resume")
            if state == "new" and folder.exists():
                _clear_run_folder(folder)  # a run killed before its first checkpoint starts over
            logger.info(
                "[%d/%d] %s seed %d: %s (%d steps)",
                done,
                total,
                arm.name,
                seed,
                "resuming" if state == "killed" else "training",
                arm.steps,
            )
            pretrain(arm.pretrain_config(str(folder), seed), resume=state == "killed")
    if not report:
        return {}
    from .report import write_report

    return write_report(study, arms, calibration, data_check)


def report_only(study: StudyConfig) -> dict:
    """Write the results of a study's finished runs, training nothing. Refuses (writing nothing) a folder that
    holds no study, a config that differs from the folder's, and a report that would hold fewer finished runs
    than the results already there."""
    out = Path(study.study.output_dir)
    if not (out / STUDY_CONFIG).is_file():
        raise InputNotFoundError(f"no study in {out}; run it first (hf-sparse-ift study --config ...)")
    check_same_study(study, out)
    with study_lock(out):
        arms = build_arms(study)
        calibration = calibrate_iso_time(study, arms, out) if (out / "calibration.json").exists() else None
        arms = [a for a in arms if a.steps is not None]
        check = out / "data_check.json"
        data_check = json.loads(check.read_text()) if check.exists() else None
        from .report import write_report

        return write_report(study, arms, calibration, data_check, keep_recorded=True)
