"""Build an offline English pretraining corpus (about 15M tokens) from free texts that Debian packages ship.

Sources (each a Debian `main` package, so DFSG-free; the licence written to the manifest is checked against
the package's own /usr/share/doc/<package>/copyright file, which must contain the quoted evidence):

| source          | package              | text                                              | licence                  |
| --------------- | -------------------- | ------------------------------------------------- | ------------------------ |
| kjv             | bible-kjv-text       | King James Bible (1611), one document per chapter | public domain            |
| treasury-david  | sword-comm-tdavid    | Spurgeon, The Treasury of David (1869-1885), per psalm | public domain       |
| debian-handbook | debian-handbook      | The Debian Administrator's Handbook, per page     | GPL-2.0+ or CC-BY-SA-3.0 |
| debian-reference| debian-reference-en  | Debian Reference, per chapter                     | GPL-2+                   |
| maint-guide     | maint-guide          | Debian New Maintainers' Guide, per chapter        | GPL-2.0+                 |
| developers-reference | developers-reference | Debian Developer's Reference, per chapter    | GPL-2                    |
| debian-policy   | debian-policy        | Debian Policy Manual, per chapter                 | GPL-2+                   |
| python-docs     | python3.11-doc       | Python 3.11 documentation, per page               | PSF License 2            |
| postgresql-docs | postgresql-doc-15    | PostgreSQL 15 manual, per page                    | PostgreSQL licence       |
| linux-docs      | linux-doc-6.1        | Linux kernel Documentation (prose-heavy parts)    | GPL-2                    |
| git-docs        | git-doc              | Git manual pages and guides, per page             | GPL-2                    |
| perl-docs       | perl-doc             | Perl's manual (perlfaq, perlintro, ...), per page | GPL-1+ or Artistic       |

Two public-domain religious works (the KJV and Spurgeon's commentary on the Psalms) give narrative, poetic and
argumentative prose written in 1611 and 1869-1885; the manuals give modern expository English. Markup is
stripped and code listings (literal blocks, <pre>, verbatim POD) are dropped, so the text is prose; documents
shorter than --min-chars are dropped, and exact duplicate texts are kept once (the first by source order and
document id). Debian's sword-comm-mhcc (Matthew Henry's commentary) is not used: diatheke reads it with errors
and prints blocks of hundreds of kilobytes for single verses.

Install the sources (Debian 12 "bookworm", as root; about 130 MB of downloads; the doc packages require the
exact version of what they document, so apt also upgrades perl, python3.11 and postgresql-15 where these are
older; other releases name the versioned packages and folders differently):

    apt-get install --no-install-recommends bible-kjv bible-kjv-text diatheke sword-comm-tdavid \\
        debian-handbook debian-reference-en maint-guide developers-reference debian-policy \\
        python3.11-doc postgresql-doc-15 linux-doc-6.1 git-doc perl-doc
    python scripts/make_english_corpus.py --out data/english

Measured with these package versions (Debian 12.x, December 2026): 4,088 documents and 14,768,757 tokens,
14,123,735 (3,888 documents) in train and 645,022 (200 documents) in validation; 3 minutes on 2 busy cores.

Writes ``train.jsonl`` and ``validation.jsonl`` ({"text", "title", "source"} per line) and ``manifest.json``
(per source: package and version, licence and its evidence, documents and tokens per split; the sha256,
documents and tokens of each file; the total). Tokens are counted with the package's built-in 4096-token BPE
tokenizer as the data pipeline packs them: a document's ids without special tokens, plus the one EOS that
packing appends. Both files hold their documents in a fixed pseudo-random order (sha256 of the id) that
interleaves the sources, since a run reads the training file front to back and evaluates on the first batches of
the validation file. The split is by whole document and deterministic: a document goes to validation when the
sha256 of its stable id (``source/path-or-chapter``) is 0 modulo --validation-every (default 20, ~5%), so the
two files never share a document and the split does not depend on which other sources were built. Use it in a
study or pretraining config as:

    data: {dataset: json, data_files: {train: data/english/train.jsonl, validation: data/english/validation.jsonl},
           tokenizer: builtin, shuffle_buffer: 0}
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

SPLITS = ("train", "validation")


@dataclass(frozen=True)
class Document:
    source: str
    doc_id: str  # stable across runs and machines: "<source>/<path or book and chapter>"
    title: str
    text: str


@dataclass(frozen=True)
class Package:
    name: str
    licence: str
    evidence: str  # a passage that must appear in the package's copyright file


@dataclass(frozen=True)
class Source:
    name: str
    package: Package
    description: str
    read: Callable[[], Iterator[Document]]


# ----------------------------------------------------------------------------------------------------------------
# Cleaning (pure functions: text in, text out)

LIST_ITEM = re.compile(r"^(?:[-*+\u2022]|\d+[.)]|#\.|[a-z][.)])\s")
SPACES = re.compile(r"[ \t\r\f\v\u00a0]+")


def join_paragraphs(lines: Iterable[str]) -> str:
    """Lines to plain text: blank lines separate paragraphs, wrapped lines are joined, list items stay apart."""
    paragraphs, current = [], []
    for line in lines:
        line = SPACES.sub(" ", line).strip()
        if not line:
            if current:
                paragraphs.append("\n".join(current))
                current = []
        elif current and not LIST_ITEM.match(line):
            current[-1] += " " + line
        else:
            current.append(line)
    if current:
        paragraphs.append("\n".join(current))
    return "\n\n".join(paragraphs)


class _HTMLText(HTMLParser):
    """The readable text of an HTML page: no head, navigation, scripts, tables or code listings."""

    SKIP_TAGS = {"head", "script", "style", "nav", "header", "footer", "pre", "table", "svg", "math", "form"}
    SKIP_CLASSES = {
        "navheader",
        "navfooter",
        "docnav",
        "toc",
        "list-of-tables",
        "list-of-figures",
        "list-of-examples",
        "sphinxsidebar",
        "related",
        "footer",
        "headerlink",
    }
    SKIP_IDS = {"banner", "title", "footer", "footer-text"}
    VOID_TAGS = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
    BLOCK_TAGS = {"p", "div", "li", "dt", "dd", "ul", "ol", "dl", "section", "blockquote", "br", "hr", "tr"}
    BLOCK_TAGS |= {f"h{level}" for level in range(1, 7)}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.open_tags: list[tuple[str, bool]] = []  # (tag, starts a skipped region)
        self.skipping = 0
        self.in_title = False
        self.title = ""
        self.pieces: list[str] = []

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if tag == "title":
            self.in_title = True
        if tag in self.BLOCK_TAGS:
            self.pieces.append("\n\n")
        if tag in self.VOID_TAGS:
            return
        classes = set((attributes.get("class") or "").split())
        skip = tag in self.SKIP_TAGS or bool(classes & self.SKIP_CLASSES) or attributes.get("id") in self.SKIP_IDS
        skip = skip or attributes.get("role") == "navigation"
        self.open_tags.append((tag, skip))
        self.skipping += skip

    def handle_endtag(self, tag):
        if tag == "title":
            self.in_title = False
        if tag in self.BLOCK_TAGS:
            self.pieces.append("\n\n")
        if not any(open_tag == tag for open_tag, _ in self.open_tags):
            return  # a stray end tag closes nothing
        while self.open_tags:
            open_tag, skip = self.open_tags.pop()
            self.skipping -= skip
            if open_tag == tag:
                break

    def handle_data(self, data):
        if self.in_title:
            self.title += data
        elif not self.skipping:
            self.pieces.append(data.replace("\n", " "))


def clean_html(html: str) -> tuple[str, str]:
    """(title, plain text) of an HTML page."""
    parser = _HTMLText()
    parser.feed(html)
    parser.close()
    text = join_paragraphs("".join(parser.pieces).split("\n"))
    return SPACES.sub(" ", parser.title).strip(), text


# reST directives whose body is prose (admonitions, API descriptions); every other directive's body is dropped
# (code, tables, includes, toctrees, kernel-doc, images). Admonitions keep their inline argument too.
RST_ADMONITIONS = {"note", "warning", "tip", "important", "attention", "caution", "hint", "danger", "seealso"}
RST_ADMONITIONS |= {"admonition", "topic", "sidebar", "versionadded", "versionchanged", "deprecated", "rubric"}
RST_PROSE_BODIES = RST_ADMONITIONS | {"glossary", "impl-detail", "describe", "option", "cmdoption", "envvar"}
RST_PROSE_BODIES |= {"function", "method", "class", "attribute", "data", "exception", "decorator", "module"}
RST_PROSE_BODIES |= {"classmethod", "staticmethod", "coroutinefunction", "coroutinemethod", "abstractmethod"}
RST_PROSE_BODIES |= {"opcode", "pdbcommand", "c:function", "c:type", "c:member", "c:macro", "c:var", "c:struct"}
RST_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:.-]+)::\s*(.*)$")
RST_ADORNMENT = re.compile(r"^([=\-~^\"'`#*+<>_:.])\1{2,}$")
RST_TABLE_BORDER = re.compile(r"^[=\-+]{3,}[=\-+ ]*$")
RST_TABLE_ROW = re.compile(r"^\|")  # also a line block
RST_FIELD = re.compile(r"^:[\w -]+:(\s|$)")  # field lists and directive options (:synopsis:, :maxdepth:)
RST_DROPPED_LINES = (RST_ADORNMENT, RST_TABLE_BORDER, RST_TABLE_ROW, RST_FIELD)
RST_ROLE = re.compile(r":[\w:.+-]+:`([^`]*)`")
RST_REFERENCE = re.compile(r"`([^`<]*?)\s*(?:<[^>]*>)?`__?")
RST_LITERAL = re.compile(r"``(.+?)``", flags=re.S)
RST_INTERPRETED = re.compile(r"`([^`]+)`")
RST_STRONG = re.compile(r"\*\*(\S(?:.*?\S)?)\*\*", flags=re.S)
RST_EMPHASIS = re.compile(r"(?<![\w*])\*(\S(?:.*?\S)?)\*(?![\w*])")
RST_FOOTNOTE_REF = re.compile(r"\s?\[(?:#\w*|\*|\d+)\]_")


def _role_text(match: re.Match) -> str:
    """`:func:`~os.path.join`` -> join, `:ref:`title <target>`` -> title, `:c:func:`!f`` -> f."""
    text = match.group(1)
    titled = re.match(r"^(.*?)\s*<[^>]*>$", text, flags=re.S)
    if titled and titled.group(1):
        return titled.group(1)
    if text.startswith("~"):
        return text[1:].rsplit(".", 1)[-1]
    return text.lstrip("!")


def rst_inline(line: str) -> str:
    line = RST_ROLE.sub(_role_text, line)
    line = RST_REFERENCE.sub(r"\1", line)
    line = RST_LITERAL.sub(r"\1", line)
    line = RST_INTERPRETED.sub(r"\1", line)
    line = RST_STRONG.sub(r"\1", line)
    line = RST_EMPHASIS.sub(r"\1", line)
    line = RST_FOOTNOTE_REF.sub("", line)
    return line.replace("\\ ", "").replace("\\", "")


def clean_rst(source: str) -> str:
    """Plain prose from reStructuredText: no code or literal blocks, tables, comments, targets or markup."""
    kept = []
    skip_deeper_than = None  # inside a dropped block: drop blank lines and lines indented more than this
    for line in source.expandtabs(8).splitlines():
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if skip_deeper_than is not None:
            if not stripped or indent > skip_deeper_than:
                continue
            skip_deeper_than = None
        if not stripped:
            kept.append("")
            continue
        directive = RST_DIRECTIVE.match(line)
        if directive:
            name = directive.group(2).lower()
            if name not in RST_PROSE_BODIES:
                skip_deeper_than = indent
            elif name in RST_ADMONITIONS and directive.group(3) and not name.startswith("version"):
                kept += ["", directive.group(3)]
        elif stripped.startswith(".."):  # comment, hyperlink target, footnote or substitution definition
            skip_deeper_than = indent
        elif any(pattern.match(stripped) for pattern in RST_DROPPED_LINES):
            pass  # a title's adornment, a table's border or row, a line block, a field list
        elif stripped.endswith("::"):  # the indented block after it is a literal (code) block
            skip_deeper_than = indent
            stripped = stripped[:-2].rstrip()
            kept.append(stripped + ":" if stripped and not stripped.endswith(":") else stripped)
        else:
            kept.append(stripped)
            continue
        kept.append("")  # whatever was dropped or ends here separates paragraphs
    # Inline markup may wrap across lines, so it is removed once the paragraphs are joined.
    return rst_inline(join_paragraphs(kept))


# C<< text >> (2 to 4 brackets, whose text may hold < and >) first, then the innermost C<text>
POD_CODES = [re.compile(rf"([A-Z])<{{{n}}}\s+(.*?)\s+>{{{n}}}", flags=re.S) for n in (4, 3, 2)]
POD_CODES.append(re.compile(r"([A-Z])<([^<>]*)>"))
POD_ESCAPES = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/", "quot": '"', "amp": "&", "apos": "'"}


def _pod_code_text(match: re.Match) -> str:
    """B<bold>, C<code>, I<italic>, F<file>, S<text> -> text; X<index>, Z<> -> nothing; E<gt> -> >;
    L<text|target> -> text, L<url> -> url, L<page/"section"> -> "section" in page (as perldoc prints it)."""
    code, text = match.groups()
    if code in ("X", "Z"):
        return ""
    if code == "E":
        return POD_ESCAPES.get(text, chr(int(text)) if text.isdigit() else "")
    if code == "L":
        if "|" in text:
            return text.split("|", 1)[0]
        if "://" in text:
            return text
        page, _, section = text.partition("/")
        section = section.strip('"')
        return f'"{section}" in {page}' if page and section else section or page
    return text


def pod_inline(text: str) -> str:
    """Formatting codes (B<..>, C<< .. >>, L<..|..>, E<..>) to their text, innermost first."""
    previous = None
    while previous != text:
        previous = text
        for pattern in POD_CODES:
            text = pattern.sub(_pod_code_text, text)
    return text


def clean_pod(source: str) -> str:
    """Plain prose from Perl POD: headings and paragraphs kept, verbatim (code) paragraphs and commands dropped."""
    kept, in_pod, in_begin = [], False, False
    for paragraph in re.split(r"\n\s*\n", source):
        if paragraph.startswith("="):
            command, _, argument = paragraph[1:].partition(" ")
            command = command.strip()
            in_pod = command != "cut"
            in_begin = command == "begin" or (in_begin and command != "end")
            if command.startswith("head") or command == "item":
                argument = argument.strip()
                if not re.fullmatch(r"[\d.*]*", argument):  # bullets and item numbers alone are no text
                    kept += [pod_inline(argument), ""]
            continue
        if not in_pod or in_begin or paragraph[:1] in (" ", "\t"):
            continue
        kept += [pod_inline(paragraph), ""]
    return join_paragraphs("\n".join(kept).splitlines())


# ----------------------------------------------------------------------------------------------------------------
# Readers: installed package files -> documents


def read_text_file(path: Path) -> str:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    return raw.decode("utf-8", errors="replace")


def files_under(root: Path, patterns: Iterable[str], subfolders: Iterable[str] = ("",)) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not installed")
    return sorted({p for folder in subfolders for pattern in patterns for p in (root / folder).rglob(pattern)})


def html_documents(source: str, root: str, patterns=("*.html",), subfolders=("",)) -> Iterator[Document]:
    for path in files_under(Path(root), patterns, subfolders):
        title, text = clean_html(read_text_file(path))
        relative = path.relative_to(root).as_posix()
        yield Document(source, f"{source}/{relative}", title or relative, text)


def rst_documents(source: str, root: str, patterns: Iterable[str], subfolders=("",)) -> Iterator[Document]:
    for path in files_under(Path(root), patterns, subfolders):
        text = clean_rst(read_text_file(path))
        relative = path.relative_to(root).as_posix()
        title = text.split("\n", 1)[0][:120]
        yield Document(source, f"{source}/{relative}", title, text)


def pod_documents(source: str, root: str) -> Iterator[Document]:
    """One document per manual page; the perl*delta release notes (lists of changes) are left out."""
    for path in files_under(Path(root), ["*.pod"]):
        if re.fullmatch(r"perl\d*delta", path.stem):
            continue
        text = clean_pod(read_text_file(path))
        yield Document(source, f"{source}/{path.name}", path.stem, text)


BIBLE_VERSE = re.compile(r"^\s+\d+ (.*)$")


def kjv_documents(bible: str = "bible") -> Iterator[Document]:
    """One document per chapter of the King James Bible, printed by the `bible` program of Debian's bible-kjv."""
    printed = subprocess.run([bible, "-l100000", "Gen1:1-Rev22:21"], check=True, capture_output=True, text=True)
    chapters: list[tuple[str, list[str]]] = []
    for line in printed.stdout.splitlines():
        verse = BIBLE_VERSE.match(line)
        if verse:
            chapters[-1][1].append(verse.group(1).strip())
        elif line.strip():
            chapters.append((line.strip(), []))
    if len(chapters) != 1189:
        raise RuntimeError(f"expected the 1189 chapters of the KJV from `{bible}`, read {len(chapters)}")
    for title, verses in chapters:
        yield Document("kjv", f"kjv/{title}", title, " ".join(verses))


