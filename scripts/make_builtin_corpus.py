"""Build the corpus and tokenizer shipped in `hf_sparse_ift/builtin/` (run once; output is committed).

Corpus: the docstrings of the Python standard library (English technical prose, PSF licence), one
document per module / class / function, deduplicated; every 20th document goes to validation.
Tokenizer: byte-level BPE with 4096 entries trained on the train split, ``<|endoftext|>`` = id 0
(GPT-2's scheme at a size a 2-core CPU can train against in minutes).

    python scripts/make_builtin_corpus.py --output-dir /tmp/builtin          # a new folder
    python scripts/make_builtin_corpus.py --overwrite                        # replace the shipped files

The docstrings differ between Python versions, so a rebuild under another version changes the corpus, the
tokenizer and the tasks: the shipped folder is replaced only with --overwrite, and any existing output folder too.
"""

import argparse
import gzip
import inspect
import json
import sys
import warnings
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "hf_sparse_ift" / "builtin"
SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "__main__", "pydoc_data", "lib2to3"}


def docstrings():
    seen = set()
    for name in sorted(sys.stdlib_module_names):
        if name in SKIP or name.startswith("_"):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = __import__(name)
        except Exception:
            continue
        objects = [module] + [v for k, v in sorted(vars(module).items()) if not k.startswith("_")]
        for obj in objects:
            if not (inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isroutine(obj)):
                continue
            if inspect.ismodule(obj) and obj is not module:
                continue
            members = [obj] + (
                [v for k, v in sorted(vars(obj).items()) if not k.startswith("_") and inspect.isroutine(v)]
                if inspect.isclass(obj)
                else []
            )
            for item in members:
                doc = inspect.getdoc(item)
                if doc and len(doc) >= 200 and doc not in seen:
                    seen.add(doc)
                    yield doc


def main(out: Path = OUT):
    docs = list(docstrings())
    train = [d for i, d in enumerate(docs) if i % 20]
    validation = [d for i, d in enumerate(docs) if i % 20 == 0]
    for split, rows in (("train", train), ("validation", validation)):
        with gzip.open(out / f"corpus-{split}.jsonl.gz", "wt", encoding="utf-8", compresslevel=9) as f:
            for text in rows:
                f.write(json.dumps({"text": text}) + "\n")
    print(
        f"{len(train)} train / {len(validation)} validation documents, "
        f"{sum(map(len, train)) / 1e6:.2f}M / {sum(map(len, validation)) / 1e6:.2f}M characters"
    )

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4096, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(train, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        model_max_length=2048,
    )
    fast.save_pretrained(out / "tokenizer")
    print("tokenizer:", len(fast), "tokens")


def make_tasks(out: Path = OUT):
    """Two small lm-eval tasks over the validation corpus, for offline evaluation tests:
    multiple choice (pick the true continuation of a docstring among 4) and generate-until (arithmetic)."""
    import random

    rng = random.Random(0)
    with gzip.open(out / "corpus-validation.jsonl.gz", "rt") as validation:
        rows = [json.loads(line)["text"] for line in validation]
    pieces = []
    for text in rows:
        words = text.split()
        if len(words) >= 16:
            pieces.append((" ".join(words[:10]), " ".join(words[10:16])))
    tasks = out / "tasks"
    tasks.mkdir(exist_ok=True)
    with open(tasks / "docstring_mc.jsonl", "w") as f:
        for i, (context, ending) in enumerate(pieces[:40]):
            others = [p[1] for j, p in enumerate(pieces) if j != i]
            choices = rng.sample(others, 3) + [ending]
            rng.shuffle(choices)
            f.write(json.dumps({"context": context, "choices": choices, "label": choices.index(ending)}) + "\n")
    with open(tasks / "arithmetic_gen.jsonl", "w") as f:
        for _ in range(40):
            a, b = rng.randint(1, 50), rng.randint(1, 50)
            f.write(json.dumps({"question": f"What is {a} plus {b}?", "answer": str(a + b)}) + "\n")


def cli(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--output-dir", type=Path, default=OUT, help="where to write (default: the shipped %(default)s)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace the files of an existing output folder")
    args = parser.parse_args(argv)
    out = args.output_dir
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        print(
            f"make_builtin_corpus.py: error: {out} already holds files (the shipped corpus, tokenizer and tasks when "
            f"it is the default); this Python {sys.version.split()[0]} may build them differently. Pass --overwrite "
            "to replace them, or --output-dir to write elsewhere",
            file=sys.stderr,
        )
        return 2
    out.mkdir(parents=True, exist_ok=True)
    main(out)
    make_tasks(out)
    print(f"written to {out} with Python {sys.version.split()[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(cli())
