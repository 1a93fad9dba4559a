"""scripts/make_english_corpus.py: its cleaners, split and manifest on tiny inputs made here (no Debian package needed)."""

import gzip
import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "make_english_corpus.py"
spec = importlib.util.spec_from_file_location("make_english_corpus", SCRIPT)
corpus = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = corpus  # dataclasses look their module up there
spec.loader.exec_module(corpus)


def test_clean_html_keeps_the_article_and_drops_navigation_code_and_tables():
    page = """<html><head><title>Chapter 6. The  APT Tools</title><style>p {}</style></head><body>
    <div id="banner">Download the ebook</div><ul class="docnav"><li>Prev</li><li>Next</li></ul>
    <div class="chapter"><h1>Chapter 6. The APT Tools</h1><div class="toc"><dl><dt>6.1 Sources</dt></dl></div>
    <div class="para">APT reads the
      <code class="filename">sources.list</code> file&nbsp;first.<br/>Then it updates.</div>
    <pre class="programlisting">deb http://deb.debian.org/debian bookworm main</pre>
    <table><tr><td>apt</td><td>front end</td></tr></table>
    <ul><li>one item</li><li>another item</li></ul><img src="x.png"></div>
    <script>var x = "<p>no</p>";</script><div class="navfooter">Up</div></body></html>"""
    title, text = corpus.clean_html(page)
    assert title == "Chapter 6. The APT Tools"
    assert text == (
        "Chapter 6. The APT Tools\n\nAPT reads the sources.list file first.\n\nThen it updates.\n\n"
        "one item\n\nanother item"
    )


def test_clean_rst_keeps_prose_and_drops_code_tables_comments_and_markup():
    source = """.. SPDX-License-Identifier: GPL-2.0
.. _intro:

=============
Introduction
=============

:synopsis: not prose

The :func:`~os.path.join` function and :ref:`the tutorial <tut>` use
``literal text`` and *emphasis* and **strong** words [#]_ with `a link <https://x.org>`_.
Run it like this::

    $ python -c 'print(1)'

.. code-block:: python

   print("dropped")

.. note:: Keep this note.

   And its body.

.. function:: open(file)

   Open *file* and return a file object.

+-----+-----+
| a   | b   |
+-----+-----+

* first item
  wraps here
* second item
"""
    assert corpus.clean_rst(source) == (
        "Introduction\n\n"
        "The join function and the tutorial use literal text and emphasis and strong words with a link. "
        "Run it like this:\n\n"
        "Keep this note.\n\nAnd its body.\n\nOpen file and return a file object.\n\n"
        "* first item wraps here\n* second item"
    )


def test_clean_pod_keeps_headings_and_paragraphs_and_drops_verbatim_and_commands():
    source = """=head1 NAME

perlintro - a brief introduction

=head1 DESCRIPTION

Perl is B<fun>: see C<< $x->y >>, L<perlsyn/"For Loops">, L<the FAQ|perlfaq> and
L<https://perl.org>; E<lt>tagE<gt>X<index entry>.

    my $dropped = "verbatim code";

=over 4

=item 1.

=item *

Listed text.

=back

=begin html

<p>dropped</p>

=end html

=cut

sub not_documentation { }
"""
    assert corpus.clean_pod(source) == (
        "NAME\n\nperlintro - a brief introduction\n\nDESCRIPTION\n\n"
        'Perl is fun: see $x->y, "For Loops" in perlsyn, the FAQ and https://perl.org; <tag>.\n\n'
        "Listed text."
    )


def test_sword_chapters_group_entries_by_chapter_once_each():
    printed = (
        "Genesis 1:1: \n"
        "Genesis 1:2:  * Verses 1-2 *    God said, Let there be light.\n"
        "Genesis 1:3:  * Verses 1-2 *    God said, Let there be light.\n"
        "Genesis 1:4: The light was good;\n"
        "    and it was divided.\n"
        "1 Samuel 2:1: Hannah prayed.\n"
        "(TDavid)\n"
    )
    assert corpus.sword_chapters(printed) == [
        ("Genesis 1", ["Verses 1-2 God said, Let there be light.", "The light was good; and it was divided."]),
        ("1 Samuel 2", ["Hannah prayed."]),
    ]


def test_rst_documents_reads_plain_and_gzipped_files_of_the_chosen_folders_only(tmp_path):
    for folder, name in (("process", "a.rst.gz"), ("mm", "b.rst"), ("translations", "c.rst")):
        (tmp_path / folder).mkdir()
        text = f"Title {name}\n{'=' * 12}\n\nProse of {name}.\n"
        data = gzip.compress(text.encode()) if name.endswith(".gz") else text.encode()
        (tmp_path / folder / name).write_bytes(data)
    docs = list(corpus.rst_documents("linux-docs", tmp_path, ["*.rst", "*.rst.gz"], ("process", "mm")))
    assert docs == [
        corpus.Document("linux-docs", "linux-docs/mm/b.rst", "Title b.rst", "Title b.rst\n\nProse of b.rst."),
        corpus.Document(
            "linux-docs", "linux-docs/process/a.rst.gz", "Title a.rst.gz", "Title a.rst.gz\n\nProse of a.rst.gz."
        ),
    ]


def test_split_is_a_fixed_function_of_the_document_id():
    ids = [f"kjv/Genesis {chapter}" for chapter in range(1, 101)]
    # sha256 is the same on every machine, so these two stay in validation whatever else is in the corpus
    assert [doc_id for doc_id in ids if corpus.is_validation(doc_id, 20)] == ["kjv/Genesis 62", "kjv/Genesis 83"]
    assert [doc_id for doc_id in ids if corpus.is_validation(doc_id, 10)] == [
        doc_id for doc_id in ids if int(hashlib.sha256(doc_id.encode()).hexdigest(), 16) % 10 == 0
    ]