SWORD_ENTRY = re.compile(r"^((?:[1-3] )?[A-Z][A-Za-z ]*?) (\d+):(\d+): ?(.*)$")


def sword_chapters(printed: str) -> list[tuple[str, list[str]]]:
    """("Book chapter", its distinct entries in order) from diatheke's plain output of a commentary.

    diatheke prints an entry that covers a range of verses once for every verse of the range, and continues an
    entry on lines that carry no reference; the module name closes the output in parentheses."""
    chapters: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in printed.splitlines():
        entry = SWORD_ENTRY.match(line)
        if entry:
            current = [entry.group(4)]
            chapters.setdefault(f"{entry.group(1)} {entry.group(2)}", []).append(current)
        elif current is not None and not re.fullmatch(r"\(\w+\)", line.strip()):
            current.append(line)
    result = []
    for chapter, entries in chapters.items():
        # plain output marks emphasis and headings with asterisks
        texts = [join_paragraphs(line.replace("*", "") for line in lines) for lines in entries]
        result.append((chapter, list(dict.fromkeys(t for t in texts if t))))
    return result


def sword_documents(source: str, module: str, keys: str) -> Iterator[Document]:
    printed = subprocess.run(["diatheke", "-b", module, "-f", "plain", "-k", keys], capture_output=True, text=True)
    if printed.returncode != 0 or not printed.stdout.strip():
        raise RuntimeError(f"diatheke printed nothing for module {module} (apt-get install diatheke): {printed}")
    for chapter, entries in sword_chapters(printed.stdout):
        yield Document(source, f"{source}/{chapter}", chapter, "\n\n".join(entries))


