"""Build an offline English pretraining corpus: the King James Version of the Bible (1611), from Debian.

Licence: the KJV text is in the public domain (its copyright expired; Debian's bible-kjv-text copyright file:
"The copyright for the King James Version text of the Bible is expired since the translation was done in
1611"). Caveat: in the United Kingdom the Crown's letters patent still restrict printing it; everywhere else
it is free to use. The Debian packages' own software (the `bible` retrieval program) is GPL-2+; only the text
it prints is written here.

Get it (Debian/Ubuntu, root; the packages are 2.5 MB):

    apt-get install bible-kjv bible-kjv-text
    python scripts/make_english_corpus.py --out data/kjv [--validation-every 20]

Writes ``train.jsonl`` and ``validation.jsonl`` ({"text": ..., "title": ...} per line): one document per
chapter (1,189 chapters, 4.3 MB of text, about 1.53M tokens with the built-in 4096-token BPE tokenizer).
The split is by whole document and deterministic: a chapter goes to validation when the sha256 of its title
falls in 1 of every `--validation-every` buckets (default 20: ~5%), so the two files never share a chapter.
Use it in a study or pretraining config as:

    data: {dataset: json, data_files: {train: data/kjv/train.jsonl, validation: data/kjv/validation.jsonl},
           tokenizer: builtin, shuffle_buffer: 0}
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

VERSE = re.compile(r"^\s+\d+ (.*)$")
FIRST_TO_LAST = "Gen1:1-Rev22:21"


def read_chapters(bible: str, datafile: str | None = None) -> list[tuple[str, str]]:
    """(title, text) of every chapter, in canonical order, from the `bible` program of Debian's bible-kjv."""
    cmd = [bible, "-l100000"] + (["-d", datafile] if datafile else []) + [FIRST_TO_LAST]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    chapters, current = [], None
    for line in out.splitlines():
        m = VERSE.match(line)
        if m:
            current[1].append(m.group(1).strip())
        elif line.strip():
            current = (line.strip(), [])
            chapters.append(current)
    return [(title, " ".join(verses)) for title, verses in chapters if verses]


def is_validation(title: str, every: int) -> bool:
    return int(hashlib.sha256(title.encode()).hexdigest(), 16) % every == 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder to write train.jsonl and validation.jsonl into")
    p.add_argument("--bible", default=shutil.which("bible"), help="the `bible` program (apt-get install bible-kjv)")
    p.add_argument("--datafile", default=None, help="bible.data (default: the one bible-kjv-text installs)")
    p.add_argument("--validation-every", type=int, default=20, help="1 chapter in N goes to validation (default 20)")
    p.add_argument("--count-tokens", action="store_true", help="also count tokens with the built-in tokenizer")
    args = p.parse_args(argv)
    if not args.bible:
        print(
            "make_english_corpus: the `bible` program was not found; install it with "
            "`apt-get install bible-kjv bible-kjv-text` (Debian/Ubuntu) or pass --bible",
            file=sys.stderr,
        )
        return 2
    if args.validation_every < 2:
        print("make_english_corpus: --validation-every must be >= 2", file=sys.stderr)
        return 2
    chapters = read_chapters(args.bible, args.datafile)
    if len(chapters) != 1189:
        print(f"make_english_corpus: expected 1189 chapters, read {len(chapters)}", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    counts = {"train": 0, "validation": 0}
    texts = {"train": [], "validation": []}
    for title, text in chapters:
        split = "validation" if is_validation(title, args.validation_every) else "train"
        texts[split].append({"title": title, "text": text})
        counts[split] += 1
    for split, rows in texts.items():
        with open(out / f"{split}.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    report = {
        "source": "King James Version (1611), Debian packages bible-kjv / bible-kjv-text",
        "licence": "public domain (Crown letters patent restrict printing in the UK)",
        "documents": counts,
        "characters": {s: sum(len(r["text"]) for r in rows) for s, rows in texts.items()},
    }
    if args.count_tokens:
        from transformers import AutoTokenizer

        from hf_sparse_ift.resources import builtin_dir

        tok = AutoTokenizer.from_pretrained(builtin_dir() / "tokenizer")
        report["tokens_builtin_tokenizer"] = {
            s: sum(len(tok(r["text"], add_special_tokens=False, verbose=False)["input_ids"]) + 1 for r in rows)
            for s, rows in texts.items()
        }
    (out / "README.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
