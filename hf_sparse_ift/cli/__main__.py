"""``python -m hf_sparse_ift.cli``: the `hf-sparse-ift` command."""

import sys

from . import main

sys.exit(main())
