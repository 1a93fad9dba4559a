"""Block-sparse training kernels on one GPU, against cuBLAS: the three products of a linear, then a training step.

    python benchmarks/gpu_block_sparse.py             # one H100/H200: about 4 minutes
    python benchmarks/gpu_block_sparse.py --smoke     # CPU, Triton's interpreter, tiny shapes (CI)

Parts (``--parts``, default both):
* ``linears``: the attention (d -> d), MLP-in (d -> d_ff) and MLP-out (d_ff -> d) linears of GPT-3 Small Sparse Wide
  at sparsity 0.5, 0.75 and 0.9 (``configs/models/gpt3-small-sw*.yaml`` with ``sparsity_block`` 64 and 128: the
  widths and the calibrated layer sparsity of the model), on T tokens, bf16. Each product timed on its own --
  forward ``Y = X W^T + b``, input gradient ``dX = dY W``, block gradient ``dW`` -- for each block kernel
  (``triton``, ``torch-bsr``), for the masked wide layer (cuBLAS on the full weight; its ``dW`` masked, as the masked
  model trains) and for the iso-FLOP dense layer (cuBLAS, the dense GPT-3 Small layer of the same role, which the
  Sparse Wide layer matches in FLOPs). Throughput counts useful FLOPs: ``2 T`` per active weight. Every block
  kernel's results are checked against the masked layer's in the same run.
* ``train``: a whole training step (bf16 autocast with fp32 master weights, forward + loss, backward, clip, AdamW)
  of GPT-3 Small dense vs SW-75 with 128-blocks vs SW-75 masked: tokens/s and peak memory.

Targets (from the issue): at 128-blocks the block linears reach >= 0.7 of the iso-FLOP dense layer's cuBLAS
throughput and run >= 2.5x faster than the masked layer; the SW-75 block step takes <= 1.3x the dense step.

Writes ``<out>/<gpu>-<date>-block-sparse-gpu.json`` and ``.md`` (``-smoke`` before the suffix for --smoke), with the
GPU, versions, command and commit. GPU timings: CUDA events over repeated calls, median of several rounds.
"""

from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are defined: they run on CPU tensors

import argparse
import datetime
import gc
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers

from hf_sparse_ift import BlockSparseLinear, SparseWideGPTForCausalLM
from hf_sparse_ift.models.sparse_wide_gpt import block_sparse
from hf_sparse_ift.models.sparse_wide_gpt.block_sparse import KERNELS
from hf_sparse_ift.resources import model_config
from hf_sparse_ift.training.config import OptimConfig
from hf_sparse_ift.training.optimizer import build_optimizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_files
from condensed_inference import load_average, source_commit

BLOCK_KERNELS = ("triton", "torch-bsr")
PRODUCTS = ("forward", "grad_input", "grad_blocks")
LINEARS = ("attention", "mlp_in", "mlp_out")
SMOKE = dict(vocab_size=97, n_positions=64, n_layer=1, n_head=2, dense_hidden_size=32, dense_intermediate_size=128)
TARGETS = {"dense_throughput": 0.7, "vs_masked": 2.5, "step_vs_dense": 1.3}
# the block kernels' results against the masked layer's cuBLAS ones: within two bf16 rounding steps of the largest value
AGREEMENT = {torch.bfloat16: 2**-7, torch.float32: 1e-5}


def timer(device: torch.device, calls: int, rounds: int):
    """``measure(fn)``: seconds per call of ``fn``, the median of `rounds` rounds of `calls` calls (CUDA events on a
    GPU, after a warm-up call that also compiles)."""

    def measure(fn) -> float:
        fn()
        results = []
        for _ in range(rounds):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(calls):
                    fn()
                end.record()
                end.synchronize()
                results.append(start.elapsed_time(end) / 1e3 / calls)
            else:
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                results.append((time.perf_counter() - t0) / calls)
        return statistics.median(results)

    return measure


# ----------------------------------------------------------------------------------------------
# linears
# ----------------------------------------------------------------------------------------------
def config_for(args, sparsity: float, block: int | None):
    name = "gpt3-small-dense" if sparsity == 0 else f"gpt3-small-sw{round(sparsity * 100)}"
    overrides = dict(SMOKE) if args.smoke else {}
    if block is not None:
        overrides["sparsity_block"] = block
    return model_config(name, **overrides)


def shape(config, linear: str) -> tuple[int, int]:
    """(out_features, in_features) of a linear of `config`."""
    d, d_ff = config.hidden_size, config.intermediate_size
    return {"attention": (d, d), "mlp_in": (d_ff, d), "mlp_out": (d, d_ff)}[linear]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-30)).item()


