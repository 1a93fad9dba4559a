"""Bytes and load time of compressed (``bitmask-values-v1``) vs plain Sparse Wide checkpoints.

    python benchmarks/compressed_checkpoints.py                        # GPT-3 Small SW-50, SW-75, SW-90 in bf16
    python benchmarks/compressed_checkpoints.py --smoke                # tiny shapes, seconds (CI)

Per preset: a model with uniform random masks (1% of its active weights set to exactly 0, as DST regrows them) is
saved with ``save_pretrained`` in both layouts. Reported: the whole checkpoint folder's bytes, the sparse matrices'
bytes (plain: weight + bool mask; compressed: mask bits + active values + shape), ``from_pretrained`` wall time (the
same dtype as saved; each layout loaded once untimed so both read from the page cache, then alternated, median of
--repeats), and the time until every weight is resident in memory (``from_pretrained`` then one read per 4 KiB page of
every tensor). The second matters because safetensors memory-maps the plain layout: its ``from_pretrained`` returns
before the weights are read, and the first forward pass pays for it; the compressed layout is decoded into memory
during ``from_pretrained``. Both are measured warm (files in the page cache) and cold (this checkpoint's files evicted
from the page cache with ``posix_fadvise(DONTNEED)`` before each load; other files' caches are untouched). Every compressed load is checked bit for bit against the saved model: every weight (inactive
ones are +0.0), every mask bit, active zeros included. Decoding runs in numpy inside transformers' loader (the
checkpoint conversion of `sparse_safetensors.py`); no compiler and no native code are involved. Writes
``<out>/<cpu>-<date>-compressed.json`` and ``.md``, with the machine, versions, command and commit.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import safetensors
import torch
import transformers
from safetensors import safe_open

from hf_sparse_ift import SparseWideGPTForCausalLM
from hf_sparse_ift.models.sparse_wide_gpt.sparse_safetensors import MASK_SUFFIX, SHAPE_SUFFIX, VALUES_SUFFIX
from hf_sparse_ift.resources import model_config
from hf_sparse_ift.sparsity.masks import sparse_layers

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_files

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def build(preset: str, dtype: torch.dtype, overrides: dict) -> SparseWideGPTForCausalLM:
    torch.manual_seed(0)
    model = SparseWideGPTForCausalLM._from_config(model_config(preset, **overrides), dtype=dtype).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in sparse_layers(model).values():  # active zeros: regrown weights start at exactly 0
            active = m.weight_mask.view(-1).nonzero().squeeze(1)
            pick = active[torch.randperm(active.numel(), generator=generator)[: max(1, active.numel() // 100)]]
            m.weight.view(-1)[pick] = 0
    return model


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def sparse_bytes(path: Path) -> int:
    """Bytes of the sparse layers' tensors in the folder's safetensors files."""
    total = 0
    for file in path.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            keys = set(f.keys())
            for key in keys:
                sparse = key.endswith((MASK_SUFFIX, VALUES_SUFFIX, SHAPE_SUFFIX, ".weight_mask")) or (
                    key.endswith(".weight") and key[: -len(".weight")] + ".weight_mask" in keys
                )
                if sparse:
                    t = f.get_slice(key)
                    numel = 1
                    for s in t.get_shape():
                        numel *= s
                    total += numel * {"BF16": 2, "F16": 2, "F32": 4, "U8": 1, "BOOL": 1, "I64": 8}[t.get_dtype()]
    return total


def check_bit_exact(original, loaded) -> bool:
    a, b = original.state_dict(), loaded.state_dict()
    if a.keys() != b.keys():
        return False
    layers = sparse_layers(original)
    for key, t in a.items():
        u = b[key]
        if t.dtype != u.dtype or t.shape != u.shape:
            return False
        prefix = key[: -len(".weight")]
        if key.endswith(".weight") and prefix in layers:
            mask = layers[prefix].weight_mask
            width = {2: torch.int16, 4: torch.int32}[t.element_size()]
            if (
                not torch.equal(t[mask].view(width), u[mask].view(width))
                or torch.count_nonzero(u[~mask]).item()
                or u[~mask].view(width).ne(0).any()
            ):  # inactive: +0.0 exactly
                return False
        elif not torch.equal(t, u):
            return False
    return True


def touch(model) -> None:
    """Read one element of every 4 KiB page of every tensor: brings memory-mapped (not yet read) weights in."""
    for t in model.state_dict().values():
        flat = t.reshape(-1)
        flat[:: max(1, 4096 // t.element_size())].sum()


def evict(path: Path) -> None:
    """Drop this folder's files from the page cache (only these files: other processes' caches are untouched)."""
    for f in path.iterdir():
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def timed_load(path: Path, dtype, cold: bool = False) -> tuple[float, float, object]:
    """(from_pretrained seconds, seconds until every weight page is resident, model)."""
    gc.collect()
    if cold:
        evict(path)
    start = time.perf_counter()
    model = SparseWideGPTForCausalLM.from_pretrained(path, dtype=dtype)
    loaded = time.perf_counter() - start
    touch(model)
    return loaded, time.perf_counter() - start, model


def measure(preset: str, dtype_name: str, repeats: int, overrides: dict, workdir: Path) -> dict:
    dtype = DTYPES[dtype_name]
    model = build(preset, dtype, overrides)
    cfg = model.config
    plain, compressed = workdir / "plain", workdir / "compressed"
    start = time.perf_counter()
    model.save_pretrained(plain, sparse_format="plain")
    save_plain = time.perf_counter() - start
    start = time.perf_counter()
    model.save_pretrained(compressed)
    save_compressed = time.perf_counter() - start
    active = sum(int(m.weight_mask.sum()) for m in sparse_layers(model).values())
    active_zeros = sum(int((m.weight.eq(0) & m.weight_mask).sum()) for m in sparse_layers(model).values())
    row = {
        "preset": preset,
        "dtype": dtype_name,
        "d_model": cfg.hidden_size,
        "d_ff": cfg.intermediate_size,
        "layer_sparsity": cfg.layer_sparsity,
        "active_sparse_weights": active,
        "active_zeros": active_zeros,
        "checkpoint_bytes_plain": folder_bytes(plain),
        "checkpoint_bytes_compressed": folder_bytes(compressed),
        "sparse_bytes_plain": sparse_bytes(plain),
        "sparse_bytes_compressed": sparse_bytes(compressed),
        "save_s_plain": save_plain,
        "save_s_compressed": save_compressed,
    }
    row["checkpoint_ratio"] = row["checkpoint_bytes_plain"] / row["checkpoint_bytes_compressed"]
    row["sparse_ratio"] = row["sparse_bytes_plain"] / row["sparse_bytes_compressed"]
    exact = True
    for cold in (False, True):
        times = {"plain": [], "compressed": []}
        resident = {"plain": [], "compressed": []}
        for i in range(repeats + 1):  # the first warm round fills the page cache and is not timed
            for name, path in (
                (("plain", plain), ("compressed", compressed))
                if i % 2 == 0
                else (("compressed", compressed), ("plain", plain))
            ):
                seconds, until_resident, loaded = timed_load(path, dtype, cold)
                if i or cold:
                    times[name].append(seconds)
                    resident[name].append(until_resident)
                if name == "compressed" and i == 0 and not cold:
                    exact = check_bit_exact(model, loaded)
                del loaded
        tag = "cold_" if cold else ""
        for name in ("plain", "compressed"):
            row[f"{tag}load_s_{name}"] = statistics.median(times[name])
            row[f"{tag}resident_s_{name}"] = statistics.median(resident[name])
            row[f"{tag}load_s_{name}_all"], row[f"{tag}resident_s_{name}_all"] = times[name], resident[name]
        row[f"{tag}load_ratio"] = row[f"{tag}load_s_compressed"] / row[f"{tag}load_s_plain"]
        row[f"{tag}resident_ratio"] = row[f"{tag}resident_s_compressed"] / row[f"{tag}resident_s_plain"]
    row["bit_exact"] = exact
    del model
    shutil.rmtree(plain)
    shutil.rmtree(compressed)
    gc.collect()
    return row


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def source_commit() -> str:
    """The commit of the code measured, with "+dirty" when the work tree has uncommitted changes."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def results_stem(threads: int, date: str, tag: str) -> str:
    return results_files.tagged(f"cpu-{platform.machine()}-{threads}threads-{date}-compressed", tag)


