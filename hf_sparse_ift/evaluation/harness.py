"""Scoring a model on a suite with lm-eval-harness: `HFLM` + `simple_evaluate`, exactly as ``lm_eval --model hf``.

Everything that can be wrong with the request (suite or task names, dtype, limit, the model's path or Hub name,
the output folder, gated or missing task data) is checked before the model is loaded and before anything is
written. Results go to ``<output_dir>/<model>/<suite>/`` (``<model>`` = the training run and checkpoint step, or the
Hub name; ``<suite>`` gets ``-limit<N>`` for partial runs and ``-<dtype>`` for a dtype other than auto). Earlier
results of the same model are replaced only with ``overwrite=True``; another model's never (`check_results_folder`):
lm-eval's own JSON per task (``lm_eval_<task>.json``), ``summary.json`` (scores plus the model's identity, suite,
lm-eval version, dtype, limit) and ``results.md``.
"""

from __future__ import annotations

import datetime
import difflib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from ..errors import InputNotFoundError, OutputExistsError, UsageError
from ..hub.identity import describe, resolve_model, same_model, weights_identity
from . import leaderboard
from .compare import raw_table, results_table
from .suites import SUITES, Suite, TaskSpec, builtin_tasks_dir, resolve_suite, task_names

logger = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16", "float16")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
GPQA_DATASET = "Idavidrein/gpqa"
SUMMARY_SCHEMA = 2


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# checks (nothing loaded, nothing written)
# ----------------------------------------------------------------------------------------------
def check_options(dtype: str, limit: float | None, batch_size: str | int) -> None:
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    if limit is not None and not limit > 0:
        raise UsageError(
            f"--limit {limit:g} must be positive: a number of examples per task (>= 1) or a fraction (0 < limit < 1)"
        )
    if limit is not None and limit >= 1 and limit != int(limit):  # lm-eval would score int(limit) examples
        raise UsageError(
            f"--limit {limit:g} is neither a whole number of examples per task (1, 2, ...) nor a fraction of each "
            f"task (0 < limit < 1); lm-eval would score {int(limit)} per task: pass --limit {int(limit)} for that"
        )
    if (
        str(batch_size) != "auto"
        and not (str(batch_size).isdigit() and int(batch_size) > 0)
        and not (str(batch_size).startswith("auto:") and str(batch_size)[5:].isdigit() and int(str(batch_size)[5:]) > 0)
    ):  # auto:<N>: re-detect the batch size N times (lm-eval parses N as a number after loading the model)
        raise UsageError(f"--batch-size {batch_size!r} must be a positive integer, auto or auto:<N>")


def check_num_fewshot(num_fewshot: int | None) -> None:
    if num_fewshot is not None and num_fewshot < 0:
        raise UsageError(f"--num-fewshot {num_fewshot} is invalid: expected 0 or more examples in each prompt")


