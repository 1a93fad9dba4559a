"""Block-sparse vs masked-dense vs iso-FLOP dense on CPU: linears, a training step and batch-1 decode, in one run.

    python benchmarks/block_sparse.py                 # GPT-3 Small shapes, T = 2048 tokens, 2 threads
    python benchmarks/block_sparse.py --smoke         # tiny shapes, seconds (CI)

Parts (``--parts``, default all three):
* ``linears``: one linear layer at the widths of Sparse Wide GPT-3 Small at sparsity 0.5, 0.75 and 0.9 (d = 768·k and
  4d rounded up to multiples of 128, k = sqrt(1 / (1 - s)), so that every block size divides them): attention
  (d -> d) and MLP in (d -> 4d), on T tokens. Variants: ``masked`` (a `SparseLinear`: F.linear with the full masked
  weight, the gradient masked, as the masked model trains), ``block-<B>-<fan-in>`` (`block_sparse_linear` on the
  active B x B blocks; fan-in ``constant``: the same number of blocks in every block-row, ``any``: blocks drawn
  uniformly) and ``iso-dense`` (the narrow dense layer of equal FLOPs: d_in -> round((1 - s) d_out)). Timed:
  forward (no grad) and forward + backward (gradients for the input, the weights and the bias). fp32, and bf16
  under autocast with fp32 weights, as training runs it.
* ``train``: a whole training step (forward + loss, backward, clip, AdamW; no DST update) of a small model (--train-*)
  dense vs SW-75 with 64 x 64 blocks vs SW-75 masked, fp32; with the ideal total-FLOP ratio of `plan`
  (``flop_ratio_to_dense``) for the target "block step <= 1.25 x dense step x that ratio", and the bytes of the
  sparse layers' parameters, gradients and Adam states per active weight's. A turn is two steps of one variant: the
  second, after a step of the same model as in training, is the step time; the first, after another variant's step,
  is recorded beside it with the page faults of each.
* ``decode``: batch-1 greedy decode, fp32: dense GPT-3 Small vs SW-75 with 64 x 64 blocks vs SW-75 condensed vs SW-75
  masked (random weights, SRigL-style masks for masked/condensed, as `condensed_inference.py`).

Variants of one group are measured in turns (the order alternates between repeats), so every ratio compares numbers
taken in the same run under the same machine load; medians are reported, and the fastest run next to them. Writes
``<out>/cpu-<machine>-<threads>threads-<date>-block-sparse.json`` and ``.md``.

``OMP_WAIT_POLICY`` defaults to PASSIVE here (see `condensed_inference.py`: spin-waiting OpenMP threads drown
small ops on a shared machine).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP

import argparse
import contextlib
import copy
import datetime
import gc
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

from hf_sparse_ift import SparseWideGPTConfig, SparseWideGPTForCausalLM
from hf_sparse_ift.errors import UsageError
from hf_sparse_ift.models.sparse_wide_gpt import block_sparse_cpu, condensed_kernel, native_kernels
from hf_sparse_ift.models.sparse_wide_gpt.block_sparse import block_sparse_linear
from hf_sparse_ift.models.sparse_wide_gpt.iso_flop import model_summary, round_up, sparse_wide_factor
from hf_sparse_ift.models.sparse_wide_gpt.sparse_layers import SparseLinear
from hf_sparse_ift.resources import model_config
from hf_sparse_ift.sparsity.masks import sparse_layers
from hf_sparse_ift.training.config import OptimConfig
from hf_sparse_ift.training.hardware import CPU_ALLOCATORS, KEEP_FREED, apply_cpu_allocator, resolve_cpu_allocator
from hf_sparse_ift.training.optimizer import build_optimizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_files
from condensed_inference import build as build_inference_model
from condensed_inference import cpu_info, load_average, source_commit
from condensed_inference import run as decode_run

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# native-own-threads: the native kernel with its jobs on the library's own pthreads instead of torch's OpenMP threads
# (what HF_SPARSE_IFT_KERNEL_THREADS=own selects for a whole process), switched per variant so both run in turns
BLOCK_KERNELS = ("native", "native-own-threads", "torch")
DENSE = {"d_model": 768, "d_ff": 3072}  # GPT-3 Small
SMOKE_DENSE = {"d_model": 32, "d_ff": 128}


# ----------------------------------------------------------------------------------------------
# linears
# ----------------------------------------------------------------------------------------------
def linear_shapes(dense: dict, sparsity: float, multiple: int) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of the attention and MLP-in linears of Sparse Wide at `sparsity`."""
    k = sparse_wide_factor(sparsity)
    d, d_ff = round_up(k * dense["d_model"], multiple), round_up(k * dense["d_ff"], multiple)
    return {"attention": (d, d), "mlp_in": (d_ff, d)}


