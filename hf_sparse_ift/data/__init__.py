"""Pretraining and evaluation data: the data config, what a run will really read (`resolve_data_source`), the
tokenizer, streaming documents, tokenising on the fly and packing into fixed-length sequences."""
