"""Does Sparse Wide pay off? Train dense, iso-FLOP, Sparse Wide and iso-time arms on identical data and
compare them (``hf-sparse-ift study --config configs/study-cpu-small.yaml``)."""