def test_files_interleave_the_sources_in_a_fixed_order():
    docs = [corpus.Document(source, f"{source}/{i}", str(i), "text") for source in ("a", "b") for i in range(50)]
    mixed = corpus.mixed_order(docs)
    assert sorted(doc.doc_id for doc in mixed) == sorted(doc.doc_id for doc in docs)
    # a prefix (what a short run reads) holds both sources, in an order that does not depend on the input order
    assert {doc.source for doc in mixed[:10]} == {"a", "b"}
    assert [doc.doc_id for doc in corpus.mixed_order(reversed(docs))] == [doc.doc_id for doc in mixed]
    assert [doc.doc_id for doc in mixed[:3]] == ["a/14", "b/39", "a/46"]


def test_select_documents_drops_short_texts_and_exact_duplicates():
    docs = [
        corpus.Document("a", "a/1", "one", "x" * 20),
        corpus.Document("a", "a/2", "two", "short"),
        corpus.Document("b", "b/1", "copy", "x" * 20),
        corpus.Document("b", "b/2", "three", "y" * 20),
    ]
    kept, dropped = corpus.select_documents(docs, min_chars=10)
    assert [doc.doc_id for doc in kept] == ["a/1", "b/2"]
    assert dropped == {"a": {"short": 1, "duplicate": 0}, "b": {"short": 0, "duplicate": 1}}
    with pytest.raises(ValueError, match=r"document ids must be unique .*repeated: \['a/1'\]"):
        corpus.select_documents([*docs, corpus.Document("c", "a/1", "other", "z" * 20)], min_chars=10)


def test_count_tokens_adds_one_eos_per_document_across_batches():
    class WhitespaceTokenizer:
        def encode_batch_fast(self, texts, add_special_tokens):
            assert add_special_tokens is False
            return [text.split() for text in texts]

    texts = ["a b c", "d", "e f", "g h i j", "k"]
    assert corpus.count_tokens(texts, WhitespaceTokenizer(), batch_size=2) == [4, 2, 3, 5, 2]


def test_main_writes_disjoint_splits_and_a_manifest_that_matches_them(tmp_path, monkeypatch):
    from hf_sparse_ift.data.pipeline import load_tokenizer

    texts = {
        f"toy/page{i:03d}": f"Page {i} says that the quick brown fox jumps over the lazy dog. " * 3 for i in range(60)
    }
    texts["toy/page999"] = texts["toy/page000"]  # an exact duplicate, kept once
    texts["toy/tiny"] = "too short"
    documents = [corpus.Document("toy", doc_id, doc_id.split("/")[1], text) for doc_id, text in texts.items()]
    toy_package = corpus.Package("toy-doc", "public domain", "no copyright")
    monkeypatch.setattr(corpus, "SOURCES", (corpus.Source("toy", toy_package, "toy pages", lambda: iter(documents)),))
    # CI has no Debian packages: stand in for dpkg and the copyright file
    monkeypatch.setattr(corpus, "package_info", lambda package: {"package": package.name, "version": "1.0-1"})
    out = tmp_path / "english"
    assert corpus.main(["--out", str(out), "--min-chars", "100"]) == 0

    rows = {
        split: [json.loads(line) for line in (out / f"{split}.jsonl").read_text().splitlines()]
        for split in ("train", "validation")
    }
    titles = {split: {row["title"] for row in split_rows} for split, split_rows in rows.items()}
    for split, split_rows in rows.items():  # the files hold their documents in the mixed order
        expected = [doc.title for doc in corpus.mixed_order(documents) if doc.title in titles[split]]
        assert [row["title"] for row in split_rows] == expected
    expected_validation = {f"page{i:03d}" for i in range(60) if corpus.is_validation(f"toy/page{i:03d}", 20)}
    assert titles["validation"] == expected_validation
    assert len(expected_validation) == 6
    assert titles["train"] == {f"page{i:03d}" for i in range(60)} - expected_validation
    assert all(set(row) == {"text", "title", "source"} and row["source"] == "toy" for r in rows.values() for row in r)

    manifest = json.loads((out / "manifest.json").read_text())
    tokenizer = load_tokenizer("builtin")
    tokens = {
        split: sum(len(tokenizer(row["text"], add_special_tokens=False)["input_ids"]) + 1 for row in split_rows)
        for split, split_rows in rows.items()
    }
    for split in ("train", "validation"):
        entry = manifest["files"][f"{split}.jsonl"]
        assert entry["sha256"] == hashlib.sha256((out / f"{split}.jsonl").read_bytes()).hexdigest()
        assert entry["documents"] == len(rows[split])
        assert entry["tokens"] == tokens[split]
    toy = manifest["sources"]["toy"]
    assert toy["documents"] == {split: len(rows[split]) for split in ("train", "validation")}
    assert toy["tokens"] == tokens
    assert toy["dropped"] == {"short": 1, "duplicate": 1}
    assert (toy["description"], toy["package"], toy["version"]) == ("toy pages", "toy-doc", "1.0-1")
    assert manifest["total_tokens"] == tokens["train"] + tokens["validation"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--sources", "kjv,nope"], "unknown ['nope']"),
        (["--validation-every", "1"], "--validation-every must be >= 2 (got 1)"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit):
        corpus.main(["--out", str(tmp_path / "out"), *argv])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