def write(report: dict, out: Path, stem: str, overwrite: bool) -> Path:
    lines = [
        f"# Compressed checkpoints (`bitmask-values-v1`) — cpu-{platform.machine()}, {report['threads']} threads — "
        f"{report['date']}",
        "",
        f"torch {report['torch']}, transformers {report['transformers']}, safetensors {report['safetensors']}. "
        f"Load average before / after: {report['load_average_before']} / {report['load_average_after']} "
        "(the machine is shared with other processes; load times are medians of alternated loads).",
        "",
        f"CPU: {report['cpu_model']} ({os.cpu_count()} logical CPUs visible), Python {report['python']}.",
        "",
        f"Command: `{report['command']}` at commit {report['commit']}",
        "",
        "Sizes:",
        "",
        "| preset | dtype | d_model/d_ff | checkpoint plain | compressed | ratio | sparse matrices plain | "
        "compressed | ratio | bit-exact |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['preset']} | {r['dtype']} | {r['d_model']}/{r['d_ff']} | {r['checkpoint_bytes_plain'] / 1e6:,.1f} MB "
            f"| {r['checkpoint_bytes_compressed'] / 1e6:,.1f} MB | {r['checkpoint_ratio']:.2f}x "
            f"| {r['sparse_bytes_plain'] / 1e6:,.1f} MB | {r['sparse_bytes_compressed'] / 1e6:,.1f} MB "
            f"| {r['sparse_ratio']:.2f}x | {'yes' if r['bit_exact'] else 'NO'} |"
        )
    lines += [
        "",
        "Load times, seconds (median; ratio = compressed / plain). Warm: files in the page cache. Cold: this "
        "checkpoint's files evicted from the page cache before each load (posix_fadvise DONTNEED). "
        "'+ resident': until every weight page has been read once.",
        "",
        "| preset | warm from_pretrained plain | compressed | ratio | warm + resident plain | compressed | ratio "
        "| cold from_pretrained plain | compressed | ratio | cold + resident plain | compressed | ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        cells = []
        for tag in ("", "cold_"):
            for metric in ("load", "resident"):
                cells += [
                    f"{r[f'{tag}{metric}_s_plain']:.2f}",
                    f"{r[f'{tag}{metric}_s_compressed']:.2f}",
                    f"{r[f'{tag}{metric}_ratio']:.2f}x",
                ]
        lines.append(f"| {r['preset']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Targets (GPT-3 Small SW-75, bf16): checkpoint >= 2.2x smaller, sparse matrices >= 3.1x, "
        "load time <= 1.5x the plain layout's.",
    ]
    texts = {".json": json.dumps(report, indent=2) + "\n", ".md": "\n".join(lines) + "\n"}
    return results_files.write(out, stem, texts, overwrite)[".md"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="gpt3-small-sw50,gpt3-small-sw75,gpt3-small-sw90")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one repeat (CI)")
    parser.add_argument("--workdir", default=None, help="where to write the checkpoints (default: a temporary folder)")
    results_files.add_arguments(parser)
    args = parser.parse_args(argv)
    date = datetime.date.today().isoformat()
    stem = results_stem(args.threads, date, args.tag)
    results_files.refuse_existing(args.out, stem, args.overwrite)
    torch.set_num_threads(args.threads)
    overrides = {}
    if args.smoke:
        overrides = dict(
            vocab_size=97, n_positions=32, n_layer=2, n_head=2, dense_hidden_size=16, dense_intermediate_size=64
        )
        args.repeats = 1
    report = {
        "date": date,
        "threads": args.threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_model": cpu_model(),
        "command": "compressed_checkpoints.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "commit": source_commit(),
        "load_average_before": load_average(),
        "smoke": args.smoke,
        "results": [],
    }
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for preset in args.presets.split(","):
            row = measure(preset, args.dtype, args.repeats, overrides, Path(tmp))
            print(json.dumps({k: v for k, v in row.items() if not k.endswith("_all")}), flush=True)
            report["results"].append(row)
    report["load_average_after"] = load_average()
    print(write(report, Path(args.out), stem, args.overwrite))
    return 0


if __name__ == "__main__":
    sys.exit(main())
