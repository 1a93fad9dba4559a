"""Loaders and scorers for the local copies of the Open LLM Leaderboard v2 task formats (see README.md).

Prompt builders are lm-eval's own (``lm_eval/tasks/leaderboard/*/utils.py``) wherever they need no optional
dependency; MATH and IFEval scoring are small stand-ins because lm-eval's need `math_verify` / `langdetect`.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import datasets
from lm_eval.tasks.leaderboard.gpqa.utils import process_docs as gpqa_process_docs  # noqa: F401
from lm_eval.tasks.leaderboard.mmlu_pro.utils import doc_to_choice as mmlu_pro_doc_to_choice  # noqa: F401
from lm_eval.tasks.leaderboard.mmlu_pro.utils import doc_to_text as mmlu_pro_doc_to_text  # noqa: F401
from lm_eval.tasks.leaderboard.musr.utils import doc_to_choice as musr_doc_to_choice  # noqa: F401
from lm_eval.tasks.leaderboard.musr.utils import doc_to_text as musr_doc_to_text  # noqa: F401

HERE = Path(__file__).resolve().parent


def load_local(file: str, subtask: str | None = None, **kwargs) -> datasets.DatasetDict:
    """Rows of ``file`` (next to this module) with ``subtask`` (if given), split by their ``split`` field."""
    splits = defaultdict(list)
    for line in (HERE / file).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            if subtask is None or row.pop("subtask", None) == subtask:
                splits[row.pop("split")].append(row)
    return datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in splits.items()})


# ---------------------------------------------------------------- MATH (Minerva format, as leaderboard_math_hard)
def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None


def math_doc_to_text(doc: dict) -> str:
    return "Problem:" + "\n" + doc["problem"] + "\n\n" + "Solution:"


def math_process_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    def _process_doc(doc: dict) -> dict:
        return {"problem": doc["problem"], "solution": doc["solution"], "answer": _last_boxed(doc["solution"])}

    return dataset.filter(lambda x: x["level"] == "Level 5").map(_process_doc)


def _normalise_answer(text: str) -> str:
    text = text.strip().strip("$").strip()
    text = re.sub(r"\\text\{(.*?)\}", r"\1", text)
    return re.sub(r"\s+", "", text).rstrip(".")


def math_process_results(doc: dict, results: list[str]) -> dict[str, int]:
    """exact_match: the generation's final answer (Minerva 'Final Answer: The final answer is X. I hope it is
    correct.' or its last \\boxed{}) equals the reference after normalisation."""
    text = results[0]
    found = re.search(r"[Tt]he final answer is (.*?)\. I hope", text)
    answer = found.group(1) if found else _last_boxed(text)
    hit = int(answer is not None and _normalise_answer(answer) == _normalise_answer(doc["answer"]))
    return {"exact_match": hit}


# ---------------------------------------------------------------- IFEval (four instruction types)
def _follows(instruction_id: str, kwargs: dict, response: str) -> bool:
    if instruction_id == "punctuation:no_comma":
        return "," not in response
    if instruction_id == "change_case:english_lowercase":
        return response == response.lower()
    if instruction_id == "keywords:existence":
        return all(re.search(re.escape(k), response, flags=re.IGNORECASE) for k in kwargs["keywords"])
    if instruction_id == "startend:end_checker":
        return response.strip().lower().endswith(kwargs["end_phrase"].strip().lower())
    raise ValueError(f"local IFEval copy: unsupported instruction {instruction_id!r}")


def _loose_variants(response: str) -> list[str]:
    # lm-eval's test_instruction_following_loose: drop the first and/or last line, strip asterisks.
    lines = response.split("\n")
    cut = [response, "\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    return cut + [r.replace("*", "") for r in cut]


def ifeval_process_results(doc: dict, results: list[str]) -> dict:
    response = results[0]
    strict, loose = [], []
    for instruction_id, kwargs in zip(doc["instruction_id_list"], doc["kwargs"]):
        kwargs = {k: v for k, v in (kwargs or {}).items() if v}
        strict.append(bool(response.strip()) and _follows(instruction_id, kwargs, response))
        loose.append(any(r.strip() and _follows(instruction_id, kwargs, r) for r in _loose_variants(response)))
    return {
        "prompt_level_strict_acc": all(strict),
        "inst_level_strict_acc": strict,
        "prompt_level_loose_acc": all(loose),
        "inst_level_loose_acc": loose,
    }


def agg_inst_level_acc(items: list[list[bool]]) -> float:
    flat = [x for sub in items for x in sub]
    return sum(flat) / len(flat)
