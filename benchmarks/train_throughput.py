"""Training throughput of Sparse Wide GPT against Hugging Face GPT2LMHeadModel, in one run on one GPU.

    python benchmarks/train_throughput.py                  # GPU: GPT-3 Small dims, context 2048, micro-batch 8
    python benchmarks/train_throughput.py --smoke          # CPU: tiny dims, 2 steps (CI runs this)

Variants (all bf16 autocast, fused AdamW, SDPA, torch.compile unless --no-compile):
  hf-gpt2          GPT2LMHeadModel with GPT2Config defaults (dropout 0.1) at GPT-3 Small dims: the baseline of
                   ../shared/measurements/h100-hf-gpt2-baseline.md, re-measured here in the same run
  dense            our GPT-3 Small, s = 0
  sw50-paper       Sparse Wide 50% at the paper's widths 1092/4344 (head size 91, padded to 96 for SDPA)
  sw50-w64         Sparse Wide 50% at 1152/4352 (head 96), layer sparsity re-calibrated to 0.538
  sw75             Sparse Wide 75%, 1536/6144
Ours train the paper's recipe step: forward + loss, backward, clip to 1.0, AdamW step, DST engine step (SET,
ΔT = 100). A SET update is timed separately (median of 3) and amortised over ΔT steps.

Writes ``<out>/<gpu>-<date>.json`` and ``.md`` with the GPU, versions and command.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import hf_sparse_ift
from hf_sparse_ift import SparseWideGPTConfig, SparseWideGPTForCausalLM
from hf_sparse_ift.models.sparse_wide_gpt.iso_flop import count_flops
from hf_sparse_ift.sparsity.dst import DSTConfig, DSTEngine
from hf_sparse_ift.training.config import OptimConfig
from hf_sparse_ift.training.hardware import PEAK_TFLOPS, set_sdpa_backend
from hf_sparse_ift.training.optimizer import build_optimizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_files

VARIANTS = {
    "dense": dict(sparsity=0.0),
    "dense-vocab50304": dict(sparsity=0.0, vocab_size=50304),  # vocabulary padded to a multiple of 128
    "sw50-paper": dict(sparsity=0.5),
    "sw50-w64": dict(sparsity=0.5, width_multiple=64),
    "sw75": dict(sparsity=0.75),
    # the same with attention restricted to PyTorch's FlashAttention-2 kernels instead of its default order
    "dense-flash": dict(sparsity=0.0, attention_backend="flash"),
    "dense-vocab50304-flash": dict(sparsity=0.0, vocab_size=50304, attention_backend="flash"),
    "sw75-flash": dict(sparsity=0.75, attention_backend="flash"),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def training_step(run, model, opt, x, device, clip: bool = True, after=None):
    """One optimizer step on a fixed batch: bf16 autocast on GPU, loss, backward, (clip), AdamW, then `after`."""

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = run(input_ids=x, labels=x).loss
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if after is not None:
            after()

    return step


def time_steps(step, steps: int, warmup: int, device) -> list[float]:
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def bench_hf_gpt2(args, device, dims) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        n_embd=dims["d_model"],
        n_inner=dims["d_ff"],
        n_layer=dims["n_layer"],
        n_head=dims["n_head"],
        n_positions=args.seq,
        vocab_size=dims["vocab"],
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, fused=device.type == "cuda")
    run = torch.compile(model) if args.compile else model
    x = torch.randint(0, dims["vocab"], (args.micro_batch, args.seq), device=device)
    step = training_step(run, model, opt, x, device, clip=False)  # as the shared baseline script: no clipping
    ours_shape = SparseWideGPTConfig(
        vocab_size=dims["vocab"],
        n_positions=args.seq,
        n_layer=dims["n_layer"],
        n_head=dims["n_head"],
        dense_hidden_size=dims["d_model"],
        dense_intermediate_size=dims["d_ff"],
    ).shape(seq_len=args.seq)
    flops = count_flops(ours_shape)
    return _measure("hf-gpt2", step, args, device, flops, extra={"dropout": 0.1})


def bench_ours(name, args, device, dims) -> dict:
    values = dict(
        vocab_size=dims["vocab"],
        n_positions=args.seq,
        n_layer=dims["n_layer"],
        n_head=dims["n_head"],
        dense_hidden_size=dims["d_model"],
        dense_intermediate_size=dims["d_ff"],
    )
    values.update(VARIANTS[name])
    backend = values.pop("attention_backend", args.attention_backend)
    if args.smoke and "vocab_size" in VARIANTS[name]:
        values["vocab_size"] = dims["vocab"]
    config = SparseWideGPTConfig(**values)
    set_sdpa_backend(backend)
    torch.manual_seed(0)
    model = SparseWideGPTForCausalLM(config).to(device)
    model.set_attn_implementation("sdpa")
    model.train()
    opt = build_optimizer(model, OptimConfig())
    engine = DSTEngine(
        model,
        opt,
        DSTConfig(method="set" if config.sparsity > 0 else "static", update_interval=100),
        total_steps=10_000,
    )
    run = torch.compile(model) if args.compile else model
    x = torch.randint(0, dims["vocab"], (args.micro_batch, args.seq), device=device)
    step = training_step(run, model, opt, x, device, after=engine.step)
    result = _measure(name, step, args, device, count_flops(config.shape(seq_len=args.seq)), {})
    if name in args.profile:
        profile(step, device)
    if config.sparsity > 0:
        updates = []
        for _ in range(3):
            sync(device)
            start = time.perf_counter()
            engine.update()
            sync(device)
            updates.append(time.perf_counter() - start)
        dst_seconds = statistics.median(updates)
        result["dst_update_s"] = dst_seconds
        result["dst_overhead_pct_at_dT100"] = 100 * dst_seconds / (100 * result["step_s"])
        masks = sum(m.weight_mask.numel() * m.weight_mask.element_size() for m in engine.layers.values())
        churn = sum(v.numel() for v in engine.initial_masks.values())
        sparse_weights = sum(m.weight.numel() for m in engine.layers.values())
        result["mask_bytes_per_sparse_weight"] = masks / sparse_weights
        result["churn_reference_bytes_per_sparse_weight"] = churn / sparse_weights
        zero = all(torch.count_nonzero(m.weight[~m.weight_mask]) == 0 for m in engine.layers.values())
        result["inactive_weights_exactly_zero"] = bool(zero)
    result.update(
        d_model=config.hidden_size,
        d_ff=config.intermediate_size,
        head_dim=config.head_dim,
        layer_sparsity=round(config.layer_sparsity, 4),
        vocab_size=config.vocab_size,
        attention_backend=backend,
    )
    set_sdpa_backend("auto")
    return result


def profile(step, device, rows: int = 18) -> None:
    """Print the kernels that take the most device time over 3 steps (torch.profiler)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(3):
            step()
        sync(device)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60), flush=True)


