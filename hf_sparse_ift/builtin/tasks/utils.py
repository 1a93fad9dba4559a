"""Loaders for the built-in lm-eval tasks: data files sit next to this file, wherever it is installed."""

from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def load_docstring_mc(**kwargs):
    return datasets.load_dataset("json", data_files={"test": str(HERE / "docstring_mc.jsonl")})


def load_arithmetic_gen(**kwargs):
    return datasets.load_dataset("json", data_files={"test": str(HERE / "arithmetic_gen.jsonl")})
