"""Pretrain a Sparse Wide GPT; the script form of `hf-sparse-ift pretrain`, for `accelerate launch`:

accelerate launch scripts/pretrain.py --config configs/pretrain-gpt3-small-sw75-set.yaml
accelerate launch --config_file configs/accelerate/fsdp.yaml scripts/pretrain.py --config ... train.max_steps=10
"""

import sys

from hf_sparse_ift.cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))
