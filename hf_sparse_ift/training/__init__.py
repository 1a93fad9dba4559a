"""Pretraining: config, data, optimizer, checkpoints and the loop."""
