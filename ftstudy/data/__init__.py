"""The prepared data's path: reading sources, carving splits, instruction examples, token files and
batches (prepare, and what every stage reads of its outputs)."""
