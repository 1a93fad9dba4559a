"""``hf-sparse-ift compress | decompress | condense | export | import-gpt2 | build-kernels``: convert saved Sparse
Wide checkpoints (between layouts, and to and from plain GPT-2), and build the condensed layers' native kernel.

hf-sparse-ift compress   IN OUT [--overwrite] [--max-shard-size 5GB]   # plain -> bitmask-values-v1
hf-sparse-ift decompress IN OUT [--overwrite]                          # bitmask-values-v1 -> plain
hf-sparse-ift condense   IN OUT [--representation auto|csr|padded]     # masked (either layout) -> condensed-v1
hf-sparse-ift build-kernels                                            # compile the CPU kernels for this CPU
hf-sparse-ift export      IN OUT [--overwrite]                         # any layout -> plain transformers GPT-2
hf-sparse-ift import-gpt2 IN OUT [--overwrite]                         # transformers GPT-2 -> dense Sparse Wide
"""

from __future__ import annotations

import json


def _folder_bytes(path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _add(sub, name: str, help_text: str, description: str):
    p = sub.add_parser(name, help=help_text, description=description)
    p.add_argument("input", help="a save_pretrained folder")
    p.add_argument("output", help="the folder to write (written to a temporary folder, then renamed)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.add_argument("--max-shard-size", default="50GB", help="as in save_pretrained (default: %(default)s)")
    return p


def add_parsers(sub) -> None:
    _add(
        sub,
        "compress",
        "store a sparse checkpoint as packed mask bits + active values (lossless)",
        "Rewrite a plain Sparse Wide checkpoint (dense weights + bool masks) in the bitmask-values-v1 layout: "
        "per sparse layer the mask as packed bits and the active weights in their dtype. Lossless: every mask "
        "bit and every active weight, zeros included. Other files (tokenizer, model card) are copied.",
    )
    _add(
        sub,
        "decompress",
        "rewrite a compressed checkpoint in the plain layout (dense weights + bool masks)",
        "Rewrite a bitmask-values-v1 checkpoint in the plain layout, for tools that expect dense weights.",
    )
    p = _add(
        sub,
        "condense",
        "store only the active weights and their input indices, for fast inference",
        "Condense every sparse layer of a masked checkpoint (either layout): rows of SRigL's constant fan-in "
        "become [rows, k] values and indices, neurons without active weights are dropped, variable fan-in "
        "(SET, RigL) is stored as CSR. The result loads with from_pretrained and generates like the masked "
        "model.",
    )
    p.add_argument(
        "--representation",
        default="auto",
        help="auto: [rows, k] for constant fan-in, else CSR (default); csr; padded (to the largest fan-in)",
    )
    p = sub.add_parser(
        "export",
        help="write a Sparse Wide checkpoint (any layout) as a plain transformers GPT-2 folder",
        description="Write a Sparse Wide checkpoint (masked, compressed, condensed or block-sparse) as a dense "
        "GPT2LMHeadModel of the widened sizes with the same logits (inactive weights stored as zeros): config.json "
        "(model_type gpt2), model.safetensors, the tokenizer with model_max_length = the model's context length, "
        "and a model card naming the source (path, tensors sha256, sparsity, layout). Nothing is padded.",
    )
    p.add_argument("input", help="a Sparse Wide save_pretrained folder")
    p.add_argument("output", help="the GPT-2 folder to write (written to a temporary folder, then renamed)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists (never the input)")
    p = sub.add_parser(
        "import-gpt2",
        help="write a transformers GPT-2 folder as a dense Sparse Wide checkpoint",
        description="Write a transformers GPT-2 folder (model_type gpt2) as a dense (sparsity 0) Sparse Wide "
        "checkpoint with the same logits, and its tokenizer with model_max_length = the model's context length.",
    )
    p.add_argument("input", help="a GPT-2 save_pretrained folder")
    p.add_argument("output", help="the Sparse Wide folder to write (written to a temporary folder, then renamed)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists (never the input)")
    sub.add_parser(
        "build-kernels",
        help="compile the condensed and block-sparse layers' CPU kernels for this machine (needs a C compiler; loading "
        "never compiles)",
        description="Compile condensed_kernel.c and block_sparse_kernel.c with the system C compiler (CC, else cc, gcc "
        "or clang) for this CPU into the kernel cache (HF_SPARSE_IFT_CACHE, else ~/.cache/hf_sparse_ift/kernels), where "
        "condensed and block-sparse layers find them. Without them those layers compute with torch (slower on CPU). "
        "Prints, one JSON line per kernel, where the library went and how it was built (with its size and sha256, "
        "which loading checks).",
    )


def _convert(args, layout: str) -> int:
    from pathlib import Path

    from ..sparsity.checkpoint_layouts import checkpoint_format, convert_checkpoint

    before = checkpoint_format(args.input)
    out = convert_checkpoint(
        args.input,
        args.output,
        layout,
        overwrite=args.overwrite,
        representation=getattr(args, "representation", "auto"),
        max_shard_size=args.max_shard_size,
    )
    print(
        json.dumps(
            {
                "input": str(args.input),
                "input_format": before,
                "input_bytes": _folder_bytes(Path(args.input)),
                "output": str(out),
                "output_format": layout,
                "output_bytes": _folder_bytes(out),
            }
        )
    )
    return 0


def cmd_compress(args) -> int:
    return _convert(args, "bitmask-values-v1")


def cmd_decompress(args) -> int:
    return _convert(args, "plain")


def cmd_condense(args) -> int:
    return _convert(args, "condensed-v1")


def cmd_build_kernels(args) -> int:
    from ..errors import UsageError
    from ..kernels.build import build_kernels

    try:
        records = build_kernels()
    except RuntimeError as err:
        raise UsageError(str(err)) from None
    for record in records:
        print(json.dumps(record))
    return 0


def cmd_export(args) -> int:
    from ..hub.export import export_gpt2

    print(json.dumps(export_gpt2(args.input, args.output, overwrite=args.overwrite)))
    return 0


def cmd_import_gpt2(args) -> int:
    from ..hub.export import import_gpt2

    print(json.dumps(import_gpt2(args.input, args.output, overwrite=args.overwrite)))
    return 0


HANDLERS = {
    "compress": cmd_compress,
    "decompress": cmd_decompress,
    "condense": cmd_condense,
    "build-kernels": cmd_build_kernels,
    "export": cmd_export,
    "import-gpt2": cmd_import_gpt2,
}