def check_device(device: str | None) -> str:
    """The device to score on: `device` as torch names it (cpu, cuda, cuda:N, mps, xpu...), present on this
    machine; default cuda when a GPU is visible, else cpu. Refused otherwise, before anything is loaded (HFLM
    would run an unknown name on CPU and record the name)."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(
            f"--device {device!r} is not a device torch knows: choose cpu, cuda or cuda:<index> (or mps, xpu)"
        ) from None
    if parsed.type == "cpu":
        return device
    backend = getattr(torch, parsed.type, None)
    available = backend is not None and hasattr(backend, "is_available") and backend.is_available()
    count = backend.device_count() if available and hasattr(backend, "device_count") else 0
    if not available or (parsed.index is not None and parsed.index >= count):
        have = f"{count} {parsed.type} device(s)" if available else f"no {parsed.type} device"
        raise UsageError(f"--device {device!r}: this machine has {have}; choose cpu or a device it has")
    return device


def model_tokenizer(identity: dict, tokenizer: str | None, vocab_size: int | None = None):
    """The tokenizer to score `identity` with, checked before the model is loaded: ``--tokenizer`` (loaded here and
    returned), else None for the model's own, which a local folder must hold: a folder from `save_pretrained` of a
    model alone has none, and transformers would then fail with an unrelated message."""
    from ..data.pipeline import load_tokenizer

    if tokenizer is None:
        folder = identity.get("path")
        if folder and not any((Path(folder) / name).is_file() for name in TOKENIZER_FILES):
            raise UsageError(
                f"--model {folder}: the folder has no tokenizer (none of {', '.join(TOKENIZER_FILES)}; "
                "save_pretrained of a model alone writes none); pass --tokenizer with a tokenizer folder or Hub "
                "name (builtin: the package's own, which the default pretraining uses), or save the tokenizer "
                "into the model folder"
            )
        return None
    loaded = load_tokenizer(tokenizer, key="--tokenizer")
    if vocab_size is not None and len(loaded) > vocab_size:
        raise UsageError(
            f"--tokenizer {tokenizer} has {len(loaded)} tokens but the model has vocab_size {vocab_size}: "
            "pass the tokenizer the model was trained with"
        )
    return loaded


def check_writable(folder: str | Path) -> None:
    """The folder, or the nearest existing folder above it, must accept a new file (a real write: permission bits
    say nothing to root, a read-only mount says nothing to os.access)."""
    folder = Path(folder).expanduser()
    probe_dir = folder
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise UsageError(f"--output-dir {folder}: {probe_dir} is a file, not a folder; choose a folder to write to")
    try:
        with tempfile.NamedTemporaryFile(dir=probe_dir, prefix=".write-test-"):
            pass
    except OSError as err:
        raise UsageError(
            f"--output-dir {folder} is not writable ({err.strerror or err}: {probe_dir}); choose a "
            "folder you can write to"
        ) from None


def check_results_folder(out: Path, identity: dict, overwrite: bool) -> None:
    """`out` may receive this model's results: it is empty, or it holds this model's (same tensors, or same Hub
    commit) and `overwrite` is set. Another model's results, or files whose model cannot be told, are never
    replaced: two models can share a folder name (two runs called ``model``, a `condense` output)."""
    if not out.exists() or not any(out.iterdir()):
        return
    try:
        theirs = json.loads((out / "summary.json").read_text())["model"]
    except (OSError, ValueError, KeyError, TypeError):
        theirs = None
    if isinstance(theirs, dict) and same_model(theirs, identity):
        if overwrite:
            return
        raise OutputExistsError(
            f"{out} already holds results of this model ({describe(identity)}) and suite; pass --overwrite to "
            "replace them, or choose another --output-dir"
        )
    whose = (
        f"a different model: {describe(theirs)}"
        if isinstance(theirs, dict) and (theirs.get("tensors_sha256") or theirs.get("hub_id"))
        else "a model whose identity it does not record (no readable summary.json with a tensors sha256)"
    )
    raise OutputExistsError(
        f"{out} holds results of {whose}, not of --model {describe(identity)}; evaluate never replaces another "
        "model's results (--overwrite included): choose another --output-dir"
    )


def suite_folder(suite: Suite, num_fewshot: int | None, limit: float | None, dtype: str = "auto") -> str:
    name = suite.name if suite.name in SUITES else "tasks-" + re.sub(r"[^\w.+-]+", "_", suite.name)
    if num_fewshot is not None:
        name += f"-{num_fewshot}shot"
    if limit is not None:
        name += f"-limit{limit:g}"
    if dtype != "auto":  # a bfloat16 run of a float32 model is a result of its own
        name += f"-{dtype}"
    return name


def results_dir(
    output_dir: str | Path,
    identity: dict,
    suite: Suite,
    num_fewshot: int | None = None,
    limit: float | None = None,
    dtype: str = "auto",
) -> Path:
    return Path(output_dir) / identity["slug"] / suite_folder(suite, num_fewshot, limit, dtype)


_MANAGERS: dict[tuple, object] = {}


def _task_manager(include_defaults: bool, paths: tuple[str, ...]):
    """lm-eval TaskManagers are reusable; indexing all of lm-eval's task YAMLs takes a while, so keep them."""
    from lm_eval.tasks import TaskManager

    key = (include_defaults, paths)
    if key not in _MANAGERS:
        _MANAGERS[key] = TaskManager(include_defaults=include_defaults, include_path=list(paths))
    return _MANAGERS[key]