def random_block_index(out_features, in_features, block, density, fan_in, generator):
    """(crow_indices, col_indices) of round(density x blocks) active blocks: the same number in every block-row
    (constant fan-in) or drawn uniformly over the layer (any)."""
    n_rows, n_cols = out_features // block, in_features // block
    per_row = max(1, round(density * n_cols))
    active = torch.zeros(n_rows * n_cols, dtype=torch.bool)
    if fan_in == "constant":
        chosen = torch.rand(n_rows, n_cols, generator=generator).argsort(1)[:, :per_row]
        active.view(n_rows, n_cols).scatter_(1, chosen, True)
    else:
        active[torch.randperm(n_rows * n_cols, generator=generator)[: per_row * n_rows]] = True
    active = active.view(n_rows, n_cols)
    crow = torch.cat([torch.zeros(1, dtype=torch.long), active.sum(1).cumsum(0)])
    return crow, active.nonzero()[:, 1]


class BlockLayer(torch.nn.Module):
    def __init__(self, out_features, in_features, block, density, fan_in, generator):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.crow, self.col = random_block_index(out_features, in_features, block, density, fan_in, generator)
        self.blocks = torch.nn.Parameter(torch.randn(self.col.numel(), block, block, generator=generator) * 0.02)
        self.bias = torch.nn.Parameter(torch.zeros(out_features))

    def forward(self, x):
        return block_sparse_linear(x, self.blocks, self.crow, self.col, self.in_features, self.bias)


def masked_layer(out_features, in_features, density, generator) -> SparseLinear:
    layer = SparseLinear(in_features, out_features, sparsity=1 - density)
    with torch.no_grad():
        layer.weight_mask.copy_(torch.rand(out_features, in_features, generator=generator) < density)
        layer.weight.mul_(layer.weight_mask)
    return layer


@contextlib.contextmanager
def block_kernel(kind: str):
    """Block-sparse layers on CPU compute with the built native kernel ("native") or the torch path ("torch", what
    runs without a built kernel or with HF_SPARSE_IFT_KERNEL=0) inside this block."""
    library = block_sparse_cpu.load_kernel()
    native = kind is not None and kind.startswith("native")
    if native and library is None:
        raise SystemExit("the native block-sparse kernel is not built: run `hf-sparse-ift build-kernels`")
    block_sparse_cpu._library = library if native else None
    openmp = native_kernels.openmp_parallel_entry() if library is not None and kind == "native-own-threads" else None
    if openmp is not None:
        library.pool_use_openmp(None)
    try:
        yield
    finally:
        block_sparse_cpu._library = library
        if openmp is not None:
            library.pool_use_openmp(openmp[1])


def kernel_for(kernels: dict, name: str):
    return block_kernel(kernels[name]) if name in kernels else contextlib.nullcontext()


def minor_page_faults() -> int:
    """The process's minor page faults so far (all threads): pages the kernel mapped in on first touch."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_call(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def forward(layer, x, dtype) -> None:
    """Inference: no graph; bf16 under autocast with the layer's fp32 weights."""
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        layer(x)


def forward_backward(layer, x, grad, dtype) -> None:
    """Training: gradients for the input (as inside a model), the weights and the bias."""
    x = x.detach().requires_grad_()
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        y = layer(x)
    y.backward(grad)
    layer.zero_grad(set_to_none=True)


