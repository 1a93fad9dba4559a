"""Cost of one DST mask update (SET, RigL, SRigL) on a GPT-3 Small Sparse Wide model, against a training step.

    python benchmarks/dst_update_cost.py                    # GPT-3 Small SW-75 on the GPU, or the CPU without one
    python benchmarks/dst_update_cost.py --smoke            # tiny dims (CI)

For each method: median wall time of `engine.update()` over --repeats updates (RigL / SRigL rank a dense
gradient, which a real run captures in the update step's backward; here one real backward provides it), and the
amortised overhead at ΔT = 100: update / (100 x training step). The training step is one full step of the
paper's recipe at micro-batch --micro-batch (bf16 on GPU, fp32 on CPU). Writes
``<out>/<device>-<date>-dst-update.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from hf_sparse_ift import SparseWideGPTForCausalLM
from hf_sparse_ift.resources import model_config
from hf_sparse_ift.sparsity.dst import DSTConfig, DSTEngine
from hf_sparse_ift.training.config import OptimConfig
from hf_sparse_ift.training.optimizer import build_optimizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_files
from train_throughput import sync, training_step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt3-small-sw75")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=None, help="default: 8 on GPU, 1 on CPU")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", default="set,rigl,srigl")
    parser.add_argument("--smoke", action="store_true")
    results_files.add_arguments(parser)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    overrides = {}
    if args.smoke:
        overrides = dict(n_layer=2, n_head=2, dense_hidden_size=32, dense_intermediate_size=128, vocab_size=256)
        args.seq, args.repeats = 32, 2
    micro_batch = args.micro_batch or (8 if device.type == "cuda" else 1)
    config = model_config(args.preset, n_positions=args.seq, **overrides)
    name = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"cpu-{platform.machine()}-{torch.get_num_threads()}threads"
    )
    date = datetime.date.today().isoformat()
    stem = results_files.tagged(
        f"{name.replace(' ', '-')}-{date}-dst-update" + ("-smoke" if args.smoke else ""), args.tag
    )
    results_files.refuse_existing(args.out, stem, args.overwrite)
    report = {
        "device": name,
        "date": date,
        "torch": torch.__version__,
        "preset": args.preset,
        "d_model": config.hidden_size,
        "d_ff": config.intermediate_size,
        "seq": args.seq,
        "micro_batch": micro_batch,
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "methods": [],
    }
    x = torch.randint(0, config.vocab_size, (micro_batch, args.seq), device=device)
    for method in args.methods.split(","):
        torch.manual_seed(0)
        model = SparseWideGPTForCausalLM(config).to(device).train()
        opt = build_optimizer(model, OptimConfig())
        engine = DSTEngine(model, opt, DSTConfig(method=method, update_interval=1), total_steps=1_000_000)

        step = training_step(model, model, opt, x, device)
        step_times, update_times = [], []
        for _ in range(args.repeats + 1):
            sync(device)
            start = time.perf_counter()
            step()  # with update_interval=1 every step captures the dense gradient for RigL / SRigL
            sync(device)
            step_times.append(time.perf_counter() - start)
            update_times.append(engine.step()["seconds"])  # an update every step; it times itself
        step_s, update_s = statistics.median(step_times[1:]), statistics.median(update_times[1:])
        row = {
            "method": method,
            "update_s": update_s,
            "train_step_s": step_s,
            "overhead_pct_at_dT100": 100 * update_s / (100 * step_s),
            "sparse_layers": len(engine.layers),
        }
        print(json.dumps(row), flush=True)
        report["methods"].append(row)
        del model, opt, engine, step  # the step closure holds the model too
        if device.type == "cuda":
            torch.cuda.empty_cache()
    lines = [
        f"# DST update cost — {report['device']} — {report['date']}",
        "",
        f"{args.preset} ({config.hidden_size}/{config.intermediate_size}), training step at micro-batch "
        f"{micro_batch} x {args.seq} tokens; torch {torch.__version__}; median of {args.repeats}.",
        "",
        f"Command: `{report['command']}`",
        "",
        "| method | update s | training step s | overhead at ΔT = 100 |",
        "|---|---|---|---|",
    ]
    for r in report["methods"]:
        lines.append(
            f"| {r['method']} | {r['update_s']:.4f} | {r['train_step_s']:.3f} | {r['overhead_pct_at_dT100']:.3f}% |"
        )
    texts = {".json": json.dumps(report, indent=1), ".md": "\n".join(lines) + "\n"}
    results_files.write(args.out, stem, texts, args.overwrite)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