_YAML_TEXT: list[str] = []


def _lm_eval_yaml_text() -> str:
    """All of lm-eval's task YAMLs as one text: a name found nowhere in it is no lm-eval task, group or tag (every
    name the index knows is written in some YAML), which is decided in a second rather than by indexing them all."""
    import lm_eval.tasks

    if not _YAML_TEXT:
        root = Path(lm_eval.tasks.__file__).parent
        _YAML_TEXT.append("\n".join(p.read_text(errors="ignore") for p in sorted(root.glob("**/*.yaml"))))
    return _YAML_TEXT[0]


def _unknown_task(suite: Suite, bad: str, known: list[str]) -> UsageError:
    close = difflib.get_close_matches(bad, list(SUITES) + known, n=3)
    return UsageError(
        f"--suite {suite.name!r}: {bad!r} is neither a suite (choose one of {', '.join(SUITES)}) nor "
        "an lm-eval task or group"
        + (f"; did you mean {', '.join(close)}?" if close else "")
        + " (`lm_eval ls tasks` lists the tasks; --include-path adds a folder of task YAMLs)"
    )


def task_manager_for(suite: Suite, include_path: str | None = None):
    """lm-eval's TaskManager over the folders the suite needs (suites name theirs; ad-hoc task lists try the
    shipped tasks first, then all of lm-eval's), and a one-sentence error for names that are neither suites nor
    tasks."""
    import re as _re

    import lm_eval.tasks

    ours = (str(builtin_tasks_dir()),) + ((str(Path(include_path).resolve()),) if include_path else ())
    if suite.lm_eval_dirs is not None:
        lm_root = Path(lm_eval.tasks.__file__).parent
        return _task_manager(False, tuple(str(lm_root / d) for d in suite.lm_eval_dirs) + ours)
    manager = _task_manager(False, ours)
    unknown = [s.task for s in suite.specs if s.task not in manager.all_tasks]
    if unknown:
        text = _lm_eval_yaml_text()
        absent = [name for name in unknown if name not in text]
        if absent:
            names = _re.findall(r"^(?:task|group|tag):\s*([\w.-]+)", text, flags=_re.MULTILINE)
            raise _unknown_task(suite, absent[0], manager.all_tasks + sorted(set(names)))
        manager = _task_manager(True, ours)
    unknown = [s.task for s in suite.specs if s.task not in manager.all_tasks]
    if unknown:
        raise _unknown_task(suite, unknown[0], manager.all_tasks)
    return manager


