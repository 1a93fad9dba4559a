"""The documentation site builds with `mkdocs build --strict`, every page is in the navigation of every page, the
results pages hold their results files, and the API reference documents the public names."""

import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from test_docs_code import ROOT, documents

import hf_sparse_ift


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.nav_links, self.ids, self._nav_depth = set(), set(), 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "nav" and "md-nav--primary" in (attrs.get("class") or ""):
            self._nav_depth = 1
        elif tag == "nav" and self._nav_depth:
            self._nav_depth += 1
        if tag == "a" and self._nav_depth and attrs.get("href"):
            self.nav_links.add(attrs["href"].split("#")[0])

    def handle_endtag(self, tag):
        if tag == "nav" and self._nav_depth:
            self._nav_depth -= 1


def _parse(page: Path) -> _Links:
    links = _Links()
    links.feed(page.read_text())
    return links


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={"NO_MKDOCS_2_WARNING": "1", "PATH": str(Path(sys.executable).parent)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _page_html(md: Path) -> str:
    return str(md.relative_to(ROOT / "docs").with_suffix(".html"))


def test_every_page_is_built_and_in_the_navigation_of_every_page(site):
    pages = [_page_html(md) for md in documents()[1:]]
    built = sorted(str(p.relative_to(site)) for p in site.rglob("*.html") if p.name != "404.html")
    assert sorted(pages) == built  # no page outside the navigation, none missing
    for page in pages:
        folder = os.path.dirname(page)
        links = {os.path.normpath(os.path.join(folder, href)) for href in _parse(site / page).nav_links}
        missing = {p for p in pages if p != page and p not in links}
        assert not missing, f"{page}'s navigation lacks {missing}"


def test_results_pages_include_their_results_files(site):
    for page, source in [
        ("results/study-cpu-20tpp.html", ROOT / "docs/study-cpu-20tpp/results.md"),
        ("results/study-cpu-small.html", ROOT / "docs/study-cpu-small/results.md"),
        ("results/performance.html", ROOT / "benchmarks/results/NVIDIA-H100-80GB-HBM3-2026-11-23.md"),
    ]:
        html = (site / page).read_text()
        # The verdict's or the table's first data row, as the results file has it (markdown markup aside).
        row = next(line for line in source.read_text().splitlines() if line.startswith("| ") and "---" not in line)
        first_cell = row.split("|")[1].strip().strip("*")
        assert first_cell in html, f"{page} does not show {source.name}'s table"
        assert "<!-- results:" not in html  # the hook replaced the marker


def test_api_reference_documents_the_public_names(site):
    ids = _parse(site / "api.html").ids
    # The names `hf_sparse_ift` exports, under the module that defines each, and the functions the pages name.
    public = [name for name in hf_sparse_ift.__all__ if name[0].isupper()]
    more = [
        "export_gpt2",
        "import_gpt2",
        "sparse_wide_to_gpt2",
        "gpt2_to_sparse_wide",
        "DSTEngine",
        "DSTConfig",
        "DSTMethod",
        "DropGrowMethod",
        "pretrain",
        "load_pretrain_config",
        "to_masked_model",
        "convert_checkpoint",
        "calibrate_sparsity",
        "evaluate",
        "perplexity",
        "compare",
    ]
    missing = [
        name
        for name in public + more
        if not any(i.startswith("hf_sparse_ift.") and i.endswith("." + name) for i in ids)
    ]
    assert not missing
    html = (site / "api.html").read_text()
    assert re.search(r"sparsity_block", html)  # the config's docstring (its arguments) is rendered


def test_the_readmes_links_point_to_files_that_exist():
    # mkdocs checks the pages' links; the README is not a page of the site, so its links are checked here.
    readme = (ROOT / "README.md").read_text()
    targets = [t.split("#")[0] for t in re.findall(r"\]\(([^)]+)\)", readme) if "://" not in t]
    assert targets and not [t for t in targets if not (ROOT / t).is_file()]
    assert len(readme.encode()) <= 12_000