LINUX_PROSE_FOLDERS = (
    "admin-guide",
    "process",
    "doc-guide",
    "kernel-hacking",
    "dev-tools",
    "core-api",
    "mm",
    "RCU",
    "locking",
    "scheduler",
    "security",
    "filesystems",
    "networking",
    "trace",
)

SOURCES = (
    Source(
        "kjv",
        Package("bible-kjv-text", "public domain", "The copyright for the King James Version text of the Bible is"),
        "King James Version of the Bible (1611), one document per chapter",
        kjv_documents,
    ),
    Source(
        "treasury-david",
        Package("sword-comm-tdavid", "public domain", "It is now in the public domain."),
        "C. H. Spurgeon, The Treasury of David (1869-1885), commentary on the Psalms, one document per psalm",
        lambda: sword_documents("treasury-david", "TDavid", "Psalms 1:1-Psalms 150:6"),
    ),
    Source(
        "debian-handbook",
        Package("debian-handbook", "GPL-2.0+ or CC-BY-SA-3.0", "License: GPL-2.0+ or CC-BY-SA-3.0"),
        "The Debian Administrator's Handbook (Debian 11), English HTML, one document per page",
        lambda: html_documents("debian-handbook", "/usr/share/doc/debian-handbook/html/en-US"),
    ),
    Source(
        "debian-reference",
        Package("debian-reference-en", "GPL-2+", "License: GPL-2+"),
        "Debian Reference (English HTML), one document per chapter",
        lambda: html_documents("debian-reference", "/usr/share/debian-reference", ["*.en.html"]),
    ),
    Source(
        "maint-guide",
        Package("maint-guide", "GPL-2.0+", "License:   GPL-2.0+"),
        "Debian New Maintainers' Guide (English HTML), one document per chapter",
        lambda: html_documents("maint-guide", "/usr/share/doc/maint-guide/html", ["*.en.html"]),
    ),
    Source(
        "developers-reference",
        Package("developers-reference", "GPL-2", "License: GPL-2"),
        "Debian Developer's Reference (reST sources), one document per chapter",
        lambda: rst_documents("developers-reference", "/usr/share/developers-reference/_sources", ["*.rst.txt"]),
    ),
    Source(
        "debian-policy",
        Package("debian-policy", "GPL-2+", "License: GPL-2+"),
        "Debian Policy Manual (reST sources), one document per chapter or appendix",
        lambda: rst_documents("debian-policy", "/usr/share/doc/debian-policy/policy.html/_sources", ["*.rst.txt"]),
    ),
    Source(
        "python-docs",
        Package(
            "python3.11-doc",
            "PSF-2.0 (Python Software Foundation License Version 2)",
            "PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2",
        ),
        "Python 3.11 documentation (tutorial, library, reference, HOWTOs), reST sources, one document per page",
        lambda: rst_documents("python-docs", "/usr/share/doc/python3.11/html/_sources", ["*.rst.txt"]),
    ),
    Source(
        "postgresql-docs",
        Package("postgresql-doc-15", "PostgreSQL", "License: PostgreSQL"),
        "PostgreSQL 15 manual (HTML), one document per page",
        lambda: html_documents("postgresql-docs", "/usr/share/doc/postgresql-doc-15/html"),
    ),
    Source(
        "linux-docs",
        Package(
            "linux-doc-6.1",
            "GPL-2",
            "Files: *\nCopyright: 1991-2012 Linus Torvalds and many others\nLicense: GPL-2",
        ),
        "Linux 6.1 kernel Documentation, reST, prose-heavy folders: " + ", ".join(LINUX_PROSE_FOLDERS),
        lambda: rst_documents(
            "linux-docs", "/usr/share/doc/linux-doc-6.1/Documentation", ["*.rst", "*.rst.gz"], LINUX_PROSE_FOLDERS
        ),
    ),
    Source(
        "git-docs",
        Package("git-doc", "GPL-2", "License: GPL-2"),
        "Git manual pages, user manual, how-tos and technical notes (HTML), one document per page",
        lambda: html_documents("git-docs", "/usr/share/doc/git-doc"),
    ),
    Source(
        "perl-docs",
        Package("perl-doc", "GPL-1+ or Artistic", "License: GPL-1+ or Artistic"),
        "Perl 5.36 manual (perlintro, perlfaq, perlsyn, ...), POD, one document per page",
        lambda: pod_documents("perl-docs", "/usr/share/perl/5.36.0/pod"),
    ),
)