def load_tasks(suite: Suite, manager, log=_stderr) -> tuple[dict, dict]:
    """Build every task of the suite (this loads its data) before the model: ``({task: Task or Group},
    {benchmark: reason it is missing})``. Only optional benchmarks (GPQA, gated on the Hub) may be missing."""
    import random

    import numpy as np
    import torch
    from lm_eval.defaults import DEFAULT_OTHER_SEED, DEFAULT_RANDOM_SEED

    loaded, missing = {}, {}
    for spec in suite.specs:
        # simple_evaluate seeds these before it builds tasks (GPQA's process_docs shuffles the answers)
        random.seed(DEFAULT_RANDOM_SEED)
        np.random.seed(DEFAULT_OTHER_SEED)
        torch.manual_seed(DEFAULT_OTHER_SEED)
        try:
            built = manager.load([spec.task])
        except ImportError as err:
            raise UsageError(
                f"task {spec.task} needs a package that is not installed ({err}); the leaderboard-v2 "
                "suite needs lm-eval's extras: pip install 'lm-eval[math,ifeval]'"
            ) from None
        except OSError as err:  # no network, offline mode, gated or missing dataset
            reason = f"{type(err).__name__}: {err}".splitlines()[0]
            if spec.benchmark in suite.optional:
                missing[spec.benchmark] = (
                    f"{spec.label} not scored: its data could not be loaded ({reason}). {spec.label} "
                    f"({GPQA_DATASET}) is gated on the Hub: accept its terms on "
                    f"https://huggingface.co/datasets/{GPQA_DATASET}, log in with `hf auth login` and run online. "
                    f"The average is over the other {len(suite.specs) - 1} benchmarks and marked as such."
                )
                log(f"hf-sparse-ift evaluate: warning: {missing[spec.benchmark]}")
                continue
            raise UsageError(
                f"cannot load the data of task {spec.task} ({reason}); offline runs need the datasets in "
                "the local Hugging Face cache"
            ) from None
        loaded[spec.task] = built["groups"].get(spec.task) or built["tasks"][spec.task]
    return loaded, missing


# ----------------------------------------------------------------------------------------------
# scoring
# ----------------------------------------------------------------------------------------------
def _pick_metric(task_results: dict, wanted: str) -> tuple[str, float]:
    if wanted and wanted in task_results:
        return wanted, float(task_results[wanted])
    for key in ("acc_norm,none", "acc,none", "exact_match,strict-match", "exact_match,none"):
        if key in task_results:
            return key, float(task_results[key])
    numeric = [(k, v) for k, v in task_results.items() if "stderr" not in k and isinstance(v, (int, float))]
    if not numeric:
        raise UsageError(f"no numeric metric in lm-eval results {sorted(task_results)}")
    return numeric[0][0], float(numeric[0][1])


def score_task(spec: TaskSpec, results: dict, scoring: str = "mean") -> dict:
    """The row of one suite task from lm-eval's ``results``: ``value`` is lm-eval's raw number (0-1), ``score`` the
    number shown in tables (percent; for leaderboard-v2 the normalised score)."""
    if scoring == "leaderboard-v2":
        norm = leaderboard.normalise(spec.benchmark, spec.task, results)
        return {"metric": norm.pop("metric"), "value": norm.pop("raw"), "score": norm["normalised"], **norm}
    if spec.task == "mmlu":  # leaderboard v1: unweighted mean over the 57 subjects
        subjects = [
            v
            for k, v in results.items()
            if k.startswith("mmlu_")
            and spec.metric in v
            and k not in ("mmlu_humanities", "mmlu_stem", "mmlu_social_sciences", "mmlu_other")
        ]
        if subjects:
            value = sum(float(v[spec.metric]) for v in subjects) / len(subjects)
            return {"metric": spec.metric, "value": value, "score": 100 * value}
    metric, value = _pick_metric(results[spec.task], spec.metric)
    return {"metric": metric, "value": value, "score": 100 * value}


def summarise_scores(rows: list[dict], scoring: str) -> dict:
    """Average over the rows (percent). Leaderboard-v2: over the benchmarks scored, saying which (never a silent
    five-task mean)."""
    if scoring == "leaderboard-v2":
        avg = leaderboard.average({r["benchmark"]: r["score"] for r in rows})
        labels = {r["benchmark"]: r["label"] for r in rows}
        return {
            "average": avg["average"],
            "average_over": [labels[k] for k in avg["average_over"]],
            "complete": avg["complete"],
        }
    scored = [r for r in rows if r.get("score") is not None]
    return {
        "average": sum(r["score"] for r in scored) / len(scored),
        "average_over": [r["label"] for r in scored],
        "complete": len(scored) == len(rows),
    }


