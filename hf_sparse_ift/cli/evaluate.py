"""``hf-sparse-ift evaluate | compare | perplexity | card``.

Bad input raises `UsageError` with one sentence naming the bad value and the valid choices; `cli.main` prints it as
``hf-sparse-ift <command>: error: ...`` and exits 2. Every check runs before a model is loaded or a file is written.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import InputNotFoundError, UsageError
from ..evaluation.harness import DTYPES, check_writable
from ..evaluation.suites import SUITES


def add_parsers(sub) -> None:
    p = sub.add_parser("evaluate", help="score a checkpoint or Hub model with lm-eval-harness")
    p.add_argument("--model", required=True, help="checkpoint folder (…/checkpoint-N/hf) or Hub name")
    p.add_argument("--revision", help="Hub branch, tag or commit (default: main, recorded as its commit)")
    p.add_argument(
        "--suite",
        default="paper",
        help=f"one of {', '.join(SUITES)}, or comma-separated lm-eval task names (default: paper)",
    )
    p.add_argument("--include-path", help="folder of extra lm-eval task YAMLs")
    p.add_argument("--num-fewshot", type=int, help="override the suite's few-shot counts (not for leaderboard-v2)")
    p.add_argument("--batch-size", default="auto", help="integer or auto (default)")
    p.add_argument("--dtype", default="auto", help=f"one of {', '.join(DTYPES)} (default: auto)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 … (default: cuda when available, else cpu)")
    p.add_argument(
        "--limit", type=float, help="examples per task (or a fraction), for quick checks; marks the results partial"
    )
    p.add_argument(
        "--output-dir",
        default="eval_results",
        help="results go to <output-dir>/<model>/<suite>/ (default: eval_results)",
    )
    p.add_argument(
        "--tokenizer",
        help="tokenizer folder, Hub name or builtin (default: the model's own; needed when the model folder has none)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace earlier results of the same model in that folder (never another model's)",
    )

    c = sub.add_parser("compare", help="tables of evaluation summaries (one per suite), with deltas")
    c.add_argument("summaries", nargs="+", help="summary.json files or the folders holding them; first = baseline")
    c.add_argument("--names", help="comma-separated row names")
    c.add_argument("--paper", action="store_true", help="add the paper's Table 15 rows beside `paper` suite rows")
    c.add_argument("--output", help="also write the tables to this markdown file")
    c.add_argument("--overwrite", action="store_true", help="replace an existing --output file")

    x = sub.add_parser("perplexity", help="validation loss / perplexity on held-out text")
    x.add_argument("--model", required=True, help="checkpoint folder (…/checkpoint-N/hf) or Hub name")
    x.add_argument(
        "--dataset", default="builtin", help="builtin, a Hub dataset, or a loader (json, csv, …) for --data-files"
    )
    x.add_argument("--data-files", help="local files (a path or glob), all of them read as the held-out text")
    x.add_argument("--text-column", default="text")
    x.add_argument("--split", default="validation", help="the split to read (default: %(default)s)")
    x.add_argument(
        "--bad-text",
        default="error",
        choices=("error", "skip"),
        help="documents whose text is not a string: stop naming the first (default) or skip and count them",
    )
    x.add_argument(
        "--tokenizer", help="tokenizer folder, Hub name or builtin (default: the model's own; needed when it has none)"
    )
    x.add_argument("--batch-size", type=int, default=8)
    x.add_argument("--max-batches", type=int, default=50)
    x.add_argument("--seq-len", type=int, help="tokens per sequence (default and maximum: the model's positions)")

    k = sub.add_parser("card", help="render (and optionally push) the Hub model card of a checkpoint")
    k.add_argument("checkpoint", help="a save_pretrained folder, e.g. outputs/…/checkpoint-600/hf")
    k.add_argument(
        "--results",
        action="append",
        metavar="SUMMARY",
        help="summary.json from `evaluate` of this checkpoint (results table and model-index); repeatable",
    )
    k.add_argument(
        "--allow-other-checkpoint",
        action="store_true",
        help="accept --results made from a checkpoint with other weights",
    )
    k.add_argument("--repo-id", help="Hub repo id shown in the card (default: the training run's name)")
    k.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the folder with its card to this Hub repo")
    k.add_argument("--private", action="store_true")


def cmd_evaluate(args) -> int:
    from ..evaluation.compare import raw_table, results_table
    from ..evaluation.harness import evaluate

    summary = evaluate(
        args.model,
        args.suite,
        batch_size=args.batch_size,
        dtype=args.dtype,
        device=args.device,
        limit=args.limit,
        output_dir=args.output_dir,
        include_path=args.include_path,
        num_fewshot=args.num_fewshot,
        overwrite=args.overwrite,
        revision=args.revision,
        tokenizer=args.tokenizer,
    )
    print(results_table([summary]), end="")
    if summary["scoring"] == "leaderboard-v2":
        print("\nRaw lm-eval scores:\n\n" + raw_table(summary), end="")
    print(f"(written to {summary['output_dir']}/: summary.json, results.md and lm_eval_<task>.json)")
    return 0


def cmd_compare(args) -> int:
    from ..evaluation.compare import check_output, compare

    if args.output:
        check_output(args.output, args.summaries, args.overwrite)
        check_writable(Path(args.output).parent)
    table = compare(args.summaries, paper=args.paper, names=args.names.split(",") if args.names else None)
    print(table, end="")
    if args.output:
        Path(args.output).write_text(table)
    return 0


def cmd_perplexity(args) -> int:
    from ..evaluation.perplexity import perplexity

    print(
        json.dumps(
            perplexity(
                args.model,
                args.dataset,
                args.tokenizer,
                args.split,
                args.max_batches,
                args.batch_size,
                args.seq_len,
                args.data_files,
                args.text_column,
                args.bad_text,
            )
        )
    )
    return 0


def checked_summaries(checkpoint: str | Path, paths: list[str], allow_other: bool = False) -> list[dict]:
    """The summaries of `paths`, each made from `checkpoint`'s weights (the sha256 of its decoded tensors, so a
    lossless `compress` / `decompress` of the same weights counts as the same), unless `allow_other`."""
    from ..evaluation.compare import load_summary
    from ..hub.identity import describe, local_identity, same_model

    mine = local_identity(checkpoint)
    out = []
    for path in paths:
        summary = load_summary(path)
        theirs = summary["model"]
        if not allow_other and not same_model(theirs, mine):
            made_from = (
                describe(theirs)
                if theirs.get("tensors_sha256") or theirs.get("hub_id")
                else f"{theirs.get('path') or theirs.get('name')} (no tensors sha256 recorded: written by an "
                "older version; evaluate again to record it)"
            )
            raise UsageError(
                f"--results {path} was made from {made_from}, not from this checkpoint {describe(mine)}; "
                "pass --allow-other-checkpoint to use it anyway"
            )
        out.append(summary)
    return out


def cmd_card(args) -> int:
    from ..hub.model_card import write_model_card

    if not (Path(args.checkpoint) / "config.json").is_file():
        raise InputNotFoundError(f"{args.checkpoint}: not a save_pretrained folder (no config.json)")
    from ..hub.push import check_hub_access, push_folder

    summaries = checked_summaries(args.checkpoint, args.results or [], args.allow_other_checkpoint)
    if args.push_to_hub:
        check_hub_access(args.push_to_hub)  # before the card is rewritten
    path = write_model_card(args.checkpoint, repo_id=args.repo_id or args.push_to_hub, summaries=summaries)
    print(f"wrote {path}")
    if args.push_to_hub:
        push_folder(args.checkpoint, args.push_to_hub, args.private)
        print(f"pushed {args.checkpoint} to https://huggingface.co/{args.push_to_hub}")
    return 0


HANDLERS = {"evaluate": cmd_evaluate, "compare": cmd_compare, "perplexity": cmd_perplexity, "card": cmd_card}