def measure_linears(args, report: dict) -> None:
    dense = SMOKE_DENSE if args.smoke else DENSE
    tokens = args.tokens
    multiple = max(args.blocks)
    generator = torch.Generator().manual_seed(0)
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        blocks = args.blocks if dtype == torch.float32 else args.bf16_blocks
        for sparsity in args.sparsities if dtype == torch.float32 else args.bf16_sparsities:
            for linear, (out_features, in_features) in linear_shapes(dense, sparsity, multiple).items():
                density = 1 - sparsity
                layers = {"masked": masked_layer(out_features, in_features, density, generator)}
                kernels = {}  # variant -> block kernel it runs with
                for block in blocks:
                    for fan_in in args.fan_ins:
                        layer = BlockLayer(out_features, in_features, block, density, fan_in, generator)
                        for kind in args.block_kernels:
                            name = f"block-{block}-{fan_in}" + ("" if kind == args.block_kernels[0] else f"-{kind}")
                            layers[name], kernels[name] = layer, kind
                layers["iso-dense"] = torch.nn.Linear(in_features, round(density * out_features))
                x = torch.randn(tokens, in_features, generator=generator).to(dtype)
                grads = {
                    n: torch.randn(tokens, m.out_features, generator=generator).to(dtype) for n, m in layers.items()
                }
                times = {n: {"forward_s": [], "forward_backward_s": []} for n in layers}

                names = list(layers)
                for name in names:  # warm-up: allocator, worker pool
                    with kernel_for(kernels, name):
                        forward_backward(layers[name], x, grads[name], dtype)
                for r in range(args.repeats):
                    for name in names if r % 2 == 0 else names[::-1]:
                        with kernel_for(kernels, name):
                            times[name]["forward_s"].append(time_call(forward, layers[name], x, dtype))
                            times[name]["forward_backward_s"].append(
                                time_call(forward_backward, layers[name], x, grads[name], dtype)
                            )
                masked = {k: statistics.median(v) for k, v in times["masked"].items()}
                for name, t in times.items():
                    layer = layers[name]
                    row = {
                        "part": "linears",
                        "dtype": dtype_name,
                        "sparsity": sparsity,
                        "linear": linear,
                        "out_features": out_features,
                        "in_features": in_features,
                        "tokens": tokens,
                        "variant": name,
                        "block_kernel": kernels.get(name),
                        "active_weights": (
                            layer.blocks.numel()
                            if isinstance(layer, BlockLayer)
                            else int(layer.weight_mask.sum())
                            if isinstance(layer, SparseLinear)
                            else layer.weight.numel()
                        ),
                    }
                    for key, values in t.items():
                        row[key] = values
                        row[f"{key}_median"] = statistics.median(values)
                        row[f"{key}_min"] = min(values)
                        row[f"speedup_vs_masked_{key}"] = masked[key] / statistics.median(values)
                    report["results"].append(row)
                    print(
                        f"{dtype_name} s={sparsity} {linear} {out_features}x{in_features} {name}: forward "
                        f"{row['forward_s_median'] * 1e3:.1f} ms, forward+backward "
                        f"{row['forward_backward_s_median'] * 1e3:.1f} ms "
                        f"({row['speedup_vs_masked_forward_backward_s']:.2f}x masked)",
                        flush=True,
                    )
                del layers, grads
                gc.collect()


# ----------------------------------------------------------------------------------------------
# training step
# ----------------------------------------------------------------------------------------------
def training_models(args) -> dict[str, SparseWideGPTConfig]:
    base = dict(
        vocab_size=args.train_vocab,
        n_positions=args.train_seq,
        n_layer=args.train_layers,
        n_head=args.train_heads,
        dense_hidden_size=args.train_d_model,
        dense_intermediate_size=4 * args.train_d_model,
    )
    return {
        "dense": SparseWideGPTConfig(**base, sparsity=0.0),
        f"sw75-block{args.train_block}": SparseWideGPTConfig(
            **base, sparsity=0.75, sparsity_block=args.train_block, block_fan_in="any"
        ),
        f"sw75-block{args.train_block}-constant": SparseWideGPTConfig(
            **base, sparsity=0.75, sparsity_block=args.train_block, block_fan_in="constant"
        ),
        "sw75-masked": SparseWideGPTConfig(**base, sparsity=0.75),
    }


def sparse_state_bytes(model, optimizer) -> dict:
    """Bytes of the sparse layers' parameters, gradients and Adam states, next to 4 x 4 bytes per active weight."""
    layers = sparse_layers(model).values()
    params = [p for m in layers for p in m.parameters() if p.dim() > 1]
    total = sum(p.numel() * p.element_size() for p in params)
    total += sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    for p in params:
        # Adam's moments (a scalar step count per tensor is not per-weight memory)
        total += sum(s.numel() * s.element_size() for s in optimizer.state[p].values() if s.shape == p.shape)
    active = sum(int(m.weight_mask.sum()) for m in layers)
    return {"sparse_state_bytes": total, "active_weights": active, "bytes_per_active_weight": total / active}


