"""Forward + backward time of PyTorch's SDPA kernel families at the head sizes of our models (GPU).

    python benchmarks/attention_backends.py          # prints a table and, last, the fastest family

Shapes: micro-batch 8, 12 heads, context 2048, causal, bf16; head sizes 64 (dense), 96 (SW-50 at width
multiple 64, and 91 padded), 128 (SW-75).
"""

import json
import sys

import torch
import torch.nn.functional as F

from hf_sparse_ift.training.hardware import set_sdpa_backend


def time_ms(fn, repeats=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def main() -> int:
    totals, rows = {}, []
    for head in (64, 96, 128):
        q, k, v = (
            torch.randn(8, 12, 2048, head, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)
        )
        grad = torch.randn_like(q)
        for backend in ("flash", "cudnn", "efficient"):
            set_sdpa_backend(backend)

            def step(q=q, k=k, v=v, grad=grad):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                out.backward(grad)

            try:
                ms = time_ms(step)
            except RuntimeError as err:
                ms = None
                print(f"{backend} head {head}: {str(err)[:100]}", file=sys.stderr)
            rows.append({"head_dim": head, "backend": backend, "fwd_bwd_ms": ms})
            if ms is not None:
                totals[backend] = totals.get(backend, 0.0) + ms
    set_sdpa_backend("auto")
    for r in rows:
        print(json.dumps(r))
    best = min(
        (b for b in totals if all(r["fwd_bwd_ms"] is not None for r in rows if r["backend"] == b)), key=totals.get
    )
    print(best)
    return 0


if __name__ == "__main__":
    sys.exit(main())