def layer_products(kernels, x, gy, blocks, bias, crow, col, weight, mask, dense) -> dict[str, dict]:
    """{variant: {product: a call computing it}}: each block kernel, the masked wide layer, the iso-FLOP dense layer."""
    in_features = x.shape[1]
    variants = {}
    for kernel in kernels:
        k = KERNELS[kernel]
        variants[kernel] = {
            "forward": lambda k=k: k.forward(x, blocks, bias, crow, col),
            "grad_input": lambda k=k: k.grad_input(gy, blocks, crow, col, in_features),
            "grad_blocks": lambda k=k: k.grad_blocks(gy, x, blocks, crow, col),
        }
    dense_x, dense_gy, dense_w, dense_b = dense
    variants["masked"] = {
        "forward": lambda: F.linear(x, weight, bias),
        "grad_input": lambda: gy @ weight,
        "grad_blocks": lambda: (gy.t() @ x).mul_(mask),
    }
    variants["iso-dense"] = {
        "forward": lambda: F.linear(dense_x, dense_w, dense_b),
        "grad_input": lambda: dense_gy @ dense_w,
        "grad_blocks": lambda: dense_gy.t() @ dense_x,
    }
    return variants


def measure_linears(args, device, dtype, measure, report) -> None:
    generator = torch.Generator().manual_seed(0)
    tokens = args.tokens

    def randn(*size, scale=1.0):
        return (torch.randn(*size, generator=generator) * scale).to(device, dtype)

    dense_config = config_for(args, 0.0, None)
    seed = 0
    for sparsity in args.sparsities:
        for block in args.blocks:
            config = config_for(args, sparsity, block)
            for linear in LINEARS:
                out_features, in_features = shape(config, linear)
                seed += 1
                layer = BlockSparseLinear(
                    in_features,
                    out_features,
                    sparsity_block=(block, block),
                    sparsity=config.layer_sparsity,
                    mask_seed=seed,
                )
                crow, col = layer.block_crow_indices.to(device), layer.block_col_indices.to(device)
                blocks = randn(*layer.weight_blocks.shape, scale=in_features**-0.5)
                bias, x, gy = randn(out_features), randn(tokens, in_features), randn(tokens, out_features)
                mask = layer.weight_mask.to(device)
                weight = block_sparse.dense_from_blocks(blocks, crow, col, in_features)
                useful_flops = 2 * tokens * blocks.numel()
                dense_out, dense_in = shape(dense_config, linear)
                dense_w, dense_b = randn(dense_out, dense_in, scale=dense_in**-0.5), randn(dense_out)
                dense_x, dense_gy = randn(tokens, dense_in), randn(tokens, dense_out)
                variants = layer_products(
                    args.kernels, x, gy, blocks, bias, crow, col, weight, mask, (dense_x, dense_gy, dense_w, dense_b)
                )
                want = {p: fn() for p, fn in variants["masked"].items()}
                rows = block_sparse.block_rows_of(crow)
                want["grad_blocks"] = want["grad_blocks"].view(
                    out_features // block, block, in_features // block, block
                )[rows, :, col]
                times = {v: {p: measure(fn) for p, fn in products.items()} for v, products in variants.items()}
                for variant, products in variants.items():
                    for product in PRODUCTS:
                        seconds = times[variant][product]
                        flops = 2 * tokens * dense_w.numel() if variant == "iso-dense" else useful_flops
                        row = {
                            "part": "linears",
                            "dtype": str(dtype).removeprefix("torch."),
                            "sparsity": sparsity,
                            "layer_sparsity": config.layer_sparsity,
                            "block": block,
                            "linear": linear,
                            "shape": [out_features, in_features],
                            "tokens": tokens,
                            "active_blocks": blocks.shape[0],
                            "product": product,
                            "variant": variant,
                            "seconds": seconds,
                            "tflops": flops / seconds / 1e12,
                            "throughput_vs_iso_dense": (flops / seconds)
                            / (2 * tokens * dense_w.numel() / times["iso-dense"][product]),
                            "speedup_vs_masked": times["masked"][product] / seconds,
                        }
                        if variant in BLOCK_KERNELS:
                            row["relative_error_vs_masked"] = relative_error(products[product](), want[product])
                        report["results"].append(row)
                print(
                    f"s={sparsity} block {block} {linear} {out_features}x{in_features}, {blocks.shape[0]} blocks: "
                    + "; ".join(
                        f"{v} " + "/".join(f"{times[v][p] * 1e3:.3f}" for p in PRODUCTS) + " ms" for v in variants
                    ),
                    flush=True,
                )
                del variants, want
                gc.collect()


