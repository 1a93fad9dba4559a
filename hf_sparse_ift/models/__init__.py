"""Model definitions. Each model folder is self-contained: `save_pretrained` copies its files into the
checkpoint, so the checkpoint loads with ``trust_remote_code=True`` where this package is not installed."""