def measure_training(args, report: dict) -> None:
    configs = training_models(args)
    generator = torch.Generator().manual_seed(0)
    batch = torch.randint(0, args.train_vocab, (args.train_batch, args.train_seq), generator=generator)
    steps, models, kernels, configs_of = {}, {}, {}, {}
    for name, config in configs.items():
        torch.manual_seed(0)
        model = SparseWideGPTForCausalLM(config).train()
        optimizer = build_optimizer(model, OptimConfig())

        def step(model=model, optimizer=optimizer):
            model(input_ids=batch, labels=batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)  # keeps the gradients' memory, as a training loop does

        # block models: one variant per block kernel (the first keeps the plain name); the constant fan-in model only
        # with the first kernel
        is_block = "block" in name
        kinds = args.block_kernels if is_block and "constant" not in name else args.block_kernels[:1]
        for kind in kinds if is_block else [None]:
            variant = name if kind in (None, args.block_kernels[0]) else f"{name}-{kind}"
            with kernel_for({variant: kind} if kind else {}, variant):
                step()  # warm-up; creates the Adam states
            steps[variant], models[variant] = step, (model, optimizer)
            kernels[variant], configs_of[variant] = kind, config
    # Each turn runs two steps of one variant and times both. The second follows a step of the same model, as every
    # step of a training loop does: it is the step time. The first follows another variant's step; it is recorded
    # beside it. With glibc's default settings the heap is given back to the system at irregular points and the next
    # step faults those pages in again (thousands to tens of thousands of faults in some SW-75 steps, none in others,
    # 2026-12-04), so the page faults of both steps are recorded too (--malloc keep-freed keeps the heap).
    times = {name: [] for name in steps}
    after_other = {name: [] for name in steps}
    faults = {name: [] for name in steps}
    faults_after_other = {name: [] for name in steps}
    names = list(steps)
    for r in range(args.repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            with kernel_for(kernels, name):
                before = minor_page_faults()
                after_other[name].append(time_call(steps[name]))
                middle = minor_page_faults()
                times[name].append(time_call(steps[name]))
                faults_after_other[name].append(middle - before)
                faults[name].append(minor_page_faults() - middle)
    dense_after_other = statistics.median(after_other["dense"])
    dense_median = statistics.median(times["dense"])
    for name, config in configs_of.items():
        summary = model_summary(config, args.train_seq)
        row = {
            "part": "train",
            "dtype": "float32",
            "variant": name,
            "block_kernel": kernels[name],
            "d_model": config.hidden_size,
            "d_ff": config.intermediate_size,
            "layer_sparsity": config.layer_sparsity,
            "tokens_per_step": args.train_batch * args.train_seq,
            "flop_ratio_to_dense": summary["flop_ratio_to_dense"],
            "step_s": times[name],
            "step_s_median": statistics.median(times[name]),
            "step_s_min": min(times[name]),
            "step_vs_dense": statistics.median(times[name]) / dense_median,
            "page_faults": faults[name],
            "step_after_other_model_s": after_other[name],
            "step_after_other_model_s_median": statistics.median(after_other[name]),
            "step_after_other_model_vs_dense": statistics.median(after_other[name]) / dense_after_other,
            "page_faults_after_other_model": faults_after_other[name],
        }
        row["step_vs_dense_over_flop_ratio"] = row["step_vs_dense"] / summary["flop_ratio_to_dense"]
        if config.sparsity > 0:
            row.update(sparse_state_bytes(*models[name]))
        report["results"].append(row)
        print(
            f"train {name}: step {row['step_s_median']:.3f} s = {row['step_vs_dense']:.2f}x dense "
            f"(ideal FLOP ratio {row['flop_ratio_to_dense']:.3f}); after another model's step "
            f"{row['step_after_other_model_s_median']:.3f} s = {row['step_after_other_model_vs_dense']:.2f}x dense",
            flush=True,
        )
    del models, steps
    gc.collect()


# ----------------------------------------------------------------------------------------------
# decode
# ----------------------------------------------------------------------------------------------
def measure_decode(args, report: dict) -> None:
    overrides = dict(vocab_size=97, n_positions=64, n_layer=2, n_head=2) if args.smoke else {}
    dense_dims = (
        dict(dense_hidden_size=SMOKE_DENSE["d_model"], dense_intermediate_size=SMOKE_DENSE["d_ff"])
        if args.smoke
        else {}
    )
    block = args.train_block if args.smoke else 64
    models = {
        "dense": build_inference_model("gpt3-small-dense", torch.float32, "srigl", {**overrides, **dense_dims}),
        "sw75-masked": build_inference_model("gpt3-small-sw75", torch.float32, "srigl", {**overrides, **dense_dims}),
    }
    # the condensed model shares the masked layers' tensors (condensing reads them)
    masked = models["sw75-masked"]
    shared = {id(t): t for m in sparse_layers(masked).values() for t in (m.weight, m.weight_mask)}
    models["sw75-condensed"] = copy.deepcopy(masked, shared).condense()
    torch.manual_seed(0)
    block_model = SparseWideGPTForCausalLM._from_config(
        model_config("gpt3-small-sw75", **overrides, **dense_dims, sparsity_block=block), dtype=torch.float32
    ).eval()
    kernels = {}
    for kind in args.block_kernels:  # one variant per block kernel, the first with the plain name
        variant = f"sw75-block{block}" + ("" if kind == args.block_kernels[0] else f"-{kind}")
        models[variant], kernels[variant] = block_model, kind
    prompt = torch.randint(0, models["dense"].config.vocab_size, (1, args.prefill), generator=torch.Generator())
    times = {name: [] for name in models}
    names = list(models)
    for name in names:
        with kernel_for(kernels, name):
            decode_run(models[name], prompt, 2)  # warm-up
    for r in range(args.repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            with kernel_for(kernels, name):
                _, steps, _ = decode_run(models[name], prompt, args.decode)
            times[name].extend(steps)
    dense_median = statistics.median(times["dense"])
    for name, m in models.items():
        row = {
            "part": "decode",
            "dtype": "float32",
            "variant": name,
            "block_kernel": kernels.get(name),
            "d_model": m.config.hidden_size,
            "d_ff": m.config.intermediate_size,
            "decode_ms_per_token_median": statistics.median(times[name]) * 1e3,
            "decode_ms_per_token_min": min(times[name]) * 1e3,
            "speed_vs_dense": dense_median / statistics.median(times[name]),
        }
        report["results"].append(row)
        print(
            f"decode {name}: {row['decode_ms_per_token_median']:.1f} ms/token = {row['speed_vs_dense']:.2f}x dense speed",
            flush=True,
        )
    del models, masked
    gc.collect()


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------
def targets(report: dict) -> list[dict]:
    """The issue's targets, from this run's rows (where the run measured them)."""
    rows = report["results"]
    found = []
    linear = {
        (r["linear"], r["variant"]): r
        for r in rows
        if r["part"] == "linears" and r["dtype"] == "float32" and r["sparsity"] == 0.75
    }
    for name in ("attention", "mlp_in"):
        for fan_in in ("any", "constant"):
            block = linear.get((name, f"block-64-{fan_in}"))
            if block is not None:
                iso = linear[(name, "iso-dense")]["forward_backward_s_median"]
                ratio = block["forward_backward_s_median"] / iso
                found.append(
                    {
                        "target": f"SW-75 block-64 ({fan_in} fan-in) {name} linear, fp32 forward+backward: <= 1.3x the "
                        f"time of the iso-FLOP dense layer ({block['block_kernel']} kernel)",
                        "measured": f"{ratio:.2f}x",
                        "met": ratio <= 1.3,
                    }
                )
    train = {r["variant"]: r for r in rows if r["part"] == "train"}
    for name, r in train.items():
        if "block" in name:
            found.append(
                {
                    "target": f"training step {name}: <= 1.25 x dense step x ideal FLOP ratio "
                    f"({r['flop_ratio_to_dense']:.3f})",
                    "measured": f"{r['step_vs_dense']:.2f}x dense = {r['step_vs_dense_over_flop_ratio']:.2f} x ratio",
                    "met": r["step_vs_dense_over_flop_ratio"] <= 1.25,
                }
            )
            found.append(
                {
                    "target": f"{name}: parameter, gradient and Adam memory of the sparse layers <= 1.1x that of "
                    "their active weights (16 bytes each in fp32)",
                    "measured": f"{r['bytes_per_active_weight'] / 16:.3f}x",
                    "met": r["bytes_per_active_weight"] / 16 <= 1.1,
                }
            )
    decode = {r["variant"]: r for r in rows if r["part"] == "decode"}
    for name, r in decode.items():
        if "block" in name or "condensed" in name:
            masked = decode.get("sw75-masked")
            found.append(
                {
                    "target": f"decode {name}: >= 0.7x the speed of dense GPT-3 Small (fp32, batch 1) and not slower "
                    "than sw75-masked",
                    "measured": f"{r['speed_vs_dense']:.2f}x dense"
                    + (f", {r['speed_vs_dense'] / masked['speed_vs_dense']:.2f}x masked" if masked else ""),
                    "met": r["speed_vs_dense"] >= 0.7
                    and (masked is None or r["speed_vs_dense"] >= masked["speed_vs_dense"]),
                }
            )
    return found


def results_stem(cpu_kind: str, threads: int, date: str, tag: str) -> str:
    return results_files.tagged(f"cpu-{cpu_kind}-{threads}threads-{date}-block-sparse", tag)


def write(report: dict, out: Path, stem: str, overwrite: bool) -> Path:
    lines = [
        f"# Block-sparse linears, training step and decode — cpu-{report['cpu_kind']}, {report['threads']} threads "
        f"— {report['date']}",
        "",
        f"CPU: {report['cpu']}, vector flags {' '.join(report['cpu_vector_flags'])}; torch {report['torch']}, transformers {report['transformers']}, Python "
        f"{report['python']}; torch threads {report['threads']}; OMP_WAIT_POLICY={report['omp_wait_policy']}; "
        f"C allocator {report['malloc']['setting']}: {report['malloc']['applied']} {report['malloc']['mallopt'] or ''}; "
        f"{report['repeats']} repeats per variant, variants in turns. GPU: {report['gpu']}.",
        "",
        f"Load average (1, 5, 15 min) at start / end: {report['load_average_before']} / "
        f"{report['load_average_after']}; per part (start / end): "
        + "; ".join(f"{k} {v['start']} / {v['end']}" for k, v in report["load_average_parts"].items())
        + " — the machine is shared with other processes; ratios compare variants "
        "measured in turns within this run.",
        "",
        f"Command: `{report['command']}` at commit {report['commit']}",
        "",
        f"Block-sparse kernels measured: {', '.join(report['block_kernels'])} (native: the built "
        f"`block_sparse_kernel.c`, {_library_source(report['block_kernel_native'])}; torch: the torch path, as "
        "without a built kernel). Variants without a suffix use the first; the condensed model uses "
        f"{_library_source(report['condensed_kernel_native'])}.",
        "",
    ]
    if report["malloc"]["decision"]:
        lines += [f"C allocator: {report['malloc']['decision']}.", ""]
    if report.get("notes"):
        lines += [f"Notes: {report['notes']}", ""]
    lines += ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'no'} |" for t in report["targets"]]
    linears = [r for r in report["results"] if r["part"] == "linears"]
    if linears:
        lines += [
            "",
            f"## Linears (T = {linears[0]['tokens']} tokens; medians; speed-up = masked median / variant median)",
            "",
            "| dtype | s | linear | out x in | variant | forward ms | fwd+bwd ms | fwd speed-up | fwd+bwd speed-up |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in linears:
            lines.append(
                f"| {r['dtype']} | {r['sparsity']} | {r['linear']} | {r['out_features']}x{r['in_features']} | "
                f"{r['variant']} | {r['forward_s_median'] * 1e3:.1f} | {r['forward_backward_s_median'] * 1e3:.1f} | "
                f"{r['speedup_vs_masked_forward_s']:.2f}x | {r['speedup_vs_masked_forward_backward_s']:.2f}x |"
            )
    train = [r for r in report["results"] if r["part"] == "train"]
    if train:
        lines += [
            "",
            f"## Training step (fp32, {train[0]['tokens_per_step']} tokens per step; {report['train_model']})",
            "",
            "Each turn runs two steps of one variant. The step time is the second's, which follows a step of the same "
            "model as in a training loop; the first follows another variant's step (last column). Page faults: pages "
            "the system mapped in during the step, after the C allocator had given them back.",
            "",
            "| variant | d_model/d_ff | step s (median) | step s (min) | vs dense | ideal FLOP ratio | vs dense / ratio "
            "| sparse-layer state bytes per active weight | page faults (median) | after another model: step s, vs "
            "dense, page faults |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in train:
            per_weight = f"{r['bytes_per_active_weight']:.1f}" if "bytes_per_active_weight" in r else "–"
            lines.append(
                f"| {r['variant']} | {r['d_model']}/{r['d_ff']} | {r['step_s_median']:.3f} | {r['step_s_min']:.3f} | "
                f"{r['step_vs_dense']:.2f}x | {r['flop_ratio_to_dense']:.3f} | "
                f"{r['step_vs_dense_over_flop_ratio']:.2f} | {per_weight} | {statistics.median(r['page_faults']):.0f} | "
                f"{r['step_after_other_model_s_median']:.3f}, {r['step_after_other_model_vs_dense']:.2f}x, "
                f"{statistics.median(r['page_faults_after_other_model']):.0f} |"
            )
    decode = [r for r in report["results"] if r["part"] == "decode"]
    if decode:
        lines += [
            "",
            f"## Batch-1 decode (fp32, prompt {report['prefill_tokens']} tokens, {report['decode_tokens']} greedy "
            "steps per repeat)",
            "",
            "| variant | d_model/d_ff | ms/token (median) | ms/token (min) | speed vs dense |",
            "|---|---|---|---|---|",
        ]
        for r in decode:
            lines.append(
                f"| {r['variant']} | {r['d_model']}/{r['d_ff']} | {r['decode_ms_per_token_median']:.1f} | "
                f"{r['decode_ms_per_token_min']:.1f} | {r['speed_vs_dense']:.2f}x |"
            )
    lines += ["", "CUDA path (torch's BSR / Triton kernels): not measured (no GPU in this run)."]
    texts = {".json": json.dumps(report, indent=2) + "\n", ".md": "\n".join(lines) + "\n"}
    written = results_files.write(out, stem, texts, overwrite)[".md"]
    print(written)
    return written


def _library_source(info: dict | None) -> str:
    if info is None:
        return "none built: the torch path"
    return (
        f"{info['path']}, built {info.get('built_at')} by {info.get('compiler')} {' '.join(info.get('flags', []))}, "
        f"running on {info.get('threads')} threads"
    )


def comma_list(kind):
    return lambda text: [kind(v) for v in text.split(",") if v]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", type=comma_list(str), default=["linears", "train", "decode"])
    parser.add_argument("--dtypes", type=comma_list(str), default=["float32", "bfloat16"])
    parser.add_argument("--sparsities", type=comma_list(float), default=[0.5, 0.75, 0.9])
    parser.add_argument("--blocks", type=comma_list(int), default=[16, 32, 64, 128], help="block sizes (fp32)")
    parser.add_argument("--bf16-blocks", type=comma_list(int), default=[16, 32, 64, 128], help="block sizes (bf16)")
    parser.add_argument(
        "--bf16-sparsities", type=comma_list(float), default=[0.5, 0.75, 0.9], help="sparsities measured in bf16"
    )
    parser.add_argument("--fan-ins", type=comma_list(str), default=["constant", "any"])
    parser.add_argument(
        "--block-kernels",
        type=comma_list(str),
        default=None,
        help="block-sparse CPU kernels to measure, in turns: native (the built kernel; `hf-sparse-ift build-kernels`) "
        "native-own-threads (the same on the library's own threads instead of torch's OpenMP ones) and/or torch "
        "(the torch path); the first is the plain variant name, the others get a suffix. Default: native,torch where "
        "the native kernel is built, else torch (the report says which ran)",
    )
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per linear call (T)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-d-model", type=int, default=256, help="dense width of the training-step model")
    parser.add_argument("--train-layers", type=int, default=4)
    parser.add_argument("--train-heads", type=int, default=4)
    parser.add_argument("--train-vocab", type=int, default=4096)
    parser.add_argument("--train-seq", type=int, default=256)
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--train-block", type=int, default=64)
    parser.add_argument("--prefill", type=int, default=64)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--notes", default="", help="recorded in the results (e.g. what was left out and why)")
    parser.add_argument(
        "--malloc",
        choices=CPU_ALLOCATORS,
        default="auto",
        help="the C allocator for this process, as train.cpu_allocator sets it for a training run (the same "
        "function decides): auto (keep-freed on CPU with glibc unless the environment tunes or replaces malloc; the "
        "decision is recorded), keep-freed (mallopt M_TRIM_THRESHOLD 2 GiB - 1, M_MMAP_THRESHOLD 32 MiB before any "
        "model is built: freed memory is kept for reuse, as jemalloc and tcmalloc do) or unchanged (glibc's "
        "defaults give freed heap back to the system, so steps fault pages in again)",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one repeat (CI)")
    results_files.add_arguments(parser, tag_help="appended to the results' file names (e.g. linears)")
    args = parser.parse_args(argv)
    for name in args.dtypes:
        if name not in DTYPES:
            parser.error(f"--dtypes: {name!r} is not one of {sorted(DTYPES)}")
    if args.block_kernels is None:
        args.block_kernels = ["native", "torch"] if block_sparse_cpu.load_kernel() is not None else ["torch"]
    for kind in args.block_kernels:
        if kind not in BLOCK_KERNELS:
            parser.error(f"--block-kernels: {kind!r} is not one of {', '.join(BLOCK_KERNELS)}")
    if any(k.startswith("native") for k in args.block_kernels) and block_sparse_cpu.load_kernel() is None:
        parser.error("--block-kernels native: no usable native kernel; run `hf-sparse-ift build-kernels` first")
    for part in args.parts:
        if part not in ("linears", "train", "decode"):
            parser.error(f"--parts: {part!r} is not one of linears, train, decode")
    if args.smoke:
        args.blocks = args.bf16_blocks = [16]
        args.sparsities = args.bf16_sparsities = [0.75]
        args.tokens, args.repeats, args.prefill, args.decode = 64, 1, 8, 3
        args.train_d_model, args.train_layers, args.train_heads, args.train_vocab = 32, 2, 2, 97
        args.train_seq, args.train_batch, args.train_block = 32, 2, 16
    try:
        allocator, allocator_decision = resolve_cpu_allocator(args.malloc, on_gpu=False)
    except UsageError as error:
        parser.error(f"--malloc: {error}")
    cpu = cpu_info()
    date = datetime.date.today().isoformat()
    stem = results_stem(cpu["kind"], args.threads, date, args.tag)
    results_files.refuse_existing(args.out, stem, args.overwrite)
    apply_cpu_allocator(allocator)
    torch.set_num_threads(args.threads)
    report = {
        "date": date,
        "threads": args.threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu": f"{cpu['model']}, {cpu['cpus']} CPUs",
        "cpu_kind": cpu["kind"],
        "cpu_vector_flags": cpu["vector_flags"],
        "block_kernels": args.block_kernels,
        "block_kernel_native": block_sparse_cpu.kernel_info(),  # path and build record of the native library
        "condensed_kernel_native": condensed_kernel.kernel_info(),
        "command": "block_sparse.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "commit": source_commit(),
        "repeats": args.repeats,
        "smoke": args.smoke,
        "prefill_tokens": args.prefill,
        "decode_tokens": args.decode,
        "train_model": (
            f"dense d_model {args.train_d_model}, {args.train_layers} layers, {args.train_heads} heads, vocabulary "
            f"{args.train_vocab}, {args.train_batch} x {args.train_seq} tokens, SW-75 blocks {args.train_block}"
        ),
        "notes": args.notes,
        "tag": f"-{args.tag}" if args.tag else "",
        "load_average_before": load_average(),
        "gpu": f"not used: CPU benchmark (CUDA available: {torch.cuda.is_available()})",
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "malloc": {
            "setting": args.malloc,
            "applied": allocator,
            "decision": allocator_decision,
            "mallopt": KEEP_FREED if allocator == "keep-freed" else {},
        },
        "results": [],
    }
    started = time.perf_counter()
    report["load_average_parts"] = {}
    for part, measure in (("linears", measure_linears), ("train", measure_training), ("decode", measure_decode)):
        if part in args.parts:
            before = load_average()
            measure(args, report)
            report["load_average_parts"][part] = {"start": before, "end": load_average()}
    report["wall_s"] = time.perf_counter() - started
    report["load_average_after"] = load_average()
    report["targets"] = targets(report)
    write(report, Path(args.out), stem, args.overwrite)
    return 0


if __name__ == "__main__":
    sys.exit(main())