# ----------------------------------------------------------------------------------------------
# training step
# ----------------------------------------------------------------------------------------------
def measure_training(args, device, dtype, report) -> None:
    variants = {
        "dense": config_for(args, 0.0, None),
        f"sw75-block{args.train_block}": config_for(args, 0.75, args.train_block),
        "sw75-masked": config_for(args, 0.75, None),
    }
    generator = torch.Generator().manual_seed(0)
    dense_step = None
    for name, config in variants.items():
        batch = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=generator).to(device)
        torch.manual_seed(0)
        model = SparseWideGPTForCausalLM(config).to(device).train()
        optimizer = build_optimizer(model, OptimConfig())

        def step(model=model, optimizer=optimizer, batch=batch):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)

        step()  # warm-up: compiles, creates the Adam states
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        seconds = timer(device, args.train_steps, 1)(step)
        kernels = sorted(
            {
                block_sparse.resolve_kernel("auto", device, m.sparsity_block, dtype)
                for m in model.modules()
                if isinstance(m, BlockSparseLinear)
            }
        )
        row = {
            "part": "train",
            "variant": name,
            "dtype": f"{str(dtype).removeprefix('torch.')} autocast, fp32 master weights",
            "d_model": config.hidden_size,
            "d_ff": config.intermediate_size,
            "layer_sparsity": config.layer_sparsity,
            "block_kernel": kernels[0] if kernels else None,
            "tokens_per_step": args.batch * args.seq,
            "step_s": seconds,
            "tokens_per_s": args.batch * args.seq / seconds,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        }
        dense_step = dense_step or seconds
        row["step_vs_dense"] = seconds / dense_step
        report["results"].append(row)
        print(
            f"train {name}: {row['step_s'] * 1e3:.1f} ms/step, {row['tokens_per_s']:.0f} tokens/s, "
            f"{row['step_vs_dense']:.2f}x dense, peak {row['peak_memory_gib']} GiB",
            flush=True,
        )
        del model, optimizer, step
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------
def targets(report: dict) -> list[dict]:
    """Pass/fail of the issue's targets, one line per (kernel, sparsity, linear, product) at 128-blocks; first
    whether every block kernel's results agreed with cuBLAS."""
    tolerance = report["agreement_tolerance"]
    errors = [r for r in report["results"] if "relative_error_vs_masked" in r]
    worst = max(errors, key=lambda r: r["relative_error_vs_masked"], default=None)
    found = []
    if worst is not None:
        found.append(
            {
                "target": f"every block kernel's forward, dX and dW agree with the masked layer's cuBLAS results within "
                f"{tolerance:.1e} of the largest value (worst: {worst['variant']} s={worst['sparsity']} block "
                f"{worst['block']} {worst['linear']} {worst['product']})",
                "measured": f"{worst['relative_error_vs_masked']:.1e}",
                "met": worst["relative_error_vs_masked"] <= tolerance,
            }
        )
    for r in report["results"]:
        if r["part"] == "linears" and r["variant"] in BLOCK_KERNELS and r["block"] == 128:
            where = f"{r['variant']} s={r['sparsity']} {r['linear']} {r['product']}"
            found.append(
                {
                    "target": f"{where}: >= {TARGETS['dense_throughput']} of iso-FLOP dense cuBLAS throughput",
                    "measured": round(r["throughput_vs_iso_dense"], 3),
                    "met": r["throughput_vs_iso_dense"] >= TARGETS["dense_throughput"],
                }
            )
            found.append(
                {
                    "target": f"{where}: >= {TARGETS['vs_masked']}x faster than masked",
                    "measured": round(r["speedup_vs_masked"], 3),
                    "met": r["speedup_vs_masked"] >= TARGETS["vs_masked"],
                }
            )
        if r["part"] == "train" and "block" in r["variant"]:
            found.append(
                {
                    "target": f"training step {r['variant']} ({r['block_kernel']}): <= {TARGETS['step_vs_dense']}x "
                    "the dense step",
                    "measured": round(r["step_vs_dense"], 3),
                    "met": r["step_vs_dense"] <= TARGETS["step_vs_dense"],
                }
            )
    return found


def results_stem(gpu: str, date: str, smoke: bool, tag: str) -> str:
    gpu = gpu.replace(" ", "-").replace("/", "-")
    return results_files.tagged(f"{gpu}-{date}-block-sparse-gpu" + ("-smoke" if smoke else ""), tag)


