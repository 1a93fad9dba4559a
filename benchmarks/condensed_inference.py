"""Condensed vs masked vs dense inference on CPU: prefill and greedy decode at batch 1.

    python benchmarks/condensed_inference.py                 # GPT-3 Small shapes, fp32 and bf16, 2 threads
    python benchmarks/condensed_inference.py --smoke         # tiny shapes, seconds (CI)

Models (GPT-3 Small shapes, random GPT-2-style weights; speed does not depend on the values):
* ``dense``: the dense GPT-3 Small (768 / 3072);
* ``sw75-masked`` / ``sw90-masked``: Sparse Wide at 75% / 90% (1536 / 6144, 2429 / 9716) with SRigL masks (constant
  fan-in per output neuron, as SRigL's initial mask; no neuron ablated), computed as masked dense layers;
* ``sw75-condensed`` / ``sw90-condensed``: the same weights after ``model.condense()`` ([rows, k] values and int16
  indices, the native kernel ``condensed_kernel.c`` when built by ``hf-sparse-ift build-kernels``, else the torch
  path; the report records which, and where the kernel came from);
* ``sw75-set-*``: SET/RigL-style masks (uniform random, variable fan-in), condensed as CSR and as rows padded to the
  largest fan-in, to pick the representation for variable fan-in.

Per variant: prefill of --prefill tokens (one forward with a KV cache, ``logits_to_keep=1`` as `generate` does), then
--decode greedy steps of one token each. Reported: prefill seconds (median of --repeats) and decode milliseconds per
token (median over all steps of all repeats). Variants of one group live in memory together and are measured in
turns (the order alternates between repeats), so every ratio compares numbers taken in the same run under the same
machine load. Before timing, the condensed model's greedy tokens are checked against the masked model's (fp32: all
equal; bf16: reported). Writes ``<out>/<cpu>-<threads>threads-<date>-condensed.json`` and ``.md``.

``OMP_WAIT_POLICY`` defaults to PASSIVE here (set it to override): on a machine shared with other processes, OpenMP's
default spin-waiting made every parallel PyTorch op cost milliseconds (a tanh over 6144 values: 8 ms instead of
50 us, measured on the 2-core CI machine), which drowned the layers being compared for every variant alike.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP; see the module docstring

import argparse
import copy
import datetime
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers.cache_utils import DynamicCache

from hf_sparse_ift import SparseWideGPTForCausalLM
from hf_sparse_ift.models.sparse_wide_gpt import condensed_kernel
from hf_sparse_ift.models.sparse_wide_gpt.iso_flop import BLOCK_LINEARS
from hf_sparse_ift.resources import model_config
from hf_sparse_ift.sparsity.checkpoint_layouts import condensed_summary, kernel_available
from hf_sparse_ift.sparsity.masks import sparse_layers

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_files

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TINY = dict(vocab_size=97, n_positions=64, n_layer=2, n_head=2, dense_hidden_size=16, dense_intermediate_size=64)


@torch.no_grad()
def build(preset: str, dtype: torch.dtype, masks: str, overrides: dict, seed: int = 0) -> SparseWideGPTForCausalLM:
    """A model with random weights; sparse layers get `masks` = "srigl" (constant fan-in) or "set" (uniform)."""
    torch.manual_seed(seed)
    model = SparseWideGPTForCausalLM._from_config(model_config(preset, **overrides), dtype=dtype).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    for m in sparse_layers(model).values():
        out, inp = m.weight.shape
        density = 1.0 - m.sparsity
        if masks == "srigl":
            k = max(1, round(density * inp))
            cols = torch.rand(out, inp, generator=generator).argsort(dim=1)[:, :k]
            m.weight_mask.zero_().scatter_(1, cols, True)
        else:
            m.weight_mask.copy_(torch.rand(out, inp, generator=generator) < density)
        m.weight.masked_fill_(~m.weight_mask, 0.0)
    return model


@torch.inference_mode()
def run(model, prompt: torch.Tensor, decode: int) -> tuple[float, list[float], list[int]]:
    """(prefill seconds, seconds per decode step, greedy tokens)."""
    cache = DynamicCache(config=model.config)
    start = time.perf_counter()
    out = model(input_ids=prompt, cache=cache, use_cache=True, logits_to_keep=1)
    prefill = time.perf_counter() - start
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    tokens, steps = [int(token)], []
    for _ in range(decode):
        start = time.perf_counter()
        out = model(input_ids=token, cache=cache, use_cache=True, logits_to_keep=1)  # the cache grows in place
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        steps.append(time.perf_counter() - start)
        tokens.append(int(token))
    return prefill, steps, tokens


@torch.inference_mode()
def time_block_linears(model, passes: int) -> list[float]:
    """Seconds per pass of one token through every block linear (q/k/v/o, fc_in, fc_out of every layer, masked,
    condensed or dense), in model order: the part of a decode step that condensing changes. The LM head, attention
    and the KV cache are the rest of the step, the same work for masked and condensed models."""
    layers = [m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in BLOCK_LINEARS]
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(1, 1, m.in_features, generator=generator).to(model.dtype) for m in layers]
    times = []
    for _ in range(passes):
        start = time.perf_counter()
        for layer, x in zip(layers, inputs):
            layer(x)
        times.append(time.perf_counter() - start)
    return times


def measure_group(variants: dict, prompt: torch.Tensor, decode: int, repeats: int) -> dict:
    results = {name: {"prefill_s": [], "decode_step_s": [], "block_linears_s": []} for name in variants}
    names = list(variants)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            prefill, steps, _ = run(variants[name], prompt, decode)
            layers = time_block_linears(variants[name], max(8, decode // 4))
            results[name]["prefill_s"].append(prefill)
            results[name]["decode_step_s"].extend(steps)
            results[name]["block_linears_s"].extend(layers)
            print(
                f"  {name}: prefill {prefill:.3f}s, decode {statistics.median(steps) * 1e3:.2f} ms/token (p10 "
                f"{percentile(steps, 10) * 1e3:.2f}), block linears {statistics.median(layers) * 1e3:.2f} ms/token",
                flush=True,
            )
    for r in results.values():
        r["block_linears_ms_per_token_median"] = statistics.median(r["block_linears_s"]) * 1e3
        r["prefill_s_median"] = statistics.median(r["prefill_s"])
        r["prefill_s_min"] = min(r["prefill_s"])
        r["decode_ms_per_token_median"] = statistics.median(r["decode_step_s"]) * 1e3
        r["decode_ms_per_token_p10"] = percentile(r["decode_step_s"], 10) * 1e3
    return results


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q / 100))]


def groups(smoke: bool) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """(group, [(variant, preset, masks)]); a variant ending in -condensed/-csr/-padded is derived from its masked twin."""
    return [
        (
            "sw75",
            [
                ("dense", "gpt3-small-dense", "srigl"),
                ("sw75-masked", "gpt3-small-sw75", "srigl"),
                ("sw75-condensed", "gpt3-small-sw75", "srigl"),
            ],
        ),
        ("sw90", [("sw90-masked", "gpt3-small-sw90", "srigl"), ("sw90-condensed", "gpt3-small-sw90", "srigl")]),
        (
            "sw75-set",
            [
                ("sw75-set-masked", "gpt3-small-sw75", "set"),
                ("sw75-set-csr", "gpt3-small-sw75", "set"),
                ("sw75-set-padded", "gpt3-small-sw75", "set"),
            ],
        ),
    ]


def source_commit() -> str:
    """The commit of the code measured, with "+dirty" when the work tree has uncommitted changes."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head.stdout.strip() + ("+dirty" if dirty else "")