# ----------------------------------------------------------------------------------------------------------------
# Split, deduplication, counting, manifest


def is_validation(doc_id: str, every: int) -> bool:
    return int(hashlib.sha256(doc_id.encode()).hexdigest(), 16) % every == 0


def mixed_order(documents: Iterable[Document]) -> list[Document]:
    """The documents in the order the files hold them: by sha256 of "order:" + their id, a fixed pseudo-random
    permutation that interleaves the sources. Pretraining reads a file front to back (with data.shuffle_buffer 0)
    and evaluates on its first batches, so in source order a run of a million tokens would see only the Bible
    and be scored on the Bible alone; in this order every prefix of either file is a sample of all sources."""
    return sorted(documents, key=lambda doc: hashlib.sha256(f"order:{doc.doc_id}".encode()).digest())


def select_documents(documents: Iterable[Document], min_chars: int) -> tuple[list[Document], dict[str, dict]]:
    """Documents of at least `min_chars` characters whose text was not seen before, with what was dropped."""
    documents = list(documents)
    ids = Counter(doc.doc_id for doc in documents)
    repeated = sorted(doc_id for doc_id, n in ids.items() if n > 1)
    if repeated:
        raise ValueError(f"document ids must be unique (the split hashes them); repeated: {repeated[:5]}")
    kept, seen = [], set()
    dropped: dict[str, dict] = {}
    for doc in documents:
        counts = dropped.setdefault(doc.source, {"short": 0, "duplicate": 0})
        digest = hashlib.sha256(doc.text.encode()).digest()
        if len(doc.text) < min_chars:
            counts["short"] += 1
        elif digest in seen:
            counts["duplicate"] += 1
        else:
            seen.add(digest)
            kept.append(doc)
    return kept, dropped


