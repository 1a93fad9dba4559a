"""Does the data pipeline keep an accelerator busy? The real pipeline against a simulated accelerator.

    python benchmarks/data_loading.py                  # Pile-sized documents, H100 dense step (41.3 ms / 8 x 2048)
    python benchmarks/data_loading.py --smoke          # seconds (CI)

The host runs the trainer's loop shape: take a micro-batch from `Batches` (real `datasets` streaming, real
tokenizer, real packing), spend --launch-ms of Python holding the GIL (kernel launches), and hand the step to
the "accelerator", a thread that takes --step-ms per step. As in the trainer, which reads each loss one step
late, the host runs at most one step ahead, so any wait for data longer than that leaves the accelerator idle.
Reported per pipeline setting: tokens/s reached, against the accelerator's own rate, and its idle fraction.

The documents are the built-in docstrings joined seven at a time (about 4 KB, the Pile's mean document size),
then the same with one document in 100 a hundred times longer (a book), unless --data-files names a local
json/jsonl file; the tokenizer is the built-in 4096-token BPE (the GPT-2
tokenizer cannot be downloaded here). Writes ``<out>/<cpu>-<date>-data-loading.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import platform
import queue
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import datasets
import tokenizers
import torch

from hf_sparse_ift.data.config import DataConfig
from hf_sparse_ift.data.pipeline import Batches, PackedStream, load_tokenizer, resolve_data_source
from hf_sparse_ift.resources import builtin_dir

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_files

# (name, documents per tokenizer call, batches made ahead); the first is the pipeline before prefetching.
SETTINGS = [
    ("on demand, 1000 docs per tokenizer call", 1000, 0),
    ("on demand, 64 docs per call", 64, 0),
    ("prefetch 32 batches, 64 docs per call (default)", 64, 32),
]


def synthetic_documents(path: Path, count: int, book_every: int = 0, seed: int = 0) -> Path:
    """`count` documents of seven built-in docstrings (about 4 KB, the Pile's mean document size); with
    `book_every`, one document in that many is 100 times longer (about 400 KB, the mean size of a PG-19 book)."""
    with gzip.open(builtin_dir() / "corpus-train.jsonl.gz", "rt") as corpus:
        docs = [json.loads(line)["text"] for line in corpus]
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(count):
            n = 700 if book_every and i % book_every == book_every - 1 else 7
            f.write(json.dumps({"text": "\n\n".join(rng.choices(docs, k=n))}) + "\n")
    return path


def hold_gil(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def simulate(batches: Batches, steps: int, step_s: float, launch_s: float, warmup: int) -> dict:
    """Run `steps` steps of the loop against a simulated accelerator; returns its busy / idle times."""
    pending: queue.Queue = queue.Queue(maxsize=1)  # the step launched while the previous one still runs
    busy = [0.0]

    def accelerator():
        while pending.get() is not None:
            start = time.perf_counter()
            time.sleep(step_s)
            busy[0] += time.perf_counter() - start

    device = threading.Thread(target=accelerator, daemon=True)
    waits = []
    for step in range(warmup + steps):
        if step == warmup:
            device.start()
            start = time.perf_counter()
        t0 = time.perf_counter()
        next(batches)
        if step >= warmup:
            waits.append(time.perf_counter() - t0)
            hold_gil(launch_s)
            pending.put(step)
    pending.put(None)
    device.join()
    wall = time.perf_counter() - start
    return {
        "wall_s": wall,
        "accelerator_busy_s": busy[0],
        "idle_fraction": 1 - busy[0] / wall,
        "mean_batch_wait_ms": 1e3 * sum(waits) / len(waits),
        "worst_batch_wait_ms": 1e3 * max(waits),
    }


def raw_throughput(stream: PackedStream, batch_size: int, seconds: float) -> float:
    batches = Batches(stream, batch_size, prefetch=0)
    next(batches)
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        next(batches)
        n += 1
    return n * batch_size * stream.source.seq_len / (time.perf_counter() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-files", default=None, help="local json/jsonl with a 'text' column")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument(
        "--step-ms",
        type=float,
        default=41.3,
        help="accelerator time per micro-batch (default: our dense GPT-3 Small step on an H100, "
        "benchmarks/results/NVIDIA-H100-80GB-HBM3-2026-11-23.md)",
    )
    parser.add_argument("--launch-ms", type=float, default=5.0, help="host Python time per step, GIL held")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--smoke", action="store_true", help="tiny run for CI")
    results_files.add_arguments(parser)
    args = parser.parse_args(argv)
    machine = f"cpu-{platform.machine()}-{torch.get_num_threads()}threads"
    today = datetime.date.today().isoformat()
    stem = results_files.tagged(f"{machine}-{today}-data-loading", args.tag)
    results_files.refuse_existing(args.out, stem, args.overwrite)
    if args.smoke:
        args.seq, args.micro_batch, args.step_ms, args.launch_ms, args.steps = 256, 4, 5.0, 1.0, 20

    tokenizer = load_tokenizer("builtin")
    tokens_per_step = args.micro_batch * args.seq
    ideal = tokens_per_step / (args.step_ms / 1e3)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        count = 300 if args.smoke else 6000
        corpora = (
            [("local files", args.data_files)]
            if args.data_files
            else [
                ("4 KB documents", str(synthetic_documents(Path(tmp) / "docs.jsonl", count))),
                (
                    "4 KB documents, 1 in 100 a 400 KB book",
                    str(synthetic_documents(Path(tmp) / "books.jsonl", count, book_every=100)),
                ),
            ]
        )
        for corpus, files in corpora:
            cfg = resolve_data_source(
                DataConfig(dataset="json", data_files=files, seq_len=args.seq, validation_split=None)
            )
            for name, docs_per_call, prefetch in SETTINGS:
                raw = raw_throughput(
                    PackedStream(cfg, tokenizer, "train", tokenize_batch_docs=docs_per_call),
                    args.micro_batch,
                    1.0 if args.smoke else 5.0,
                )
                batches = Batches(
                    PackedStream(cfg, tokenizer, "train", tokenize_batch_docs=docs_per_call),
                    args.micro_batch,
                    prefetch=prefetch,
                )
                sim = simulate(batches, args.steps, args.step_ms / 1e3, args.launch_ms / 1e3, warmup=2)
                batches.close()
                tok_s = args.steps * tokens_per_step / sim["wall_s"]
                rows.append(
                    {
                        "corpus": corpus,
                        "setting": name,
                        "tokenize_batch_docs": docs_per_call,
                        "prefetch_batches": prefetch,
                        "pipeline_tokens_per_s": raw,
                        "tokens_per_s": tok_s,
                        "fraction_of_accelerator_rate": tok_s / ideal,
                        **sim,
                    }
                )
                print(
                    f"{corpus} | {name}: pipeline alone {raw:,.0f} tokens/s; with the accelerator {tok_s:,.0f} "
                    f"tokens/s ({tok_s / ideal:.1%} of {ideal:,.0f}), idle {sim['idle_fraction']:.1%}, "
                    f"worst wait {sim['worst_batch_wait_ms']:.0f} ms",
                    flush=True,
                )

    command = "data_loading.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = {
        "machine": machine,
        "date": today,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "datasets": datasets.__version__,
        "tokenizers": tokenizers.__version__,
        "command": command.strip(),
        "data_files": args.data_files or "built-in docstrings (see the documents column)",
        "seq_len": args.seq,
        "micro_batch": args.micro_batch,
        "step_ms": args.step_ms,
        "launch_ms": args.launch_ms,
        "steps": args.steps,
        "accelerator_tokens_per_s": ideal,
        "results": rows,
    }
    lines = [
        f"# Data loading against a simulated accelerator — {machine} ({os.cpu_count()} cores) — {today}",
        "",
        f"torch {torch.__version__}, datasets {datasets.__version__}, tokenizers {tokenizers.__version__}; "
        f"documents: {report['data_files']}; built-in tokenizer; micro-batch {args.micro_batch} x {args.seq} tokens; "
        f"accelerator {args.step_ms} ms per step ({ideal:,.0f} tokens/s), host launch {args.launch_ms} ms per step "
        f"(GIL held); {args.steps} steps.",
        "",
        f"Command: `{report['command']}`",
        "",
        "| documents | pipeline | pipeline alone tokens/s | tokens/s with accelerator | of accelerator rate | accelerator idle "
        "| mean wait ms | worst wait ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['corpus']} | {r['setting']} | {r['pipeline_tokens_per_s']:,.0f} | {r['tokens_per_s']:,.0f} | "
            f"{r['fraction_of_accelerator_rate']:.1%} | {r['idle_fraction']:.1%} | "
            f"{r['mean_batch_wait_ms']:.1f} | {r['worst_batch_wait_ms']:.0f} |"
        )
    texts = {".json": json.dumps(report, indent=1), ".md": "\n".join(lines) + "\n"}
    written = results_files.write(args.out, stem, texts, args.overwrite)
    print(f"wrote {written['.json']} and {written['.md']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