def write(report: dict, out: Path, smoke: bool, stem: str, overwrite: bool) -> Path:
    lines = [
        f"# Block-sparse training kernels vs cuBLAS — {report['gpu']} — {report['date']}",
        "",
        f"Command: `{report['command']}`; commit {report['commit']}. torch {report['torch']} (CUDA "
        f"{report['cuda']}), triton {report['triton']}, transformers {report['transformers']}, Python "
        f"{report['python']}. {report['tokens']} tokens per linear, {report['dtype']}.",
        "",
        "## Targets",
        "",
        "| target | measured | met |",
        "|---|---|---|",
        *(f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'NO'} |" for t in report["targets"]),
        "",
        "## Linears (ms per call; useful TFLOP/s count 2 x tokens per active weight)",
        "",
        "| sparsity | block | linear | shape | blocks | product | variant | ms | TFLOP/s | x iso-dense throughput "
        "| x faster than masked | rel. error vs masked |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        if r["part"] == "linears":
            error = r.get("relative_error_vs_masked")
            lines.append(
                f"| {r['sparsity']} | {r['block']} | {r['linear']} | {r['shape'][0]}x{r['shape'][1]} | "
                f"{'-' if r['variant'] == 'iso-dense' else r['active_blocks']} | {r['product']} | {r['variant']} | {r['seconds'] * 1e3:.3f} | "
                f"{r['tflops']:.1f} | {r['throughput_vs_iso_dense']:.2f} | {r['speedup_vs_masked']:.2f} | "
                f"{'' if error is None else f'{error:.1e}'} |"
            )
    lines += [
        "",
        "## Training step (GPT-3 Small)",
        "",
        "| variant | d_model / d_ff | block kernel | tokens/step | ms/step | tokens/s | x dense step | peak GiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        if r["part"] == "train":
            peak = "" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.2f}"
            lines.append(
                f"| {r['variant']} | {r['d_model']} / {r['d_ff']} | {r['block_kernel'] or '-'} | "
                f"{r['tokens_per_step']} | {r['step_s'] * 1e3:.1f} | {r['tokens_per_s']:.0f} | "
                f"{r['step_vs_dense']:.2f} | {peak} |"
            )
    if smoke:
        lines += ["", "Smoke run: CPU, Triton's interpreter, tiny shapes; the numbers say nothing about speed."]
    texts = {".json": json.dumps(report, indent=2) + "\n", ".md": "\n".join(lines) + "\n"}
    return results_files.write(out, stem, texts, overwrite)[".json"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, Triton's interpreter, tiny shapes")
    parser.add_argument("--parts", nargs="+", choices=["linears", "train"], default=["linears", "train"])
    parser.add_argument("--sparsities", type=float, nargs="+", default=None, help="default 0.5 0.75 0.9 (smoke: 0.75)")
    parser.add_argument("--blocks", type=int, nargs="+", default=None, help="default 64 128 (smoke: 32)")
    parser.add_argument("--kernels", nargs="+", choices=BLOCK_KERNELS, default=list(BLOCK_KERNELS))
    parser.add_argument("--tokens", type=int, default=None, help="tokens per linear (default 8192; smoke 48)")
    parser.add_argument("--batch", type=int, default=None, help="training sequences per step (default 4; smoke 2)")
    parser.add_argument("--seq", type=int, default=None, help="training sequence length (default 2048; smoke 16)")
    parser.add_argument("--train-block", type=int, default=None, help="default 128 (smoke: 32)")
    parser.add_argument("--train-steps", type=int, default=None, help="timed steps (default 10; smoke 1)")
    results_files.add_arguments(parser)
    args = parser.parse_args(argv)
    smoke = args.smoke
    defaults = dict(sparsities=[0.75] if smoke else [0.5, 0.75, 0.9], blocks=[32] if smoke else [64, 128])
    defaults.update(tokens=48 if smoke else 8192, batch=2 if smoke else 4)
    defaults.update(seq=16 if smoke else 2048, train_block=32 if smoke else 128, train_steps=1 if smoke else 10)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if smoke:
        device, dtype, measure = torch.device("cpu"), torch.float32, timer(torch.device("cpu"), 1, 1)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("gpu_block_sparse.py measures a GPU and none is visible; --smoke runs on CPU")
        device, dtype, measure = torch.device("cuda"), torch.bfloat16, timer(torch.device("cuda"), 20, 5)
    date = datetime.date.today().isoformat()
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu-{platform.machine()}"
    stem = results_stem(gpu, date, smoke, args.tag)
    results_files.refuse_existing(args.out, stem, args.overwrite)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    report = {
        "date": date,
        "command": "gpu_block_sparse.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "commit": source_commit(),
        "gpu": gpu,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "dtype": f"{str(dtype).removeprefix('torch.')}",
        "tokens": args.tokens,
        "load_average_before": load_average(),
        "targets_stated": TARGETS,
        "agreement_tolerance": AGREEMENT[dtype],
        "results": [],
    }
    if "linears" in args.parts:
        measure_linears(args, device, dtype, measure, report)
    if "train" in args.parts:
        measure_training(args, device, dtype, report)
    report["targets"] = targets(report)
    report["load_average_after"] = load_average()
    print(write(report, Path(args.out), smoke, stem, args.overwrite))


if __name__ == "__main__":
    main()