def _measure(name, step, args, device, flops, extra) -> dict:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times = time_steps(step, args.steps, args.warmup, device)
    step_s = statistics.median(times)
    tokens = args.micro_batch * args.seq
    peak = args.peak_tflops * 1e12
    out = {
        "variant": name,
        "step_s": step_s,
        "tokens_per_s": tokens / step_s,
        "mfu_active": tokens / step_s * flops.training / peak,
        "mfu_executed": tokens / step_s * flops.training_executed / peak,
        "training_flops_per_token_active": flops.training,
        "training_flops_per_token_executed": flops.training_executed,
        "step_s_min": min(times),
        "step_s_max": max(times),
    }
    if device.type == "cuda":
        out["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    out.update(extra)
    print(json.dumps(out), flush=True)
    return out


def markdown(report: dict) -> str:
    rows = report["results"]
    base = next((r for r in rows if r["variant"] == "hf-gpt2"), None)
    dense = next((r for r in rows if r["variant"] == "dense"), None)
    lines = [
        f"# Training throughput — {report['gpu']} — {report['date']}",
        "",
        f"torch {report['torch']}, transformers {report['transformers']}, hf-sparse-ift {report['hf_sparse_ift']}; "
        f"context {report['seq']}, micro-batch {report['micro_batch']}, bf16 autocast, SDPA, fused AdamW, "
        f"torch.compile={report['compile']}; our SDPA kernels: {report['attention_backend']} (HF GPT-2: PyTorch default); "
        f"median of {report['steps']} steps after {report['warmup']} warm-up; "
        f"MFU against {report['peak_tflops']:g} TFLOP/s.",
        "",
        f"Command: `{report['command']}`",
        "",
        "| variant | d_model/d_ff | tokens/s | step s | vs HF GPT-2 | MFU active | MFU executed | peak GB "
        "| step / (exec-FLOP ratio x dense step) | SET update s | DST overhead @ΔT=100 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        vs = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "–"
        ratio = "–"
        if not r["variant"].startswith(("hf-gpt2", "dense")):
            # against our dense model with the same attention kernels
            same = "dense-flash" if r.get("attention_backend") == "flash" else "dense"
            ref = next((d for d in rows if d["variant"] == same), dense)
            if ref:
                exec_ratio = r["training_flops_per_token_executed"] / ref["training_flops_per_token_executed"]
                ratio = f"{r['step_s'] / (exec_ratio * ref['step_s']):.2f}"
        dims = f"{r.get('d_model', report['dims']['d_model'])}/{r.get('d_ff', report['dims']['d_ff'])}"
        lines.append(
            f"| {r['variant']} | {dims} | {r['tokens_per_s']:,.0f} | {r['step_s']:.4f} | {vs} | {r['mfu_active']:.3f} "
            f"| {r['mfu_executed']:.3f} | {r.get('peak_memory_gb', float('nan')):.1f} | {ratio} "
            f"| {r.get('dst_update_s', float('nan')):.4f} | {r.get('dst_overhead_pct_at_dT100', float('nan')):.3f}% |"
        )
    lines += [
        "",
        "DST overhead: one SET update over ΔT = 100 optimizer steps of one micro-batch each (the worst case). "
        "With the paper's 256 x 2048-token global batch an optimizer step is "
        f"{256 // report['micro_batch']} of these micro-batch steps, which divides the overhead by as much.",
        "",
        *targets(report),
    ]
    return "\n".join(lines) + "\n"


def targets(report: dict) -> list[str]:
    """The performance issue's targets, checked against this run."""
    rows = {r["variant"]: r for r in report["results"]}
    out = ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
    base = rows.get("hf-gpt2")
    for name in ("dense", "dense-vocab50304"):
        if base and name in rows:
            speedup = rows[name]["tokens_per_s"] / base["tokens_per_s"]
            out.append(
                f"| {name}: >= 1.7x the tokens/s of compiled HF GPT-2 (about 40% MFU) | {speedup:.2f}x, "
                f"MFU {rows[name]['mfu_active']:.3f} | {'yes' if speedup >= 1.7 else 'no'} |"
            )
    dense = rows.get("dense")
    for name, r in rows.items():
        if name.startswith(("hf-gpt2", "dense")) or not dense:
            continue
        exec_ratio = r["training_flops_per_token_executed"] / dense["training_flops_per_token_executed"]
        ratio = r["step_s"] / (exec_ratio * dense["step_s"])
        out.append(
            f"| {name}: step <= 1.1 x executed-FLOP ratio ({exec_ratio:.2f}) x dense step | {ratio:.2f} "
            f"| {'yes' if ratio <= 1.1 else 'no'} |"
        )
        if "dst_overhead_pct_at_dT100" in r:
            pct = r["dst_overhead_pct_at_dT100"]
            paper = pct / (256 // report["micro_batch"])
            out.append(
                f"| {name}: SET at ΔT = 100 < 1% of training time | {pct:.2f}% per micro-batch step, "
                f"{paper:.3f}% at the paper's batch | {'yes' if pct < 1 else 'at the paper batch only'} |"
            )
            out.append(
                f"| {name}: mask memory <= 1 byte per sparse weight | {r['mask_bytes_per_sparse_weight']:.3f} "
                f"(+{r['churn_reference_bytes_per_sparse_weight']:.3f} for churn telemetry, optional) "
                f"| {'yes' if r['mask_bytes_per_sparse_weight'] <= 1 else 'no'} |"
            )
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny dims on CPU, 2 steps: checks the script runs")
    parser.add_argument(
        "--variants",
        default="hf-gpt2,dense,sw50-paper,sw50-w64,sw75",
        help=f"comma-separated, from hf-gpt2,{','.join(VARIANTS)}",
    )
    parser.add_argument(
        "--attention-backend",
        default="auto",
        help="SDPA kernels for our variants (auto, flash, cudnn, efficient): train.attention_backend",
    )
    parser.add_argument("--profile", default="", help="comma-separated variants to profile after timing")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="default: the known peak of this GPU (hardware.PEAK_TFLOPS), 1 on CPU",
    )
    results_files.add_arguments(parser)
    parser.add_argument(
        "--render", metavar="JSON", help="only re-render the markdown of an existing results file (beside it)"
    )
    args = parser.parse_args(argv)
    if args.render:
        report = json.loads(Path(args.render).read_text())
        results = Path(args.render)
        results_files.write(results.parent, results.stem, {".md": markdown(report)}, args.overwrite)
        print(markdown(report))
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dims = dict(n_layer=12, n_head=12, d_model=768, d_ff=3072, vocab=50257)
    if args.smoke:
        dims = dict(n_layer=2, n_head=2, d_model=32, d_ff=128, vocab=256)
        args.seq, args.micro_batch, args.steps, args.warmup, args.compile = 64, 2, 2, 1, False
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu-{platform.machine()}"
    date = datetime.date.today().isoformat()
    stem = results_files.tagged(
        f"{gpu.replace(' ', '-').replace('/', '-')}-{date}" + ("-smoke" if args.smoke else ""), args.tag
    )
    results_files.refuse_existing(args.out, stem, args.overwrite)
    if args.peak_tflops is None:
        args.peak_tflops = next((v for k, v in PEAK_TFLOPS.items() if k in gpu), 1.0)
    import transformers

    report = {
        "gpu": gpu,
        "date": date,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "hf_sparse_ift": hf_sparse_ift.__version__,
        "python": platform.python_version(),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "seq": args.seq,
        "micro_batch": args.micro_batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "compile": args.compile,
        "peak_tflops": args.peak_tflops,
        "dims": dims,
        "attention_backend": args.attention_backend,
        "results": [],
    }
    for name in args.variants.split(","):
        try:
            r = bench_hf_gpt2(args, device, dims) if name == "hf-gpt2" else bench_ours(name, args, device, dims)
        except torch.OutOfMemoryError as err:
            r = {"variant": name, "error": f"out of memory: {err}"[:300]}
            print(json.dumps(r), flush=True)
        report["results"].append(r)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        torch._dynamo.reset()
    ok = [r for r in report["results"] if "error" not in r]
    report["results"] = ok
    texts = {".json": json.dumps(report, indent=1), ".md": markdown(report)}
    written = results_files.write(args.out, stem, texts, args.overwrite)
    print(markdown(report))
    print(f"wrote {written['.json']} and {written['.md']}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
