"""Checkpoints and the output folder: atomic saves with a manifest, resuming from the newest complete one, and a
lock so that two runs never write into the same folder.

``<output_dir>/checkpoint-<step>/`` holds accelerate's full state (model with masks, optimizer, scheduler, RNG,
the DST engine, every rank's data position, the progress and history), ``run_config.yaml`` (the resolved run
config) and ``hf/`` (a `save_pretrained` export with tokenizer, ``training_config.yaml`` and model card). It is
written to ``checkpoint-<step>.tmp``, a ``manifest.json`` of every file and its size is written last, and the
folder is renamed into place: a crash while saving leaves the previous checkpoints intact.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import gather_object

from ..errors import InputNotFoundError, OutputExistsError, UsageError

logger = logging.getLogger("hf_sparse_ift.pretrain")
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
MANIFEST = "manifest.json"
RUN_CONFIG = "run_config.yaml"


def ensure_writable(out_dir: Path) -> None:
    """Fail now, with the path named, if the output folder cannot be created or written."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise UsageError(
            f"train.output_dir={str(out_dir)!r} is not writable ({err.strerror or err}); choose a "
            "folder this process can create and write"
        ) from None


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoint folders, oldest first (a ``.tmp`` folder is an interrupted save and is ignored)."""
    root = Path(output_dir)
    found = [(int(m.group(1)), p) for p in root.glob("checkpoint-*") if (m := CHECKPOINT.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def checkpoint_step(path: Path) -> int:
    return int(CHECKPOINT.match(path.name).group(1))


def verify_checkpoint(path: Path) -> str | None:
    """None when every file of the manifest is there with its size; else what is wrong."""
    manifest = path / MANIFEST
    if not manifest.exists():
        return f"no {MANIFEST} (not completely written)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as err:
        return f"unreadable {MANIFEST} ({err})"
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, the manifest says {size}"
    return None


def _write_manifest(root: Path) -> None:
    files = {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}
    for path in root.rglob("*"):  # flush every file before the manifest says it is complete
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    with open(root / MANIFEST, "w") as f:
        json.dump({"files": files}, f, indent=0)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(accelerator: Accelerator, model, tokenizer, run, out_dir: Path, step: int) -> Path:
    """Write ``checkpoint-<step>`` atomically (``.tmp``, manifest, rename) and keep the newest K."""
    from ..hub.export import save_tokenizer
    from ..hub.model_card import write_model_card

    final, tmp = out_dir / f"checkpoint-{step}", out_dir / f"checkpoint-{step}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every rank has written its RNG state into tmp before it is renamed
    state_dict = (
        accelerator.get_state_dict(model, unwrap=True) if accelerator.distributed_type.name.startswith("FSDP") else None
    )  # a collective: every rank calls it
    if accelerator.is_main_process:
        (tmp / RUN_CONFIG).write_text(run.to_yaml())
        export = tmp / "hf"
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(export, state_dict=state_dict)
        save_tokenizer(tokenizer, export, unwrapped.config.n_positions)  # the model's context, not the tokenizer's
        (export / "training_config.yaml").write_text(run.to_yaml())
        write_model_card(export, repo_id=out_dir.name, training_config=run.to_dict())
        _write_manifest(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(out_dir)[: -run.config.train.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_newest_checkpoint(accelerator: Accelerator, out_dir: Path) -> Path:
    """Load the newest complete checkpoint; incomplete or unreadable ones are skipped, saying which and why."""
    skipped = []
    for path in reversed(list_checkpoints(out_dir)):
        problem = verify_checkpoint(path)
        if problem is None:
            try:
                accelerator.load_state(str(path))
            except Exception as err:
                problem = f"cannot be loaded ({type(err).__name__}: {err})"
        if problem is None:
            for name, why in skipped:
                logger.warning("--resume: skipped %s: %s", name, why)
            return path
        skipped.append((path.name, problem))
    detail = "; ".join(f"{name}: {why}" for name, why in skipped) or "none found"
    raise InputNotFoundError(f"--resume: no complete checkpoint-<step> folder in {out_dir} ({detail})")


def newest_complete_checkpoint(out_dir: Path) -> Path | None:
    """The newest checkpoint whose manifest checks out (no loading: used before any work starts)."""
    return next((p for p in reversed(list_checkpoints(out_dir)) if verify_checkpoint(p) is None), None)


class RunLock:
    """``<output_dir>/.lock`` naming the process that writes the folder; a second run refuses, naming it. A lock
    left by a process that no longer exists (on this host) is taken over with a warning. `option`: the setting
    that chooses the folder, named in the refusal."""

    def __init__(self, out_dir: Path, enabled: bool = True, option: str = "train.output_dir"):
        self.path, self.enabled, self.held = Path(out_dir) / ".lock", enabled, False
        self.option = option

    def __enter__(self) -> RunLock:
        if not self.enabled:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                owner = self._owner()
                if owner and owner.get("host") == me["host"] and not _alive(owner.get("pid")):
                    logger.warning(
                        "taking over the stale lock %s of process %s, which no longer runs", self.path, owner.get("pid")
                    )
                    self.path.unlink(missing_ok=True)
                    continue
                raise OutputExistsError(
                    f"{self.path.parent} is in use by another run (process {owner.get('pid')} on "
                    f"{owner.get('host')}, lock {self.path}); wait for it to finish or choose "
                    f"another {self.option}"
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise OutputExistsError(f"could not take the lock {self.path}")

    def _owner(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def __exit__(self, *exc) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def _alive(pid) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DataPosition:
    """Every rank's data position (after the last batch it trained on), saved by the main process in one
    checkpoint object."""

    def __init__(self, batches, accelerator: Accelerator):
        self.batches, self.accelerator = batches, accelerator

    def state_dict(self) -> dict:
        return {"ranks": gather_object([self.batches.state_dict()])}

    def load_state_dict(self, state: dict) -> None:
        ranks = state["ranks"]
        if len(ranks) != self.accelerator.num_processes:
            raise UsageError(
                f"checkpoint was written by {len(ranks)} processes, this run has "
                f"{self.accelerator.num_processes}: data positions cannot be matched"
            )
        self.batches.load_state_dict(ranks[self.accelerator.process_index])


class TrainingProgress:
    """Step, tokens seen and the loss history, checkpointed so that a resumed run's summary is whole."""

    def __init__(self):
        self.step = 0
        self.tokens = 0
        self.train_loss: list[tuple[int, float]] = []
        self.val_loss: list[tuple[int, float]] = []
        self.wall_seconds = 0.0

    def state_dict(self):
        return {
            "step": self.step,
            "tokens": self.tokens,
            "train_loss": self.train_loss,
            "val_loss": self.val_loss,
            "wall_seconds": self.wall_seconds,
        }

    def load_state_dict(self, state):
        self.step, self.tokens = state["step"], state["tokens"]
        self.train_loss = [tuple(x) for x in state.get("train_loss", [])]
        self.val_loss = [tuple(x) for x in state.get("val_loss", [])]
        self.wall_seconds = state.get("wall_seconds", 0.0)
