"""Every code block of the README and the documentation pages runs, or carries a mark saying why it cannot here.

A mark is an HTML comment on the line just above the fence (invisible on the rendered page):

    <!-- docs-test: skip network: <why> -->   needs the network (the Hub, the package index)
    <!-- docs-test: skip gpu: <why> -->       needs a GPU
    <!-- docs-test: skip long: <why> -->      takes minutes or more; the reason names what covers it instead
    <!-- docs-test: fast -->                  runs with `FAST` below appended to each `hf-sparse-ift pretrain`

`python` and `bash` blocks without a skip mark run; a block without a language (command output) is not code. The
blocks run in order, README first, then the pages in the site's navigation, in one working folder, so a later
block reads what an earlier one wrote (the quick start's checkpoint). The python blocks of one page are one script
(one namespace, as a reader runs them). Because a fast `pretrain` stops at step `FAST_STEPS`, `checkpoint-600` in
any block reads `checkpoint-<FAST_STEPS>`. A block identical to one already run is not run again.
"""

import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MARK = re.compile(r"^<!--\s*docs-test:\s*(.*?)\s*-->$")
FENCE = re.compile(r"^```(\w*)\s*$")
SKIP = re.compile(r"^skip (network|gpu|long):\s*(\S.*)$")
RUN_LANGUAGES = ("python", "bash")
FAST_STEPS = 2
FAST = (
    "model.n_layer=1 model.dense_hidden_size=16 model.dense_intermediate_size=64 model.n_head=1 data.seq_len=16 "
    f"train.global_batch_size=2 train.micro_batch_size=2 train.max_steps={FAST_STEPS} train.eval_interval=2 "
    "train.eval_batches=1 train.checkpoint_interval=2 train.log_interval=1 train.trackers=[] "
    "train.progress_bar=false dst.update_interval=1"
)


def nav_pages(nav) -> list[str]:
    pages = []
    for entry in nav:
        value = entry if isinstance(entry, str) else next(iter(entry.values()))
        pages += nav_pages(value) if isinstance(value, list) else [value]
    return pages


def documents() -> list[Path]:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text().replace("!!python", "#"))
    return [ROOT / "README.md"] + [ROOT / "docs" / page for page in nav_pages(config["nav"])]


def code_blocks(path: Path) -> list[dict]:
    """Every top-level fenced block: language, text, mark (None when unmarked) and line."""
    blocks, lines, i = [], path.read_text().splitlines(), 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        start = i
        i += 1
        while not lines[i].startswith("```"):
            i += 1
        mark = MARK.match(lines[start - 1]) if start else None
        blocks.append(
            {
                "language": fence.group(1),
                "text": "\n".join(lines[start + 1 : i]) + "\n",
                "mark": mark.group(1) if mark else None,
                "where": f"{path.name}:{start + 1}",
            }
        )
        i += 1
    return blocks


def check_mark(block: dict) -> str | None:
    """'skip', 'fast' or None (runs as written); a mark that says nothing valid fails the test."""
    mark = block["mark"]
    if mark is None:
        return None
    if mark == "fast":
        assert block["language"] == "bash", f"{block['where']}: 'fast' applies to bash blocks"
        return "fast"
    assert SKIP.match(mark), (
        f"{block['where']}: mark {mark!r} is not 'fast' or 'skip network|gpu|long: <reason>' (a reason is required)"
    )
    return "skip"


def test_every_block_is_marked_validly_and_every_runnable_one_is_python_or_bash():
    for path in documents():
        for block in code_blocks(path):
            kind = check_mark(block)
            if kind != "skip" and block["language"]:
                assert block["language"] in RUN_LANGUAGES, (
                    f"{block['where']}: a {block['language']!r} block must be python or bash, or carry a skip mark"
                )


def _session(tmp: Path) -> dict:
    for name in ("configs", "scripts", "benchmarks", "hf_sparse_ift"):
        (tmp / name).symlink_to(ROOT / name)
    bin_dir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "PATH": bin_dir + os.pathsep + os.environ["PATH"],
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(tmp / "hf_home"),
        "HF_SPARSE_IFT_CACHE": str(tmp / "cache"),
        "TRANSFORMERS_VERBOSITY": "error",
        "OMP_NUM_THREADS": "2",
    }


def _as_run(block: dict, kind: str | None) -> str:
    text = block["text"].replace("checkpoint-600", f"checkpoint-{FAST_STEPS}")
    if kind == "fast":
        text = re.sub(r"^(hf-sparse-ift pretrain\b[^#\n]*?)\s*(#.*)?$", rf"\1 {FAST}", text, flags=re.M)
    return text


def _run(command: list[str], where: str, cwd: Path, env: dict) -> None:
    start, cpu = time.perf_counter(), _children_cpu()
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{where} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    print(f"{where}: {time.perf_counter() - start:.1f} s wall, {_children_cpu() - cpu:.1f} s CPU")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# Runs each page's python script in a namespace of its own, in one process (one import of torch for all pages).
RUNNER = """
import sys, traceback
for name, source in SCRIPTS:
    try:
        exec(compile(source, name, "exec"), {"__name__": "__main__"})
    except BaseException:
        traceback.print_exc()
        sys.exit(f"{name} failed")
"""


def run_documents(paths: list[Path], cwd: Path, env: dict) -> None:
    """Run the blocks that are not skipped: bash blocks one by one in order, then every page's python blocks (one
    script per page, in order) in one process."""
    scripts, seen = [], set()
    for path in paths:
        python = []
        for block in code_blocks(path):
            kind = check_mark(block)
            if kind == "skip" or block["language"] not in RUN_LANGUAGES:
                continue
            text = _as_run(block, kind)
            if text in seen:
                continue
            seen.add(text)
            if block["language"] == "python":
                python.append(f"# {block['where']}\n{text}")
            else:
                _run(["bash", "-euo", "pipefail", "-c", text], block["where"], cwd, env)
        if python:
            scripts.append((f"{path.name} (python blocks)", "\n".join(python)))
    if scripts:
        _run([sys.executable, "-c", f"SCRIPTS = {scripts!r}\n{RUNNER}"], "the python blocks", cwd, env)


def test_every_unmarked_block_runs(tmp_path):
    run_documents(documents(), tmp_path, _session(tmp_path))


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("```bash\nfalse\n```\n", "failed (1)"),  # an unmarked block that fails fails the test
        ("```python\nraise ValueError(3)\n```\n", "page.md (python blocks) failed"),
        ("<!-- docs-test: skip long -->\n```bash\nfalse\n```\n", "a reason is required"),
        ("<!-- docs-test: skip later: soon -->\n```bash\nfalse\n```\n", "is not 'fast' or 'skip"),
    ],
)
def test_a_failing_or_badly_marked_block_fails(tmp_path, text, error):
    page = tmp_path / "page.md"
    page.write_text("# A page\n\n" + text)
    with pytest.raises(AssertionError, match=re.escape(error)):
        run_documents([page], tmp_path, dict(os.environ))
