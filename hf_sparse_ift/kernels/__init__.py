"""Building the native CPU kernels (`build`): the one place that runs a compiler. Loading them is the model's own
business (`hf_sparse_ift.models.sparse_wide_gpt.native_kernels`), which never builds."""