def _dataset_of(task: str, result: dict) -> tuple[str, str | None]:
    configs = result.get("configs", {})
    config = configs.get(task) or next((c for k, c in sorted(configs.items()) if k.startswith(task)), {})
    split = config.get("test_split") or config.get("validation_split")
    return config.get("dataset_path") or task, split


# ----------------------------------------------------------------------------------------------
# evaluate
# ----------------------------------------------------------------------------------------------
def evaluate(
    model: str,
    suite: str = "paper",
    batch_size: str | int = "auto",
    dtype: str = "auto",
    device: str | None = None,
    limit: float | None = None,
    output_dir: str | Path | None = "eval_results",
    include_path: str | None = None,
    num_fewshot: int | None = None,
    max_length: int | None = None,
    overwrite: bool = False,
    revision: str | None = None,
    tokenizer: str | None = None,
    log=_stderr,
) -> dict:
    """Score `model` (checkpoint folder or Hub name) on a suite; returns the summary and, unless `output_dir` is
    None, writes it with lm-eval's results to ``results_dir(...)`` (``summary["output_dir"]``)."""
    # 1. the request: checked before anything is loaded or written
    check_options(dtype, limit, batch_size)
    check_num_fewshot(num_fewshot)
    device = check_device(device)
    if include_path and not Path(include_path).is_dir():
        raise InputNotFoundError(f"--include-path {include_path}: no such folder of task YAMLs")
    the_suite = resolve_suite(suite, num_fewshot)
    identity = resolve_model(model, revision)
    config = Path(identity["path"]) / "config.json" if identity.get("path") else None
    vocab_size = json.loads(config.read_text()).get("vocab_size") if config else None
    tok = model_tokenizer(identity, tokenizer, vocab_size)
    out = None
    if output_dir is not None:
        out = results_dir(output_dir, identity, the_suite, num_fewshot, limit, dtype)
        check_writable(output_dir)
        check_results_folder(out, identity, overwrite)
    manager = task_manager_for(the_suite, include_path)
    loaded, missing = load_tasks(the_suite, manager, log)

    # 2. the model, 3. the suite
    lm, device = _load_lm(identity, dtype, batch_size, device, max_length, tok)
    rows, raw = _run_suite(lm, the_suite, loaded, missing, manager, limit)
    _complete_identity(identity)
    import lm_eval  # already imported by the run: the version of what scored

    from .. import __version__ as package_version

    summary = {
        "schema": SUMMARY_SCHEMA,
        "model": identity,
        "suite": the_suite.name,
        "suite_id": suite_folder(the_suite, num_fewshot, None),
        "scoring": the_suite.scoring,
        "tasks": rows,
        **summarise_scores(rows, the_suite.scoring),
        "missing": {r["label"]: r["missing"] for r in rows if r.get("missing")},
        "limit": limit,
        "partial": limit is not None,
        "num_fewshot_override": num_fewshot,
        "dtype": dtype,
        "tokenizer": tokenizer,  # None: the model's own
        "model_dtype": str(getattr(lm.model, "dtype", "")).replace("torch.", ""),
        "batch_size": str(batch_size),
        "device": device,
        "max_length": lm.max_length,
        "apply_chat_template": False,
        "lm_eval_version": lm_eval.__version__,
        "hf_sparse_ift_version": package_version,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if out is not None:
        _write(out, summary, raw, overwrite)
        summary["output_dir"] = str(out)
    return summary


def _load_lm(identity: dict, dtype, batch_size, device, max_length, tokenizer=None):
    """lm-eval's `HFLM` on the model (with remote code, as ``lm_eval --model hf`` would load it)."""
    from lm_eval.models.huggingface import HFLM

    import hf_sparse_ift  # noqa: F401  (registers the model; remote code covers other environments)

    kwargs = dict(
        pretrained=identity.get("path") or identity["hub_id"],
        trust_remote_code=True,
        dtype=dtype,
        batch_size=batch_size,
        device=device,
    )
    if identity.get("revision"):
        kwargs["revision"] = identity["revision"]
    if max_length:
        kwargs["max_length"] = max_length
    if tokenizer is not None:
        kwargs["tokenizer"] = tokenizer
    return HFLM(**kwargs), device


def _run_suite(lm, the_suite, loaded: dict, missing: dict, manager, limit) -> tuple[list[dict], dict]:
    """One task (or group) at a time; chat template off, as the leaderboard does for base models."""
    import lm_eval

    rows, raw = [], {}
    for spec in the_suite.specs:
        if spec.benchmark in missing:
            rows.append(
                {
                    "task": spec.task,
                    "label": spec.label,
                    "benchmark": spec.benchmark,
                    "num_fewshot": spec.num_fewshot,
                    "metric": spec.metric,
                    "value": None,
                    "score": None,
                    "missing": missing[spec.benchmark],
                }
            )
            continue
        # fixed suites (leaderboard-v2) keep their task YAMLs' few-shot counts, as `lm_eval --tasks leaderboard`
        shots = None if the_suite.fixed_fewshot else spec.num_fewshot
        result = lm_eval.simple_evaluate(
            model=lm,
            tasks=[loaded[spec.task]],
            num_fewshot=shots,
            limit=limit,
            task_manager=manager,
            log_samples=False,
            bootstrap_iters=0,
            apply_chat_template=False,
            fewshot_as_multiturn=False,
        )
        dataset, split = _dataset_of(spec.task, result)
        rows.append(
            {
                "task": spec.task,
                "label": spec.label,
                "benchmark": spec.benchmark,
                "num_fewshot": result.get("n-shot", {}).get(spec.task, spec.num_fewshot),
                "dataset": dataset,
                "dataset_split": split,
                **score_task(spec, result["results"], the_suite.scoring),
            }
        )
        raw[spec.task] = {
            k: result[k]
            for k in (
                "results",
                "groups",
                "group_subtasks",
                "configs",
                "versions",
                "n-shot",
                "higher_is_better",
                "n-samples",
            )
            if k in result
        }
    return rows, raw


def _complete_identity(identity: dict) -> None:
    """A Hub model's identity gains the sha256 of the weights HFLM just fetched into the cache."""
    if identity["source"] == "hub" and not identity.get("tensors_sha256"):
        try:
            from huggingface_hub import snapshot_download

            identity.update(
                weights_identity(
                    snapshot_download(identity["hub_id"], revision=identity["revision"], local_files_only=True)
                )
            )
        except Exception as err:  # the results stand without it; say why the identity is the Hub name only
            logger.warning(
                "could not hash the weights of %s@%s from the local cache (%s: %s); the results record the Hub id "
                "and revision only",
                identity["hub_id"],
                identity["revision"],
                type(err).__name__,
                err,
            )
    identity.pop("cached_path", None)


def _write(out: Path, summary: dict, raw: dict, overwrite: bool) -> None:
    """Write into a fresh sibling folder, then swap it in: a failure leaves earlier results as they were."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for task, result in raw.items():
            (tmp / f"lm_eval_{task}.json").write_text(json.dumps(result, indent=1, default=str))
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1))
        text = results_table([summary])
        if summary["scoring"] == "leaderboard-v2":
            text += "\nRaw lm-eval scores:\n\n" + raw_table(summary)
        (tmp / "results.md").write_text(text)
        if out.exists():
            check_results_folder(out, summary["model"], overwrite)  # again: results may have appeared meanwhile
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


__all__ = [
    "DTYPES",
    "SUITES",
    "check_options",
    "check_writable",
    "evaluate",
    "load_tasks",
    "results_dir",
    "score_task",
    "summarise_scores",
    "task_manager_for",
    "task_names",
]
