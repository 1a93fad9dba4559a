"""Sharing on the Hub: which model a file or result belongs to (identity), and model cards."""