# the vector-instruction flags of /proc/cpuinfo that decide which kernels are fast
VECTOR_FLAGS = (
    "avx", "avx2", "fma", "avx512f", "avx512dq", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
    "amx_tile", "amx_bf16", "amx_int8",
)  # fmt: skip


def cpu_info() -> dict:
    """The CPU model, its vector-instruction flags (of `VECTOR_FLAGS`) and a short kind for file names, e.g.
    ``intel-xeon-avx512`` or ``amd-epyc-avx2``."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    lower = model.lower()
    vendor = next((v for v in ("intel", "amd") if v in lower), platform.machine())
    family = next((f for f in ("xeon", "epyc", "core", "ryzen") if f in lower), "")
    isa = "amx" if "amx_tile" in flags else "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "novec"
    return {
        "model": model,
        "cpus": os.cpu_count(),
        "vector_flags": [f for f in VECTOR_FLAGS if f in flags],
        "kind": "-".join(p for p in (vendor, family, isa) if p),
    }


def load_average():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _kernel_source(info: dict | None) -> str:
    if info is None:
        return "none built: the torch path"
    return f"{info['path']}, built {info.get('built_at')} by {info.get('compiler')} {' '.join(info.get('flags', []))}"


def torch_path_comparison(report: dict, dtypes: list[str], overrides: dict, passes: int) -> None:
    """Block linears alone, one token, SW-75 (SRigL masks): masked, condensed with the native kernel, condensed with
    the torch path (what runs without a built kernel or with HF_SPARSE_IFT_KERNEL=0), measured in turns."""
    library = condensed_kernel.load_kernel()
    if library is None:
        raise SystemExit(
            "--torch-path compares the native kernel with the torch path: run `hf-sparse-ift build-kernels`"
        )
    for dtype_name in dtypes:
        masked = build("gpt3-small-sw75", DTYPES[dtype_name], "srigl", overrides)
        shared = {id(t): t for m in sparse_layers(masked).values() for t in (m.weight, m.weight_mask)}
        condensed_model = copy.deepcopy(masked, shared).condense()
        times = {"masked": [], "condensed-kernel": [], "condensed-torch-path": []}
        try:
            for _ in range(3):
                times["masked"] += time_block_linears(masked, passes)
                condensed_kernel._library = library
                times["condensed-kernel"] += time_block_linears(condensed_model, passes)
                condensed_kernel._library = None  # the torch path, as without a built kernel
                times["condensed-torch-path"] += time_block_linears(condensed_model, max(2, passes // 2))
        finally:
            condensed_kernel._library = library
        row = {"dtype": dtype_name, **{f"{k}_ms_per_token": statistics.median(v) * 1e3 for k, v in times.items()}}
        print(row, flush=True)
        report["results"].append(row)
        del masked, condensed_model
        gc.collect()


def results_stem(torch_path: bool, cpu_kind: str, threads: int, date: str, tag: str) -> str:
    if torch_path:
        return results_files.tagged(f"cpu-{platform.machine()}-{threads}threads-{date}-condensed-torch-path", tag)
    return results_files.tagged(f"cpu-{cpu_kind}-{threads}threads-{date}-condensed", tag)


def write_torch_path(report: dict, out: Path, stem: str, overwrite: bool) -> None:
    lines = [
        f"# Condensed layers without the native kernel — cpu-{platform.machine()}, {report['threads']} threads — "
        f"{report['date']}",
        "",
        f"Kernel: {_kernel_source(report['kernel_source'])}.",
        "",
        f"torch {report['torch']}, transformers {report['transformers']}; "
        f"{'tiny shapes (--smoke)' if report['smoke'] else 'GPT-3 Small SW-75'} (SRigL masks), one "
        "token through the 72 block linears (no LM head, attention or KV cache), medians; the torch path is a "
        "CSR matmul (`torch.sparse.mm`).",
        "",
        f"Command: `{report['command']}` at commit {report['commit']}",
        "",
        "| dtype | masked, ms | condensed with the kernel, ms | condensed, torch path, ms |",
        "|---|---|---|---|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['dtype']} | {r['masked_ms_per_token']:.1f} | {r['condensed-kernel_ms_per_token']:.1f} | "
            f"{r['condensed-torch-path_ms_per_token']:.1f} |"
        )
    texts = {".json": json.dumps(report, indent=2) + "\n", ".md": "\n".join(lines) + "\n"}
    print(results_files.write(out, stem, texts, overwrite)[".md"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--groups", default="sw75,sw90,sw75-set")
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--decode", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, a few tokens (CI)")
    parser.add_argument(
        "--torch-path",
        action="store_true",
        help="only compare the block linears of SW-75: masked, condensed with the kernel, condensed "
        "with the torch path used without a C compiler",
    )
    results_files.add_arguments(parser)
    args = parser.parse_args(argv)
    cpu = cpu_info()
    date = datetime.date.today().isoformat()
    stem = results_stem(args.torch_path, cpu["kind"], args.threads, date, args.tag)
    results_files.refuse_existing(args.out, stem, args.overwrite)
    torch.set_num_threads(args.threads)
    overrides = TINY if args.smoke else {}
    if args.smoke:
        args.prefill, args.decode, args.repeats = 16, 4, 1
    wanted = args.groups.split(",")
    report = {
        "date": date,
        "threads": args.threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu": f"{cpu['model']}, {cpu['cpus']} CPUs",
        "cpu_kind": cpu["kind"],
        "cpu_vector_flags": cpu["vector_flags"],
        "kernel": kernel_available(),
        "kernel_source": condensed_kernel.kernel_info(),  # the built library: path, compiler, flags, source hash
        "command": "condensed_inference.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "commit": source_commit(),
        "prefill_tokens": args.prefill,
        "decode_tokens": args.decode,
        "repeats": args.repeats,
        "batch": 1,
        "smoke": args.smoke,
        "load_average_before": load_average(),
        "gpu": f"not used: this script measures CPU inference (CUDA available: {torch.cuda.is_available()})",
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "results": [],
    }
    if args.torch_path:
        torch_path_comparison(report, args.dtypes.split(","), overrides, 4 if args.smoke else 10)
        write_torch_path(report, Path(args.out), stem, args.overwrite)
        return 0
    prompt = torch.randint(
        0, 97 if args.smoke else 50257, (1, args.prefill), generator=torch.Generator().manual_seed(0)
    )
    for dtype_name in args.dtypes.split(","):
        dtype = DTYPES[dtype_name]
        for group, variants in groups(args.smoke):
            if group not in wanted:
                continue
            print(f"{dtype_name} {group}", flush=True)
            models, masked = {}, None
            for name, preset, masks in variants:
                if name.endswith(("-condensed", "-csr", "-padded")):
                    representation = {"-csr": "csr", "-padded": "padded"}.get(name[name.rfind("-") :], "auto")
                    # a copy that shares the masked layers' tensors (condensing reads them), so memory holds one masked
                    # model plus the condensed layers
                    shared = {id(t): t for m in sparse_layers(masked).values() for t in (m.weight, m.weight_mask)}
                    models[name] = copy.deepcopy(masked, shared).condense(representation)
                else:
                    models[name] = build(preset, dtype, masks, overrides)
                    if name.endswith("-masked"):
                        masked = models[name]
            # correctness before speed: greedy tokens of each derived model against its masked twin
            check = {}
            if masked is not None:
                _, _, want = run(masked, prompt[:, : min(args.prefill, 64)], min(args.decode, 16))
                for name, m in models.items():
                    if m is not masked and name != "dense":
                        _, _, got = run(m, prompt[:, : min(args.prefill, 64)], min(args.decode, 16))
                        check[name] = sum(a == b for a, b in zip(want, got)) / len(want)
            timings = measure_group(models, prompt, args.decode, args.repeats)
            for name, m in models.items():
                row = {
                    "dtype": dtype_name,
                    "group": group,
                    "variant": name,
                    "d_model": m.config.hidden_size,
                    "d_ff": m.config.intermediate_size,
                    "sparsity": m.config.sparsity,
                    "same_greedy_tokens_as_masked": check.get(name),
                    **timings[name],
                }
                summary = condensed_summary(m)
                if summary["layers"]:
                    row["condensed"] = summary
                report["results"].append(row)
            del models, masked
            gc.collect()
    report["load_average_after"] = load_average()
    add_ratios(report)
    write(report, Path(args.out), stem, args.overwrite)
    return 0


def add_ratios(report: dict) -> None:
    rows = {(r["dtype"], r["variant"]): r for r in report["results"]}
    pairs = [
        ("sw75-condensed", "sw75-masked"),
        ("sw90-condensed", "sw90-masked"),
        ("sw75-condensed", "dense"),
        ("sw75-masked", "dense"),
        ("sw75-set-csr", "sw75-set-masked"),
        ("sw75-set-padded", "sw75-set-masked"),
    ]
    report["ratios"] = []
    for dtype in sorted({r["dtype"] for r in report["results"]}):
        for a, b in pairs:
            if (dtype, a) in rows and (dtype, b) in rows:
                ra, rb = rows[(dtype, a)], rows[(dtype, b)]
                report["ratios"].append(
                    {
                        "dtype": dtype,
                        "faster": a,
                        "than": b,
                        "decode_speedup": rb["decode_ms_per_token_median"] / ra["decode_ms_per_token_median"],
                        "decode_speedup_p10": rb["decode_ms_per_token_p10"] / ra["decode_ms_per_token_p10"],
                        "block_linears_speedup": rb["block_linears_ms_per_token_median"]
                        / ra["block_linears_ms_per_token_median"],
                        "prefill_speedup": rb["prefill_s_median"] / ra["prefill_s_median"],
                        "prefill_speedup_min": rb["prefill_s_min"] / ra["prefill_s_min"],
                    }
                )


def write(report: dict, out: Path, stem: str, overwrite: bool) -> None:
    lines = [
        f"# Condensed inference — cpu-{report['cpu_kind']}, {report['threads']} threads — {report['date']}",
        "",
        f"torch {report['torch']}, transformers {report['transformers']}, Python {report['python']}; batch 1, "
        f"prefill {report['prefill_tokens']} tokens, greedy decode {report['decode_tokens']} tokens, "
        f"{report['repeats']} repeats; condensed layers on the native kernel: {report['kernel']} "
        f"({_kernel_source(report['kernel_source'])}); OMP_WAIT_POLICY="
        f"{report['omp_wait_policy']}. GPU: {report['gpu']}.",
        "",
        f"Load average before / after: {report['load_average_before']} / {report['load_average_after']} — the "
        "machine (2 cores) is shared with other processes, so absolute times are noisy; ratios compare variants "
        "measured in turns within the same run.",
        "",
        f"Command: `{report['command']}` at commit {report.get('commit', 'not recorded')}",
        "",
        "| dtype | variant | d_model/d_ff | prefill s (median) | prefill s (min) | decode ms/token (median) | "
        "decode ms/token (p10) | block linears alone, ms/token | greedy tokens = masked |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        same = r["same_greedy_tokens_as_masked"]
        lines.append(
            f"| {r['dtype']} | {r['variant']} | {r['d_model']}/{r['d_ff']} | {r['prefill_s_median']:.3f} | "
            f"{r['prefill_s_min']:.3f} | {r['decode_ms_per_token_median']:.2f} | "
            f"{r['decode_ms_per_token_p10']:.2f} | {r['block_linears_ms_per_token_median']:.2f} | "
            f"{'–' if same is None else f'{same:.0%}'} |"
        )
    lines += [
        "",
        "Speed-ups (ratios of medians; in brackets, of the least disturbed measurements: 10th percentile of "
        "decode steps, fastest prefill). 'Block linears alone': one token through the 6 linears of every "
        "block, without the LM head, attention and KV cache, which masked and condensed models share:",
        "",
        "| dtype | comparison | decode speed-up | block linears alone | prefill speed-up |",
        "|---|---|---|---|---|",
    ]
    for q in report["ratios"]:
        lines.append(
            f"| {q['dtype']} | {q['faster']} vs {q['than']} | {q['decode_speedup']:.2f}x "
            f"({q['decode_speedup_p10']:.2f}x) | {q['block_linears_speedup']:.2f}x | "
            f"{q['prefill_speedup']:.2f}x ({q['prefill_speedup_min']:.2f}x) |"
        )
    lines += ["", "Targets: condensed SW-75 decode >= 2x masked SW-75; condensed SW-90 >= 3x masked SW-90."]
    texts = {".json": json.dumps(report, indent=2) + "\n", ".md": "\n".join(lines) + "\n"}
    print(results_files.write(out, stem, texts, overwrite)[".md"])


if __name__ == "__main__":
    sys.exit(main())