def count_tokens(texts: list[str], tokenizer, batch_size: int = 64) -> list[int]:
    """Tokens each text takes in the packed stream: its ids without special tokens, plus the EOS packing adds.

    `tokenizer` is a fast tokenizer's Rust backend (`tokenizers.Tokenizer`): its encode_batch_fast skips the
    offsets and Python lists that a transformers tokenizer call builds, which took most of the time here."""
    counts = []
    for start in range(0, len(texts), batch_size):
        encodings = tokenizer.encode_batch_fast(texts[start : start + batch_size], add_special_tokens=False)
        counts += [len(encoding) + 1 for encoding in encodings]
    return counts


def write_jsonl(path: Path, documents: Iterable[Document]) -> str:
    """Writes one {"text", "title", "source"} object a line; returns the file's sha256."""
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for doc in documents:
            line = (
                json.dumps({"text": doc.text, "title": doc.title, "source": doc.source}, ensure_ascii=False) + "\n"
            ).encode()
            f.write(line)
            digest.update(line)
    return digest.hexdigest()


def build_manifest(
    documents: list[Document],
    tokens: list[int],
    validation_every: int,
    min_chars: int,
    dropped: dict[str, dict],
    sources: dict[str, dict],
    file_sha256: dict[str, str],
) -> dict:
    """Per source and per split: documents and tokens; per file: sha256, documents and tokens; the total."""
    per_source = {name: dict(info) for name, info in sources.items()}
    for info in per_source.values():
        info["documents"] = dict.fromkeys(SPLITS, 0)
        info["tokens"] = dict.fromkeys(SPLITS, 0)
    files = {split: {"documents": 0, "tokens": 0} for split in SPLITS}
    for doc, n in zip(documents, tokens, strict=True):
        split = "validation" if is_validation(doc.doc_id, validation_every) else "train"
        per_source[doc.source]["documents"][split] += 1
        per_source[doc.source]["tokens"][split] += n
        files[split]["documents"] += 1
        files[split]["tokens"] += n
    for name, info in per_source.items():
        info["dropped"] = dropped.get(name, {"short": 0, "duplicate": 0})
    return {
        "tokenizer": "builtin (hf_sparse_ift/builtin/tokenizer, 4096-token BPE)",
        "token_count": "per document: its ids without special tokens plus the EOS that packing appends",
        "split": f"by document: validation when int(sha256(document id)) % {validation_every} == 0, else train",
        "min_chars": min_chars,
        "deduplication": "exact duplicate texts kept once (the first in source order, then document id)",
        "order": "documents in both files sorted by sha256('order:' + document id): the sources interleaved, so "
        "that a run reading a prefix of train and evaluating on a prefix of validation sees every source",
        "sources": per_source,
        "files": {f"{split}.jsonl": {"sha256": file_sha256[split], **files[split]} for split in SPLITS},
        "total_tokens": sum(tokens),
    }


def package_info(package: Package) -> dict:
    """Version and licence of an installed package, the licence checked against its copyright file."""
    version = subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", package.name], capture_output=True, text=True
    ).stdout.strip()
    copyright_file = Path("/usr/share/doc") / package.name / "copyright"
    if not version or not copyright_file.exists():
        raise FileNotFoundError(f"package {package.name} is not installed (see this script's docstring)")
    if package.evidence not in copyright_file.read_text(errors="replace"):
        raise ValueError(f"{copyright_file} does not contain {package.evidence!r}: check the licence of {package.name}")
    return {
        "package": package.name,
        "version": version,
        "licence": package.licence,
        "copyright_file": str(copyright_file),
        "licence_evidence": package.evidence,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/english", help="folder for train.jsonl, validation.jsonl, manifest.json")
    parser.add_argument("--sources", default=",".join(s.name for s in SOURCES), help="comma-separated source names")
    parser.add_argument("--validation-every", type=int, default=20, help="1 document in N goes to validation")
    parser.add_argument("--min-chars", type=int, default=500, help="drop documents shorter than this")
    args = parser.parse_args(argv)
    by_name = {s.name: s for s in SOURCES}
    chosen = [name.strip() for name in args.sources.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in by_name]
    if unknown or not chosen:
        parser.error(f"--sources: unknown {unknown or 'empty list'}; valid: {', '.join(by_name)}")
    if args.validation_every < 2:
        parser.error(f"--validation-every must be >= 2 (got {args.validation_every})")
    if args.min_chars < 0:
        parser.error(f"--min-chars must be >= 0 (got {args.min_chars})")
    started = time.perf_counter()
    # Every package is checked before any text is read or anything is written.
    sources = {
        name: {"description": by_name[name].description, **package_info(by_name[name].package)} for name in chosen
    }
    documents = []
    for name in chosen:
        read = sorted(by_name[name].read(), key=lambda doc: doc.doc_id)
        print(f"{name}: {len(read)} documents read ({time.perf_counter() - started:.0f} s)", flush=True)
        documents += read
    documents, dropped = select_documents(documents, args.min_chars)

    from hf_sparse_ift.data.pipeline import load_tokenizer

    tokens = count_tokens([doc.text for doc in documents], load_tokenizer("builtin").backend_tokenizer)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    file_sha256 = {
        split: write_jsonl(
            out / f"{split}.jsonl",
            (
                doc
                for doc in mixed_order(documents)
                if is_validation(doc.doc_id, args.validation_every) == (split == "validation")
            ),
        )
        for split in SPLITS
    }
    manifest = build_manifest(documents, tokens, args.validation_every, args.min_chars, dropped, sources, file_sha256)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    for name, info in manifest["sources"].items():
        print(f"{name:18s} documents {info['documents']}  tokens {info['tokens']}  dropped {info['dropped']}")
    print(f"total tokens {manifest['total_tokens']:,}; files {manifest['files']}")
    print(f"wall time {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
